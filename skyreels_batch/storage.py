"""Local paths and fsspec URLs (s3://, gs://, file://) behind one small interface.

S3 goes through s3fs, which honours AWS_ENDPOINT_URL and the standard AWS_* credential variables. pyarrow is
given the same fsspec filesystem (its own S3 client ignores AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import contextlib
import fcntl
import mimetypes
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem


def normalize(uri: str) -> str:
    """Local paths become absolute (Ray workers do not share the driver's working directory)."""
    if "://" in uri and not uri.startswith("file://"):
        return uri.rstrip("/")
    path = uri.removeprefix("file://")
    return os.path.abspath(os.path.expanduser(path))


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    if is_local(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Make `data` appear at `uri` whole or not at all.

    Locally: write a hidden sibling, then rename over the target. On object stores a single PUT is already
    atomic: readers see the old object, no object, or the complete new one.
    """
    fs, path = filesystem(uri)
    if not is_local(fs):
        # A Content-Type, so a bucket serves the gallery's page as a page and its videos as videos.
        content_type = mimetypes.guess_type(path)[0]
        s3 = "s3" in fs.protocol and content_type is not None
        fs.pipe_file(path, data, **({"ContentType": content_type} if s3 else {}))
        return
    fs.makedirs(fs._parent(path), exist_ok=True)
    staging = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.partial")
    try:
        with open(staging, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def remove_tree(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files directly under a directory URI, as URIs."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    names = [info["name"] for info in fs.ls(path, detail=True) if info["type"] == "file"]
    fs.invalidate_cache(path)  # the next listing sees what changed since (s3fs keeps listings otherwise)
    return [join(uri, name.rsplit("/", 1)[-1]) for name in sorted(names) if name.endswith(suffix)]


def list_names(uri: str, suffix: str = "") -> list[str]:
    """Names of the entries directly under a directory URI that end with `suffix`: no stat and no dict per entry,
    so a million-video folder lists in a few hundred MB less than `list_files` would take."""
    fs, path = filesystem(uri)
    if is_local(fs):
        try:
            with os.scandir(path) as entries:
                return sorted(entry.name for entry in entries if entry.name.endswith(suffix))
        except FileNotFoundError:
            return []
    names = [name.rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)] if fs.exists(path) else []
    fs.invalidate_cache(path)  # s3fs would otherwise keep the whole listing for the life of the process
    return sorted(name for name in names if name.endswith(suffix))


def remove_files(uris: list[str]) -> None:
    """Remove files, one request per thousand on object stores; files already gone are fine."""
    if not uris:
        return
    fs, _ = filesystem(uris[0])
    paths = [filesystem(uri)[1] for uri in uris]
    if is_local(fs):
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        return
    fs.rm(paths)


def remove_empty_dir(uri: str) -> None:
    """Local directories only; object stores have no empty directories to leave behind."""
    fs, path = filesystem(uri)
    if is_local(fs) and os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)


@contextlib.contextmanager
def local_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock between the processes of this host on a local file (flock: released by the kernel if the
    holder dies). The lock file stays: removing it would race the processes waiting on it."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
