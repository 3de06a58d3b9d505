"""Read line-per-record files (JSONL, plain text) in byte ranges, so that one large file is read
by several Ray Data tasks at once, each holding only its range.

Ray Data's own JSON and text readers read a file whole in one task: a 1 GB JSONL file took one
core and about 5 GB of that worker's memory. A range owns the lines that start inside it (as
Hadoop's line reader does): it skips the partial line it starts in, unless it starts a file or
right after a newline, and reads on past its end to finish its last line. Compressed files
(gzip, zstd... by suffix) cannot be entered midway and are read whole, a range each.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pa_json
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from orchestrator.storage import resolve

NEWLINE = b"\n"
READ_AHEAD_BYTES = 1 << 16  # read past a range's end this much at a time to finish its line
# A range's size: the source split into as many ranges as Ray Data asks for tasks, but no range
# so small that a task costs more to start than to read, nor so large that one task holds much.
MIN_RANGE_BYTES = 8 << 20
MAX_RANGE_BYTES = 64 << 20
LINE_FORMATS = ("jsonl", "text")


@dataclass(frozen=True)
class LineRange:
    """The lines of `file` that start at a byte in [start, end); end None: to the file's end."""

    file: str
    start: int
    end: int | None


def is_compressed(file: str) -> bool:
    """Whether the file's suffix names a compression (as Ray Data and pyarrow detect it)."""
    try:
        pa.Codec.detect(file)
    except (TypeError, ValueError):  # TypeError: pyarrow's answer for no known suffix
        return False
    return True


def plan_ranges(files: list[tuple[str, int]], parallelism: int) -> list[LineRange]:
    """Ranges over (file, size) pairs, in file order: compressed files whole, the rest cut
    into equal ranges of at most the total over `parallelism`, kept between MIN_RANGE_BYTES
    (a cut file's ranges may be down to half of it) and MAX_RANGE_BYTES."""
    total = sum(size for _, size in files)
    size_per_range = min(MAX_RANGE_BYTES, max(MIN_RANGE_BYTES, total // max(parallelism, 1)))
    ranges: list[LineRange] = []
    for file, size in files:
        if is_compressed(file) or size <= size_per_range:
            ranges.append(LineRange(file, 0, None))
            continue
        pieces = -(-size // size_per_range)
        bounds = [size * i // pieces for i in range(pieces)] + [None]
        ranges.extend(LineRange(file, start, end) for start, end in pairwise(bounds))
    return ranges


def _finish_line(handle: pa.NativeFile) -> bytes:
    """The bytes from the handle's position through the next newline (or the file's end)."""
    tail = bytearray()
    while chunk := handle.read(READ_AHEAD_BYTES):
        cut = chunk.find(NEWLINE)
        if cut >= 0:
            return bytes(tail + chunk[:cut + 1])
        tail += chunk
    return bytes(tail)


def range_bytes(fs: pafs.FileSystem, piece: LineRange) -> bytes:
    """The whole lines that `piece` owns, decompressed for a compressed file."""
    if piece.end is None and piece.start == 0:
        with fs.open_input_stream(piece.file, compression="detect") as stream:
            return stream.read()
    with fs.open_input_file(piece.file) as handle:
        first = piece.start
        if first > 0:
            handle.seek(first - 1)
            first += len(_finish_line(handle)) - 1  # the line the range starts in is not ours
        if piece.end is not None and first >= piece.end:
            return b""  # a line longer than the range began before it and runs past it
        handle.seek(first)
        body = handle.read() if piece.end is None else handle.read(piece.end - first)
        if piece.end is not None and body and not body.endswith(NEWLINE):
            body += _finish_line(handle)
        return body


def parse_lines(data: bytes, fmt: str) -> pa.Table:
    """A JSONL range as Arrow's JSON reader types it, or a text range as a `text` column of its
    non-blank lines (as Ray Data's read_text gives them)."""
    if fmt == "jsonl":
        if not data.strip():
            return pa.table({})
        options = pa_json.ReadOptions(use_threads=True)
        return pa_json.read_json(pa.BufferReader(data), read_options=options)
    lines = [line.rstrip("\r") for line in data.decode("utf-8").split("\n")]
    return pa.table({"text": pa.array([line for line in lines if line.strip()],
                                      type=pa.string())})


class LineRangeDatasource(Datasource):
    """The files of a path (a file, or a folder's files in order) read in line ranges."""

    def __init__(self, path: str, files: list[str], fmt: str):
        super().__init__()
        if fmt not in LINE_FORMATS:
            raise ValueError(f"line ranges read {LINE_FORMATS}, not {fmt!r}")
        self.path, self.fmt = path, fmt
        fs = resolve(path).fs
        self.files = [(info.path, info.size) for info in fs.get_file_info(files)]

    def get_name(self) -> str:
        return "ReadJSONL" if self.fmt == "jsonl" else "ReadText"

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(size for _, size in self.files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: object = None) -> list[ReadTask]:
        ranges = plan_ranges(self.files, parallelism)
        groups = _consecutive_groups(ranges, parallelism)
        sizes = dict(self.files)
        return [ReadTask(
            _reader(self.path, group, self.fmt),
            BlockMetadata(num_rows=None, exec_stats=None,
                          size_bytes=sum(_length(piece, sizes) for piece in group),
                          input_files=tuple(dict.fromkeys(piece.file for piece in group))),
            per_task_row_limit=per_task_row_limit)
            for group in groups]


def _length(piece: LineRange, sizes: dict[str, int]) -> int:
    return (sizes[piece.file] if piece.end is None else piece.end) - piece.start


def _consecutive_groups(ranges: list[LineRange], count: int) -> list[list[LineRange]]:
    """`ranges` cut into at most `count` runs of consecutive ranges, in order."""
    count = max(1, min(count, len(ranges)))
    bounds = [len(ranges) * i // count for i in range(count + 1)]
    return [ranges[low:high] for low, high in pairwise(bounds)]


def _reader(path: str, group: list[LineRange], fmt: str):
    def read() -> Iterator[pa.Table]:
        fs = resolve(path).fs
        for piece in group:
            table = parse_lines(range_bytes(fs, piece), fmt)
            if table.num_rows:
                yield table
    return read
