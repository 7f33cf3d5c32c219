"""Storage through fsspec: local paths and URLs (s3://, gs://, memory://) behind one interface.

Why a module of its own: s3fs filesystems must not cross a fork (their event loop and sessions
break in DataLoader workers), so every process asks for its own, and every write that publishes
something goes through one atomic helper.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
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


# Ranged reads (read_ranged): the block size of one request, and the retry budget of each block.
# Module constants so a test (or a slow store) can change them.
RANGE_BYTES = 8 << 20
READ_ATTEMPTS = 5
READ_BACKOFF_S = 0.25  # first wait; doubled per attempt, with +-50 % jitter (many workers retry at once)

_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# Transient errors that are no OSError: botocore's connection/timeout family and aiohttp's, which
# s3fs lets through once its own retries are spent (matched by name: neither package is imported here).
_TRANSIENT_NAMES = {("botocore", "HTTPClientError"), ("botocore", "ResponseParserError"),
                    ("aiohttp", "ClientConnectionError"), ("aiohttp", "ClientPayloadError"),
                    ("http", "IncompleteRead")}


# errnos of answers a retry cannot change (s3fs maps a 4xx answer to these: 416 -> EINVAL, ...)
_PERMANENT_ERRNOS = {errno.EINVAL, errno.EPERM, errno.EACCES, errno.ENOSYS, errno.ENOENT, errno.EEXIST,
                     errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR, errno.EROFS}


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error may go away on a retry: connection resets, timeouts, throttling and
    5xx answers (s3fs raises OSError with EBUSY / EREMOTEIO / EIO for those), botocore/aiohttp
    connection errors. A missing object, a refused permission, a bad request (4xx) is permanent."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, OSError):
        return exc.errno not in _PERMANENT_ERRNOS
    return any((c.__module__.split(".")[0], c.__name__) in _TRANSIENT_NAMES for c in type(exc).__mro__)


def read_ranged(url: str, size: int | None = None, storage_options: dict[str, Any] | None = None,
                block: int | None = None) -> bytes:
    """The bytes of URL, expected to be SIZE long (a manifest's count; None asks the store).

    A remote object is read in ranged requests of `block` bytes (RANGE_BYTES), issued together
    (s3fs runs them concurrently); a range that fails with a transient error is retried on its
    own, with exponential backoff, up to READ_ATTEMPTS times, so one reset connection costs one
    block, not the shard. A missing object raises FileNotFoundError at once, without retries.
    The last range asks for one byte past SIZE: an object longer than expected comes back longer
    (and fails the caller's size check) instead of silently cut. Local files: one read.
    """
    fs, path = filesystem_for(url, storage_options)
    if is_local(url):
        return with_retries(lambda: fs.cat_file(path), f"reading {url}")
    if size is None:
        size = _retrying(lambda: fs.size(path), f"reading {url}")
    if size <= 0:
        return _retrying(lambda: fs.cat_file(path), f"reading {url}")
    block = max(1, block or RANGE_BYTES)
    starts = list(range(0, size, block))
    ends = [s + block for s in starts]
    ends[-1] = size + 1  # never a range that starts at the end (S3 answers 416 to those)
    parts: list[Any] = [None] * len(starts)
    for attempt in range(READ_ATTEMPTS):
        todo = [i for i, p in enumerate(parts) if not isinstance(p, bytes)]
        try:
            got = fs.cat_ranges([path] * len(todo), [starts[i] for i in todo], [ends[i] for i in todo],
                                on_error="return")
        except Exception as exc:  # noqa: BLE001 - the whole call failed: every range gets its error
            got = [exc] * len(todo)
        for i, part in zip(todo, got):
            parts[i] = part
        errors = [(i, p) for i, p in enumerate(parts) if not isinstance(p, bytes)]
        if not errors:
            return b"".join(parts)
        for i, err in errors:
            if not is_transient(err):
                if isinstance(err, FileNotFoundError):
                    raise FileNotFoundError(f"{url}: no such object") from err
                raise StorageError(f"reading {url} bytes {starts[i]}-{ends[i]}: {type(err).__name__}: {err}") \
                    from err
        if attempt < READ_ATTEMPTS - 1:
            time.sleep(READ_BACKOFF_S * 2**attempt * random.uniform(0.5, 1.5))
    i, err = errors[0]
    raise StorageError(f"reading {url} bytes {starts[i]}-{ends[i]}: still failing after {READ_ATTEMPTS} attempts: "
                       f"{type(err).__name__}: {err}") from err


def _retrying(fn: Callable[[], T], what: str) -> T:
    """fn() retried on transient errors (is_transient) with read_ranged's budget and backoff."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == READ_ATTEMPTS - 1:
                raise StorageError(f"{what}: {type(exc).__name__}: {exc}") from exc
            time.sleep(READ_BACKOFF_S * 2**attempt * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


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


def file_infos(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """{relative path: fsspec info (size, ETag or mtime, ...)} of every file below URL, listed
    afresh (s3fs caches listings); empty when URL does not exist."""
    fs, path = filesystem_for(url, storage_options)
    fs.invalidate_cache()
    try:
        found = with_retries(lambda: fs.find(path, detail=True), f"listing {url}")
    except FileNotFoundError:
        return {}
    root = path.rstrip("/") + "/"
    return {(p[len(root):] if p.startswith(root) else p): info for p, info in found.items()
            if info.get("type", "file") != "directory"}


def download_files(url: str, rels: Iterable[str], local_dir: str,
                   storage_options: dict[str, Any] | None = None) -> None:
    """Copy URL/REL to LOCAL_DIR/REL for every REL (relative paths with '/')."""
    fs, path = filesystem_for(url, storage_options)
    for rel in rels:
        dst = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        src = posixpath.join(path, rel)
        with_retries(lambda s=src, d=dst: fs.get_file(s, d), f"downloading {url}/{rel}")


def staging_root() -> str:
    """This node's folder for what remote runs keep locally: $PATCHREC_STAGING, else
    ~/.cache/patchrec_dist/staging."""
    return os.environ.get("PATCHREC_STAGING") or os.path.join(os.path.expanduser("~"), ".cache", "patchrec_dist",
                                                              "staging")


def cached_copy(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """A local folder with the files below URL, under staging_root()/downloads; reused while
    they are unchanged.

    The folder is named after URL and every file's size and version (ETag, mtime), so a remote
    folder that changed (a run exported again) gets a new copy rather than a stale one. It is
    filled under a temporary name and renamed when complete: a killed download or a concurrent
    one (another rank, another job) never leaves a partial folder under the name that is trusted.
    """
    infos = file_infos(url, storage_options)
    if not infos:
        raise FileNotFoundError(f"{url}: no such folder (or it is empty)")
    listing = {rel: [int(i.get("size") or 0), _version(i)] for rel, i in infos.items()}
    key = hashlib.sha256(json.dumps([url, listing], sort_keys=True).encode()).hexdigest()[:16]
    dest = os.path.join(staging_root(), "downloads", key)
    if os.path.isdir(dest):
        return dest
    tmp = f"{dest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        download_files(url, listing, tmp, storage_options)
        changed = [rel for rel, (size, _) in listing.items()
                   if os.path.getsize(os.path.join(tmp, *rel.split("/"))) != size]
        if changed:
            raise StorageError(f"downloading {url}: {changed[:3]} changed during the download; try again")
        try:
            os.rename(tmp, dest)
        except OSError:  # another process renamed its complete copy first: use that one
            if not os.path.isdir(dest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _version(info: dict[str, Any]) -> str:
    """What changes when a file is rewritten: its ETag on object stores, else its mtime."""
    return str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "")


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
    "cached_copy",
    "check_writable",
    "default_storage_options",
    "download_files",
    "exists",
    "file_infos",
    "filesystem_for",
    "fsspec",
    "is_local",
    "is_transient",
    "join",
    "list_files",
    "open_url",
    "read_bytes",
    "read_ranged",
    "remove",
    "staging_root",
    "with_retries",
    "write_bytes_atomic",
]
