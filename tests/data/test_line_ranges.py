"""Line-per-record files read in byte ranges, without Ray: every line read once, by the range it
starts in, whatever the cuts; compressed files whole; a large file split for several tasks."""

from __future__ import annotations

import gzip
import json
import random
from itertools import pairwise

import pyarrow.fs as pafs
import pytest

from orchestrator.data import line_ranges
from orchestrator.data.line_ranges import (
    LineRange,
    LineRangeDatasource,
    parse_lines,
    plan_ranges,
    range_bytes,
)

LOCAL = pafs.LocalFileSystem()


def _rows(count: int, seed: int = 0) -> list[dict]:
    draw = random.Random(seed)
    return [{"text": "w" * draw.randint(0, 200) + f" é{i}", "label": f"c{i % 3}"}
            for i in range(count)]


def _jsonl(path, rows, final_newline: bool = True):
    body = "\n".join(json.dumps(row, ensure_ascii=False) for row in rows)
    path.write_text(body + ("\n" if final_newline else ""), encoding="utf-8")
    return path


def _read_in(path, cuts: list[int], fmt: str) -> list:
    bounds = [0, *cuts, None]
    rows = []
    for start, end in pairwise(bounds):
        rows += parse_lines(range_bytes(LOCAL, LineRange(str(path), start, end)), fmt).to_pylist()
    return rows


@pytest.mark.parametrize("final_newline", [True, False])
@pytest.mark.parametrize("pieces", [1, 2, 3, 7, 64, 1000])
def test_every_line_is_read_once_whatever_the_cuts(tmp_path, pieces, final_newline):
    rows = _rows(500)
    path = _jsonl(tmp_path / "a.jsonl", rows, final_newline)
    size = path.stat().st_size
    assert _read_in(path, [size * i // pieces for i in range(1, pieces)], "jsonl") == rows


def test_cuts_on_newlines_inside_lines_and_in_a_long_line_lose_nothing(tmp_path):
    rows = [{"text": "a"}, {"text": "b" * 5000}, {"text": "c"}, {"text": "d"}]
    path = _jsonl(tmp_path / "a.jsonl", rows)
    data = path.read_bytes()
    newlines = [i + 1 for i, byte in enumerate(data) if byte == ord("\n")][:-1]
    inside_long = [len(json.dumps(rows[0])) + 100, len(json.dumps(rows[0])) + 200]
    for cuts in (newlines, sorted(inside_long), sorted({*newlines, *inside_long})):
        assert _read_in(path, cuts, "jsonl") == rows, cuts


def test_text_lines_drop_blank_lines_and_carriage_returns(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"first line\r\n\n  \nsecond\xc3\xa9\nthird")
    for cuts in ([], [3], [11, 13], [15, 17, 20]):
        assert _read_in(path, cuts, "text") == [
            {"text": "first line"}, {"text": "secondé"}, {"text": "third"}], cuts


def test_bytes_that_are_not_utf8_fail_the_read():
    with pytest.raises(UnicodeDecodeError):
        parse_lines(b"caf\xe9\n", "text")


def test_compressed_files_are_read_whole_and_large_ones_split_in_bounds():
    mib = 1 << 20
    files = [("big.jsonl", 100 * mib), ("small.jsonl", 1 * mib), ("huge.jsonl.gz", 500 * mib),
             ("b.txt.zst", 9 * mib)]
    ranges = plan_ranges(files, parallelism=200)
    assert [r for r in ranges if r.file != "big.jsonl"] == [
        LineRange("small.jsonl", 0, None), LineRange("huge.jsonl.gz", 0, None),
        LineRange("b.txt.zst", 0, None)]
    big = [r for r in ranges if r.file == "big.jsonl"]
    assert big[0].start == 0 and big[-1].end is None
    assert all(a.end == b.start for a, b in pairwise(big))
    sizes = [(r.end or 100 * mib) - r.start for r in big]
    assert min(sizes) > line_ranges.MIN_RANGE_BYTES / 2 and max(sizes) <= line_ranges.MAX_RANGE_BYTES
    # Few tasks asked for: ranges no larger than the maximum all the same.
    assert len(plan_ranges([("big.jsonl", 1024 * mib)], parallelism=2)) == 16


def test_the_datasource_reads_a_folder_in_order_split_over_tasks(tmp_path, monkeypatch):
    monkeypatch.setattr(line_ranges, "MIN_RANGE_BYTES", 1 << 10)
    first, second = _rows(300, seed=1), _rows(40, seed=2)
    _jsonl(tmp_path / "a.jsonl", first)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps(row) + "\n" for row in second).encode()))
    files = sorted(str(path) for path in tmp_path.iterdir())
    tasks = LineRangeDatasource(str(tmp_path), files, "jsonl").get_read_tasks(4)
    assert len(tasks) == 4
    assert tasks[0].metadata.input_files == (files[0],)
    assert {file for task in tasks for file in task.metadata.input_files} == set(files)
    rows = [row for task in tasks for block in task() for row in block.to_pylist()]
    assert rows == first + second
