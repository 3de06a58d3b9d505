"""Read the user's text with Ray Data and normalize it to the columns `text` (and `label`)."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import ray.data

from orchestrator.spec import DataSpec, SpecError

TEXT, LABEL = "text", "label"


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


def _read(data: DataSpec, fmt: str) -> ray.data.Dataset:
    try:
        if fmt == "parquet":
            return ray.data.read_parquet(data.path)
        if fmt == "jsonl":
            return ray.data.read_json(data.path, lines=True, file_extensions=None)
        if fmt == "csv":
            return ray.data.read_csv(data.path, file_extensions=None)
        return ray.data.read_text(data.path, file_extensions=None)
    except Exception as error:  # pyarrow/fsspec raise many types for unreadable input
        raise SpecError(f"data.path = {data.path!r}: cannot read it as {fmt}: {error}") from None


def _check_columns(data: DataSpec, fmt: str, ds: ray.data.Dataset) -> None:
    try:
        columns = ds.schema().names
    except Exception as error:
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
    fmt = data.resolved_format
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
