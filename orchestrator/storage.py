"""Where runs live: a local path or an object-storage URI, through one pyarrow filesystem.

`s3://`, `gs://`, `abfs://` and `file://` resolve to pyarrow's own filesystems; any other scheme
that fsspec knows (`memory://`, `az://`, `hdfs://` with its extras ...) is wrapped in pyarrow's
fsspec handler. Ray Data, Ray Train and Ray Tune all take the same pyarrow filesystem, so every
stage reads and writes through it. Credentials come from each provider's standard environment
(for S3: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION` and, for
S3-compatible stores, `AWS_ENDPOINT_URL`), on every node that touches the run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs


class StorageError(ValueError):
    """A location that cannot be used: an unknown scheme, a bucket that does not answer."""


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


@dataclass(frozen=True)
class Location:
    """A place in storage: the filesystem, the path inside it, and the URI a user wrote."""

    fs: pafs.FileSystem
    path: str   # inside `fs`: "bucket/runs/x" for S3, an absolute path for local files
    uri: str    # what to print and to hand to another process: "s3://bucket/runs/x" or "/abs/x"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> Location:
        suffix = "/".join(p.strip("/") for p in parts if p)
        if not suffix:
            return self
        return Location(self.fs, f"{self.path.rstrip('/')}/{suffix}",
                        f"{self.uri.rstrip('/')}/{suffix}")

    def of(self, fs_path: str) -> Location:
        """Another path of the same filesystem (one that Ray Train or Tune returned)."""
        if self.is_local:
            return Location(self.fs, fs_path, fs_path)
        scheme = self.uri.split("://", 1)[0]
        return Location(self.fs, fs_path, f"{scheme}://{fs_path.lstrip('/')}")

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def kind(self) -> pafs.FileType:
        try:
            return self.fs.get_file_info(self.path).type
        except OSError as error:
            raise StorageError(f"cannot reach {self.uri}: {error}") from error

    def exists(self) -> bool:
        return self.kind() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.kind() == pafs.FileType.File

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as stream:
                return stream.readall()
        except FileNotFoundError:
            raise
        except OSError as error:
            if self.kind() == pafs.FileType.NotFound:
                raise FileNotFoundError(f"{self.uri} does not exist") from error
            raise StorageError(f"cannot read {self.uri}: {error}") from error

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Whole or not at all: an object store's put is atomic; a local file is written beside
        its target and renamed over it."""
        try:
            if self.is_local:
                target = Path(self.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                scratch = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
                scratch.write_bytes(data)
                os.replace(scratch, target)
                return
            with self.fs.open_output_stream(self.path) as stream:
                stream.write(data)
        except OSError as error:
            raise StorageError(f"cannot write {self.uri}: {error}") from error

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def entries(self) -> list[str]:
        """The names directly inside this folder ([] when it does not exist)."""
        if self.kind() != pafs.FileType.Directory:
            return []
        selector = pafs.FileSelector(self.path, recursive=False)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    def remove(self) -> None:
        """Delete this file or folder and everything under it; nothing if it does not exist."""
        kind = self.kind()
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif kind == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def upload(self, local_dir: str | Path) -> None:
        """Copy a local folder's files here (a no-op when this is that folder)."""
        if self.is_local and Path(self.path).resolve() == Path(local_dir).resolve():
            return
        self.fs.create_dir(self.path, recursive=True)
        pafs.copy_files(str(local_dir), self.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def download(self, local_dir: str | Path) -> None:
        pafs.copy_files(self.path, str(local_dir), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())

    @contextmanager
    def local_copy(self) -> Iterator[Path]:
        """This folder as a local folder to read: itself when local, else a temporary copy."""
        if self.is_local:
            yield Path(self.path)
            return
        if self.kind() != pafs.FileType.Directory:
            raise FileNotFoundError(f"{self.uri} does not exist")
        with tempfile.TemporaryDirectory(prefix="orchestrator-") as scratch:
            self.download(scratch)
            yield Path(scratch)

    @contextmanager
    def local_folder(self) -> Iterator[Path]:
        """A local folder to write into whose files replace this folder's when the block ends
        without error; on an error this folder is left as it was. A reader never finds it missing
        or half written: a local folder is written beside it and swapped in by two renames; in
        object storage each object is replaced by the upload (a put is atomic), then the objects
        the new contents lack are removed."""
        if self.is_local:
            target = Path(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.with_name(f".{target.name}.new-{uuid.uuid4().hex[:8]}")
            staging.mkdir()
            try:
                yield staging
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            if target.exists():
                target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
            return
        with tempfile.TemporaryDirectory(prefix="orchestrator-") as scratch:
            yield Path(scratch)
            self.upload(scratch)
            written = {str(path.relative_to(scratch)) for path in Path(scratch).rglob("*")
                       if path.is_file()}
            self._remove_files_except(written)

    def _remove_files_except(self, kept: set[str]) -> None:
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File and \
                    info.path[len(self.path):].lstrip("/") not in kept:
                self.fs.delete_file(info.path)


def resolve(location: str | os.PathLike | Location) -> Location:
    """The filesystem and path of a local path or a URI; StorageError names what is wrong."""
    if isinstance(location, Location):
        return location
    text = str(location)
    if not is_uri(text):
        path = str(Path(text).expanduser().absolute())
        return Location(pafs.LocalFileSystem(), path, path)
    scheme = text.split("://", 1)[0]
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except pa.ArrowInvalid:
        fs, path = _fsspec(text, scheme)
    except (OSError, ValueError) as error:
        raise StorageError(f"cannot open {text}: {error}") from error
    if isinstance(fs, pafs.LocalFileSystem):
        return Location(fs, path, path)
    return Location(fs, path.rstrip("/"), text.rstrip("/"))


def _fsspec(uri: str, scheme: str) -> tuple[pafs.FileSystem, str]:
    import fsspec

    try:
        filesystem, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as error:
        raise StorageError(
            f"{uri}: no filesystem knows the scheme {scheme!r} ({error}); use a local path or a "
            "URI such as s3://bucket/path, gs://bucket/path or abfs://container@account/path"
        ) from error
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), path


def check_writable(location: Location) -> None:
    """Write and delete a marker, so that a missing bucket or missing credentials fail before
    any work starts, naming the URI."""
    probe = location.join(f".orchestrator-probe-{uuid.uuid4().hex}")
    try:
        probe.write_bytes(b"")
        probe.fs.delete_file(probe.path)
    except (StorageError, OSError) as error:
        cause = error.__cause__ or error
        raise StorageError(
            f"cannot write to {location.uri}: {cause}. Check that the bucket exists and that "
            "this machine has credentials for it (for S3: AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, and AWS_ENDPOINT_URL for an S3-compatible store)"
        ) from error

