"""Read the user's text with Ray Data and normalize it to the columns `text` (and `label`)."""

from __future__ import annotations

import codecs
import os
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.fs as pafs
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import ray
import ray.data

from orchestrator.data.line_ranges import LINE_FORMATS, LineRangeDatasource
from orchestrator.spec import DATA_FORMATS, SUFFIXES_KNOWN, DataSpec, SpecError, format_of
from orchestrator.storage import resolve

TEXT, LABEL = "text", "label"
# Formats read as text, whose files can hold bytes that are not UTF-8 (parquet strings are typed).
TEXT_FORMATS = ("text", "jsonl", "csv")
CHECK_CHUNK_BYTES = 1 << 20
# How a read that met bytes that are not UTF-8 reaches the driver: Python's decoder failed in a
# read task (text, JSONL) or in our transform (a CSV label column read as bytes), which Ray Data
# keeps only as text; or Arrow could not parse a CSV file (Ray Data drops Arrow's reason, such as
# "invalid UTF8 data"); or Arrow's JSON reader kept the bytes and a transform met them.
DECODING_FAILED = ("UnicodeDecodeError", "Failed to read CSV file", "Invalid UTF8")
# Files of a folder that Ray Data skips, as it does: their path in the folder starts with these
# (_SUCCESS, .crc files and the like that writers leave).
SKIPPED_PREFIXES = (".", "_")


def _local_path(path: str) -> str | None:
    """The filesystem path of a local source, or None for a remote URI (s3://, gs://, ...)."""
    parsed = urlparse(path)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # 1: a Windows drive letter
        return parsed.path if parsed.scheme == "file" else path
    return None


def _check_exists(data: DataSpec) -> None:
    local = _local_path(data.path)
    if local is not None and not os.path.exists(local):
        raise SpecError(f"data.path = {data.path!r}: no such file or directory")


def source_files(data: DataSpec) -> list[str]:
    """The files data.path names: itself, or the files under a folder or prefix that Ray Data
    reads (sorted, in the path's filesystem)."""
    location = resolve(data.path)
    if location.kind() != pafs.FileType.Directory:
        return [location.path]
    base = location.path.rstrip("/") + "/"
    infos = location.fs.get_file_info(pafs.FileSelector(location.path, recursive=True))
    return sorted(info.path for info in infos if info.is_file
                  and not info.path[len(base):].startswith(SKIPPED_PREFIXES))


def source_format(data: DataSpec) -> str:
    """data.format, or with auto the one format the suffixes of the path's files imply; a folder
    whose files name no format, or two, is refused naming them."""
    if data.format != "auto" or resolve(data.path).kind() != pafs.FileType.Directory:
        return data.resolved_format
    files = source_files(data)
    if not files:
        raise SpecError(f"data.path = {data.path!r}: the folder holds no files")
    found: dict[str, str] = {}  # format: its first file
    for file in files:
        fmt = format_of(file)
        if fmt is None:
            raise SpecError(
                f"data.format: cannot infer the format of {file} in data.path = {data.path!r} "
                f"from its suffix ({SUFFIXES_KNOWN}); set data.format to one of "
                f"{', '.join(DATA_FORMATS)}, or move the file out")
        found.setdefault(fmt, file)
        if len(found) > 1:
            (first, one), (second, other) = found.items()
            raise SpecError(
                f"data.path = {data.path!r} holds files of two formats: {one} ({first}) and "
                f"{other} ({second}); keep one format in it, or set data.format to read every "
                "file as that format")
    return next(iter(found))


def configure_ray_data() -> None:
    """Ray Data as every read of ours runs it: no progress bars (they flood job logs; our own
    lines say what runs), and parquet read by tasks (datasource V1). V2 lists parquet files
    through a pool of 32 footer-reading actors per read and kills them when done: a job that
    succeeded showed 61 of its 204 tasks failed (FooterReader.__init__) in Ray's dashboard."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.use_datasource_v2 = False


def _read(data: DataSpec, fmt: str) -> ray.data.Dataset:
    configure_ray_data()
    try:
        if fmt == "parquet":
            return ray.data.read_parquet(data.path)
        if fmt in LINE_FORMATS:
            # In line ranges, so that a large file is read by several tasks at once; JSONL by
            # Arrow's reader (lines=True is pandas': 10x the CPU), whose types unify over a
            # range's rows (1 and 0.5: double).
            return ray.data.read_datasource(
                LineRangeDatasource(data.path, source_files(data), fmt))
        # CSV is read a file a task (a quoted field may hold newlines). Typed as string, the
        # text column refuses bytes that are not UTF-8 (inferred, it would be bytes).
        types = pa_csv.ConvertOptions(column_types={data.text_column: pa.string()})
        return ray.data.read_csv(data.path, file_extensions=None, convert_options=types)
    except Exception as error:  # noqa: BLE001 - pyarrow/fsspec raise many types for unreadable input
        raise SpecError(f"data.path = {data.path!r}: cannot read it as {fmt}: {error}") from None


def _not_utf8_at(stream: pa.NativeFile) -> tuple[int, str] | None:
    """(offset, what is wrong) of the first byte of `stream` that is not UTF-8, or None; read
    a chunk at a time, so any file size takes the same memory."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # of the chunk in the stream
    while True:
        chunk = stream.read(CHECK_CHUNK_BYTES)
        held = len(decoder.getstate()[0])  # the start of a character the last chunk cut
        try:
            decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as error:
            bad = " ".join(f"0x{byte:02x}" for byte in error.object[error.start:error.end])
            return offset - held + error.start, f"{bad}: {error.reason}"
        if not chunk:
            return None
        offset += len(chunk)


