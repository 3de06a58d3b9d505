"""Checks on source files that run on the driver, without Ray: UTF-8, a chunk at a time."""

from __future__ import annotations

import gzip

import pyarrow as pa
import pytest

from orchestrator.data import sources
from orchestrator.data.sources import check_utf8, source_files, source_format
from orchestrator.spec import DataSpec, SpecError, format_of


@pytest.mark.parametrize(("content", "found"), [
    ("né ".encode() * 5, None),                     # é cut by every chunk boundary: still good
    ("né ".encode() * 5 + b"\xff", (20, "0xff: invalid start byte")),
    ("né ".encode() * 5 + "é".encode()[:1], (20, "0xc3: unexpected end of data")),
    (b"x" * 9 + b"\xc3(", (9, "0xc3: invalid continuation byte")),
])
def test_the_first_byte_that_is_not_utf8_is_found_across_chunks(monkeypatch, content, found):
    monkeypatch.setattr(sources, "CHECK_CHUNK_BYTES", 3)
    assert sources._not_utf8_at(pa.BufferReader(content)) == found


def test_check_utf8_names_the_file_and_reads_compressed_files_as_text(tmp_path):
    good, bad = tmp_path / "a.txt", tmp_path / "b.txt.gz"
    good.write_text("fine\n")
    bad.write_bytes(gzip.compress(b"line one\ncaf\xe9\n"))
    data = DataSpec(path=str(tmp_path), format="text")
    check_utf8(data, [str(good)])
    with pytest.raises(SpecError, match=rf"file {bad} is not UTF-8 at byte 12 \(0xe9: invalid"):
        check_utf8(data, [str(good), str(bad)])


def _compressed(path, content: bytes, codec: str):
    with pa.CompressedOutputStream(str(path), codec) as out:
        out.write(content)
    return path


@pytest.mark.parametrize(("name", "fmt", "codec"), [
    ("a.jsonl.gz", "jsonl", "gzip"), ("a.jsonl.zst", "jsonl", "zstd"),
    ("a.txt.zst", "text", "zstd"), ("a.csv.gz", "csv", "gzip"),
])
def test_file_error_reads_compressed_files_through(tmp_path, name, fmt, codec):
    content = {"jsonl": b'{"text": "a"}\n{"text": "b"}\n', "text": b"a\nb\n",
               "csv": b"text,label\na,x\nb,y\n"}[fmt]
    path = _compressed(tmp_path / name, content, codec)
    assert sources.file_error(str(tmp_path), str(path), fmt) is None
    cut = tmp_path / f"cut-{name}"
    cut.write_bytes(path.read_bytes()[:-6])  # a truncated download
    assert sources.file_error(str(tmp_path), str(cut), fmt) is not None


def test_file_error_names_what_does_not_parse(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "cut\n')
    assert sources.file_error(str(tmp_path), str(broken), "jsonl").startswith(
        "ArrowInvalid: JSON parse error")
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("not parquet")
    assert "ArrowInvalid" in sources.file_error(str(tmp_path), str(not_parquet), "parquet")


@pytest.mark.parametrize(("name", "fmt"), [
    ("a.jsonl.gz", "jsonl"), ("A.JSONL.ZST", "jsonl"), ("a.json.bz2", "jsonl"),
    ("a.csv.gz", "csv"), ("a.txt.lz4", "text"), ("a.parquet", "parquet"), ("a.v2.jsonl", "jsonl"),
    ("a.parquet.gz", None), ("a.tar.gz", None), ("a.gz", None), ("README", None),
])
def test_the_format_is_read_from_a_file_names_suffixes(name, fmt):
    assert format_of(name) == fmt


def _files(directory, *names: str):
    for name in names:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(b"")
    return directory


def test_a_folder_has_the_format_of_its_files(tmp_path):
    """Compressed or not, nested or not; what Ray Data skips (_SUCCESS, .crc) is skipped."""
    folder = _files(tmp_path, "a.jsonl.gz", "b.jsonl.zst", "sub/c.json", "_SUCCESS", ".a.crc")
    assert source_format(DataSpec(path=str(folder))) == "jsonl"
    assert source_files(DataSpec(path=str(folder))) == [
        str(folder / name) for name in ("a.jsonl.gz", "b.jsonl.zst", "sub/c.json")]
    assert source_format(DataSpec(path=str(folder / "a.jsonl.gz"))) == "jsonl"
    assert source_format(DataSpec(path=str(_files(tmp_path / "p", "x.parquet")))) == "parquet"


def test_a_folder_of_two_formats_is_refused_naming_a_file_of_each(tmp_path):
    folder = _files(tmp_path, "a.jsonl.gz", "b.jsonl", "c.csv.gz", "d.jsonl")
    with pytest.raises(SpecError, match=rf"data.path = '{folder}' holds files of two formats: "
                       rf"{folder / 'a.jsonl.gz'} \(jsonl\) and {folder / 'c.csv.gz'} \(csv\)"):
        source_format(DataSpec(path=str(folder)))
    assert source_format(DataSpec(path=str(folder), format="jsonl")) == "jsonl"  # as the user says


def test_a_file_whose_suffix_names_no_format_is_named(tmp_path):
    folder = _files(tmp_path, "a.jsonl", "notes.md")
    with pytest.raises(SpecError, match=rf"data.format: cannot infer the format of "
                       rf"{folder / 'notes.md'} in data.path = '{folder}'.*known: \.parquet, "
                       r"\.jsonl.*set data.format to one of parquet, jsonl, csv, text"):
        source_format(DataSpec(path=str(folder)))
    with pytest.raises(SpecError, match=r"data.path = .*: the folder holds no files"):
        source_format(DataSpec(path=str(_files(tmp_path / "empty", "_SUCCESS"))))
