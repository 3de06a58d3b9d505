"""Checks on source files that run on the driver, without Ray: UTF-8, a chunk at a time."""

from __future__ import annotations

import gzip

import pyarrow as pa
import pytest

from orchestrator.data import sources
from orchestrator.data.sources import check_utf8
from orchestrator.spec import DataSpec, SpecError


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