def check_utf8(data: DataSpec, files: list[str]) -> None:
    """Refuse the first of `files` (paths in data.path's filesystem, compressed ones read as
    their text) that is not UTF-8, naming it and the byte."""
    fs = resolve(data.path).fs
    for path in files:
        with fs.open_input_stream(path, compression="detect") as stream:
            found = _not_utf8_at(stream)
        if found is not None:
            offset, why = found
            raise SpecError(f"data.path = {data.path!r}: file {path} is not UTF-8 at byte "
                            f"{offset} ({why}); save it as UTF-8")


def file_error(path: str, file: str, fmt: str) -> str | None:
    """Why `file` (in `path`'s filesystem) cannot be read through as `fmt`, decompressed (gzip,
    zstd... by its suffix, as Ray Data reads it) and parsed, or None; a chunk at a time."""
    fs = resolve(path).fs
    try:
        if fmt == "parquet":
            with fs.open_input_file(file) as handle:
                for _ in pq.ParquetFile(handle).iter_batches():
                    pass
            return None
        with fs.open_input_stream(file, compression="detect") as stream:
            if fmt == "jsonl":
                pa_json.read_json(stream)  # whole, as the stage's reader does
            elif fmt == "csv":
                for _ in pa_csv.open_csv(stream):
                    pass
            else:
                while stream.read(CHECK_CHUNK_BYTES):
                    pass
    except Exception as error:  # noqa: BLE001 - any reason is the answer
        return f"{type(error).__name__}: {error}"
    return None


def check_files(data: DataSpec, files: list[str]) -> None:
    """Refuse the first of `files` that cannot be read, naming it: each is read through in a Ray
    task of its own (in parallel, off the driver), only after a read of the whole source failed."""
    check = ray.remote(num_cpus=1)(file_error)
    fmt = source_format(data)
    errors = ray.get([check.remote(data.path, file, fmt) for file in files])
    for file, why in zip(files, errors):
        if why is not None:
            raise SpecError(f"data.path = {data.path!r}: cannot read it as {fmt}: file {file}: "
                            f"{why}")


def _is_decoding_error(error: BaseException) -> bool:
    """Whether a read may have failed on bytes that are not UTF-8 (see DECODING_FAILED)."""
    return isinstance(error, UnicodeDecodeError) or any(sign in str(error)
                                                        for sign in DECODING_FAILED)


def _check_decoding(data: DataSpec, ds: ray.data.Dataset, error: BaseException) -> None:
    """After a failed read of `ds`: the SpecError naming the file and byte that are not UTF-8,
    when that is why. The files are read only then, so a good dataset is read once."""
    if source_format(data) in TEXT_FORMATS and _is_decoding_error(error):
        check_utf8(data, ds.input_files())


def explain_read_failure(data: DataSpec, ds: ray.data.Dataset, error: BaseException) -> None:
    """Raise the SpecError that says why executing `ds` (from read_source) failed, when the spec
    or its data is why: a file that is not UTF-8, a missing column, a file that is not of its
    format. Returns otherwise, for the caller to raise `error`."""
    read_source(data)  # first: when its own read fails on a bad byte, it names the byte
    _check_decoding(data, ds, error)
    check_files(data, ds.input_files())


def _check_columns(data: DataSpec, fmt: str, ds: ray.data.Dataset) -> None:
    try:
        columns = ds.schema().names
    except Exception as error:  # noqa: BLE001 - a reader's error, explained or reraised
        _check_decoding(data, ds, error)
        check_files(data, ds.input_files())
        raise SpecError(f"data.path = {data.path!r}: cannot read it as {fmt}: {error}") from None
    wanted = {"text_column": data.text_column, "label_column": data.label_column}
    for field, column in wanted.items():
        if column and column not in columns:
            raise SpecError(
                f"data.{field} = {column!r} is not a column of {data.path!r}; "
                f"columns: {', '.join(columns)}"
            )


def read_source(data: DataSpec, keep_other_columns: bool = False,
                check_columns: bool = True) -> ray.data.Dataset:
    """A lazy dataset with the column `text` (and `label` when data.label_column is set), and
    with keep_other_columns the source's other columns too (batch inference passes ids through).

    Checks that the path exists and that the named columns are there before any heavy work, so
    a wrong spec fails in seconds with the columns that do exist. Knowing the columns of jsonl
    or csv means reading a file: with check_columns=False that read is left to the caller's
    own execution (which fails on its first block if a column is missing); call again with
    check_columns=True when it fails, for the SpecError that says why.
    """
    _check_exists(data)
    fmt = source_format(data)
    ds = _read(data, fmt)
    if fmt == "text":
        if data.label_column:
            raise SpecError("data.label_column: plain-text files have no label column; "
                            "use jsonl, csv or parquet for classification")
        return ds
    renames = {data.text_column: TEXT}
    if data.label_column:
        renames[data.label_column] = LABEL
    if check_columns:
        _check_columns(data, fmt, ds)
    if not keep_other_columns:
        ds = ds.select_columns(list(renames))
    return ds.rename_columns(renames)
