"""Storage through fsspec: local paths and URLs (s3://, gs://, memory://) behind one interface.

Why a module of its own: s3fs filesystems must not cross a fork (their event loop and sessions
break in DataLoader workers), so every process asks for its own, and every write that publishes
something goes through one atomic helper.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

T = TypeVar("T")

# Storage options read from the environment, so credentials and endpoints never sit in configs or logs.
_ENV_ENDPOINT = ("PATCHREC_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class StorageError(RuntimeError):
    """A storage URL that cannot be reached, read or written; the message names the URL."""


def default_storage_options(url: str) -> dict[str, Any]:
    """Options for URL's protocol taken from the environment (S3 endpoint override)."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    for var in _ENV_ENDPOINT:
        if os.environ.get(var):
            return {"client_kwargs": {"endpoint_url": os.environ[var]}}
    return {}


def merged_storage_options(url: str, options: dict[str, Any] | None) -> dict[str, Any]:
    merged = default_storage_options(url)
    merged.update(options or {})
    return merged


_FS_CACHE: dict[tuple, tuple[int, Any]] = {}


def filesystem_for(url: str, storage_options: dict[str, Any] | None = None):
    """(fs, path) for URL, one filesystem object per process.

    fsspec caches filesystem instances across a fork; an s3fs instance inherited by a DataLoader
    worker hangs or fails. The cache here is keyed by pid, and instances skip fsspec's own cache.
    """
    opts = merged_storage_options(url, storage_options)
    key = (url.split("://")[0] if "://" in url else "file", json.dumps(opts, sort_keys=True, default=str))
    pid = os.getpid()
    cached = _FS_CACHE.get(key)
    if cached is None or cached[0] != pid:
        fs, _ = url_to_fs(url, skip_instance_cache=True, **opts)
        _FS_CACHE[key] = (pid, fs)
    fs = _FS_CACHE[key][1]
    return fs, fs._strip_protocol(url) if "://" in url else os.path.abspath(url)


def join(base: str, *parts: str) -> str:
    if "://" in base:
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def with_retries(fn: Callable[[], T], what: str, attempts: int = 4, base_delay: float = 0.5) -> T:
    """Run fn, retrying transient storage errors (connection resets, throttling) with backoff.

    Missing files and permission errors are not transient: they raise at once.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except OSError as exc:
            if attempt == attempts - 1:
                raise StorageError(f"{what}: {exc}") from exc
            time.sleep(base_delay * 2**attempt)
    raise AssertionError("unreachable")


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem_for(url, storage_options)
    return with_retries(lambda: fs.cat_file(path), f"reading {url}")


def write_bytes_atomic(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Publish DATA at URL all at once: readers see the old object or the new one, never a part.

    Local files go through a temporary name and rename; an object store PUT is atomic by itself.
    """
    fs, path = filesystem_for(url, storage_options)
    if is_local(url):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with_retries(lambda: fs.pipe_file(path, data), f"writing {url}")


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem_for(url, storage_options)
    return with_retries(lambda: fs.exists(path), f"checking {url}")


def open_url(url: str, mode: str = "rb", storage_options: dict[str, Any] | None = None):
    fs, path = filesystem_for(url, storage_options)
    if "w" in mode and is_local(url):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return fs.open(path, mode)


def remove(url: str, storage_options: dict[str, Any] | None = None, recursive: bool = False) -> None:
    fs, path = filesystem_for(url, storage_options)
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass


def list_files(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Paths (relative to URL) of every file below URL; empty when URL does not exist."""
    fs, path = filesystem_for(url, storage_options)
    try:
        found = fs.find(path)
    except FileNotFoundError:
        return []
    root = path.rstrip("/") + "/"
    return sorted(p[len(root):] if p.startswith(root) else p for p in found)


def check_writable(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Fail early, naming the URL, when it cannot be written (no bucket, denied, bad endpoint)."""
    probe = join(url, f".write-probe-{os.getpid()}")
    try:
        fs, path = filesystem_for(probe, storage_options)
        if is_local(url):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        fs.pipe_file(path, b"")
        fs.rm(path)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot write there"
        raise StorageError(f"cannot write to {url}: {type(exc).__name__}: {exc}") from exc


__all__ = [
    "StorageError",
    "check_writable",
    "default_storage_options",
    "exists",
    "filesystem_for",
    "fsspec",
    "is_local",
    "join",
    "list_files",
    "open_url",
    "read_bytes",
    "remove",
    "with_retries",
    "write_bytes_atomic",
]
