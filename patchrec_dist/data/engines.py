"""Where the passes of the bounded-memory sharding pipeline (bucketed.py) run, and where its buckets live.

Two engines, one pipeline: every pass is `executor.map(task, [args, ...])` over module-level task
functions of bucketed.py, and every task reaches the bucket files through a `Staging` it is given.

* `LocalExecutor` (--engine local, the default): this machine's spawned processes
  (ProcessPoolExecutor), buckets in a local folder.
* `RayExecutor` (--engine ray): the tasks of an existing Ray cluster (`ray.init(address=...)`), each
  retried by Ray when its worker dies (`max_retries`) or when it fails on a storage error; buckets in
  a staging folder under the output store (`<output>/_staging-<id>/` on S3, through fsspec), since
  no node's local disk is seen by the others. The storage options (endpoint, credentials) go to
  each task with its arguments: the workers' own environment is not relied on.

Every task writes whole files (a local file through a temporary name, an object with one PUT), so a
retried task overwrites what its failed attempt wrote; the driver removes the staging folder at the
end, success or failure, and writes the manifest last (sharding.publish).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

from patchrec_dist.data import storage

ENGINES = ("local", "ray")
# Attempts after the first that Ray makes for a task whose worker died or that raised a storage error.
RAY_MAX_RETRIES = 3
# Test-only fault injection (--engine ray; tests/test_sharding_ray.py), read by the driver and handed to
# the tasks: a task of a named stage (comma-separated: partition, merge, clean, histogram, order, shard)
# dies like a lost worker (os._exit) on its first attempt (ONCE: a marker file in the staging folder
# remembers it) or on every attempt (ALWAYS).
FAIL_ONCE_ENV = "PATCHREC_TEST_FAIL_ONCE"
FAIL_ALWAYS_ENV = "PATCHREC_TEST_FAIL_ALWAYS"
IPC_OPTIONS = ipc.IpcWriteOptions(compression="lz4")


class EngineError(RuntimeError):
    """The engine could not run a task (after its retries), or could not be reached."""


# ---------------------------------------------------------------------------------------------
# staging: the bucket files, in a local folder or under a URL


@dataclass(frozen=True)
class Staging:
    """A folder (local path or fsspec URL) for the run's intermediate files, named relative to it."""

    root: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    fault: tuple[tuple[str, ...], str] | None = None  # test hook: (stages, "once" | "always")

    @property
    def local(self) -> bool:
        return storage.is_local(self.root)

    def path(self, name: str) -> str:
        return storage.join(self.root, name)

    def open_read(self, name: str):
        if self.local:
            return pa.OSFile(self.path(name))
        return storage.open_url(self.path(name), "rb", self.storage_options)

    def writer(self, name: str) -> _AtomicWriter:
        return _AtomicWriter(self, name)

    def read_ipc(self, name: str, columns: list[str] | None = None) -> pl.DataFrame:
        with self.open_read(name) as src:
            reader = ipc.open_file(src)
            if columns is not None:  # read only these columns' buffers
                names = reader.schema.names
                reader = ipc.open_file(src, options=ipc.IpcReadOptions(
                    included_fields=[names.index(c) for c in columns]))
            table = reader.read_all()
        return pl.from_arrow(table)

    def write_ipc(self, name: str, df: pl.DataFrame, schema: pa.Schema | None = None) -> None:
        table = df.to_arrow()
        if schema is not None:
            table = table.cast(schema)
        with self.writer(name) as f, ipc.new_file(f, table.schema, options=IPC_OPTIONS) as w:
            w.write_table(table)

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.writer(name) as f:
            f.write(data)

    def read_bytes(self, name: str) -> bytes:
        return storage.read_bytes(self.path(name), self.storage_options)

    def read_array(self, name: str, dtype, offset: int, count: int) -> np.ndarray:
        """COUNT values of DTYPE from element OFFSET of a flat array file."""
        size = np.dtype(dtype).itemsize
        if self.local:
            return np.fromfile(self.path(name), dtype=dtype, count=count, offset=size * offset)
        fs, path = storage.filesystem_for(self.path(name), self.storage_options)
        data = storage.with_retries(lambda: fs.cat_file(path, start=size * offset, end=size * (offset + count)),
                                    f"reading {self.path(name)}")
        return np.frombuffer(data, dtype=dtype)

    def remove(self, names: Iterable[str]) -> None:
        names = list(names)
        if self.local:
            for n in names:
                try:
                    os.remove(self.path(n))
                except FileNotFoundError:
                    pass
        elif names:
            fs, _ = storage.filesystem_for(self.root, self.storage_options)
            paths = [storage.filesystem_for(self.path(n), self.storage_options)[1] for n in names]
            storage.with_retries(lambda: fs.rm(paths), f"removing files under {self.root}")

    def remove_all(self) -> None:
        if self.local:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            storage.remove(self.root, self.storage_options, recursive=True)

    def check_fault(self, stage: str) -> None:
        """Test hook (engines other than local only): die like a lost worker in a task of STAGE."""
        if self.fault is None or stage not in self.fault[0]:
            return
        if self.fault[1] == "once":
            marker = f"_fault-{stage}"
            if storage.exists(self.path(marker), self.storage_options):
                return
            self.write_bytes(marker, b"")
        os._exit(17)


class _AtomicWriter:
    """A binary file that appears whole at close: a temporary name and a rename on local disk; an object
    store's upload is committed at close. A retried task's file replaces its failed attempt's."""

    def __init__(self, staging: Staging, name: str) -> None:
        self.final = staging.path(name)
        if staging.local:
            self.tmp = f"{self.final}.tmp-{os.getpid()}"
            self.f = pa.OSFile(self.tmp, "wb")
        else:
            self.tmp = None
            self.f = storage.open_url(self.final, "wb", staging.storage_options)

    def __enter__(self):
        return self.f

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.tmp is not None:
            self.f.close()
            os.remove(self.tmp)
            return
        self.f.close()
        if self.tmp is not None:
            os.replace(self.tmp, self.final)


def local_staging(folder: str | None) -> Staging:
    import tempfile

    return Staging(tempfile.mkdtemp(prefix="shard-buckets-", dir=folder))


def store_staging(output: str, storage_options: dict[str, Any], staging: str | None) -> Staging:
    """A staging folder every node reaches: under --staging when given (a URL or shared path), else
    under the output itself."""
    base = (staging or output).rstrip("/")
    root = storage.join(base, f"_staging-{uuid.uuid4().hex[:12]}")
    fault = None
    for env, mode in ((FAIL_ONCE_ENV, "once"), (FAIL_ALWAYS_ENV, "always")):
        if os.environ.get(env):
            fault = (tuple(x.strip() for x in os.environ[env].split(",")), mode)
    if storage.is_local(root):
        os.makedirs(root, exist_ok=True)
    return Staging(root, storage_options, fault)


def explicit_storage_options(url: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The options this process would use for URL, with the S3 endpoint and credentials of its
    environment written out, so that tasks on other machines use the same ones."""
    opts = storage.merged_storage_options(url, options)
    if url.startswith(("s3://", "s3a://")):
        for key, env in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"),
                         ("token", "AWS_SESSION_TOKEN")):
            if key not in opts and os.environ.get(env):
                opts[key] = os.environ[env]
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            client = dict(opts.get("client_kwargs") or {})
            client.setdefault("region_name", region)
            opts["client_kwargs"] = client
    return opts


# ---------------------------------------------------------------------------------------------
# executors


def _groups(buckets: list[tuple[str, int]], n: int) -> list[list[str]]:
    """Buckets dealt to N groups, the largest first (each group's results are summed)."""
    groups: list[list[str]] = [[] for _ in range(min(n, len(buckets)) or 1)]
    load = [0] * len(groups)
    for path, rows in sorted(buckets, key=lambda x: -x[1]):
        g = load.index(min(load))
        groups[g].append(path)
        load[g] += rows
    return groups


class LocalExecutor:
    """WORKERS spawned processes (or this one for 1)."""

    name = "local"

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        # spawn, not fork: polars' thread pool and s3fs sessions do not survive a fork
        self._pool = (ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
                      if self.workers > 1 else None)

    def map(self, fn: Callable, argss: Iterable[tuple]) -> Iterator:
        """FN(*args) for each of ARGSS, results in that order. On a failure the tasks not yet started
        are cancelled and the running ones awaited before it is raised (nothing writes after it)."""
        if self._pool is None:
            for args in argss:
                yield fn(*args)
            return
        futures = [self._pool.submit(fn, *args) for args in argss]
        try:
            for f in futures:
                yield f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            wait(futures)
            raise

    def share(self, obj: Any) -> Any:
        return obj

    def groups(self, buckets: list[tuple[str, int]]) -> list[list[str]]:
        return _groups(buckets, self.workers)

    def summary(self) -> str:
        return f"{self.workers} local process(es)"

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _ray_call(fn: Callable, *args) -> tuple[str, Any]:
    import ray

    return ray.get_runtime_context().get_node_id(), fn(*args)


class RayExecutor:
    """The tasks of an existing Ray cluster; each retried by Ray up to RAY_MAX_RETRIES times."""

    name = "ray"

    def __init__(self, address: str, window: int = 0) -> None:
        try:
            import ray
        except ImportError:
            raise EngineError("--engine ray: ray is not installed here (pip install 'patchrec_dist[ray]')") from None
        self._ray = ray
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                     configure_logging=True)
        except Exception as exc:  # noqa: BLE001 - ray raises ConnectionError, RuntimeError, ValueError ...
            raise EngineError(f"--engine-address {address}: cannot connect to a Ray cluster there: {exc}") from None
        from patchrec_dist.data.storage import StorageError

        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.window = window or 2 * self.workers
        self._remote = ray.remote(_ray_call)
        self._options = {"num_cpus": 1, "max_retries": RAY_MAX_RETRIES, "retry_exceptions": [OSError, StorageError],
                         "scheduling_strategy": "SPREAD"}
        self.nodes: set[str] = set()
        self.tasks = 0

    def map(self, fn: Callable, argss: Iterable[tuple]) -> Iterator:
        """FN(*args) as Ray tasks, at most WINDOW in flight, results in order."""
        ray = self._ray
        pending: list = []
        it = iter(argss)
        more = True
        try:
            while more or pending:
                while more and len(pending) < self.window:
                    try:
                        args = next(it)
                    except StopIteration:
                        more = False
                        break
                    pending.append(self._remote.options(name=fn.__name__, **self._options).remote(fn, *args))
                if pending:
                    node, result = ray.get(pending.pop(0))
                    self.nodes.add(node)
                    self.tasks += 1
                    yield result
        except BaseException as exc:
            self._cancel(pending)
            if isinstance(exc, ray.exceptions.RayTaskError):
                cause = exc.cause
                from patchrec_dist.data.readers import InputError

                if isinstance(cause, InputError):
                    raise InputError(str(cause)) from None
                raise EngineError(f"a {fn.__name__} task failed (after up to {RAY_MAX_RETRIES} retries): "
                                  f"{type(cause).__name__}: {cause}") from None
            if isinstance(exc, ray.exceptions.RayError):
                raise EngineError(f"a {fn.__name__} task failed (after up to {RAY_MAX_RETRIES} retries): "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
            raise

    def _cancel(self, refs: list) -> None:
        """Stop the tasks still in flight and wait for them, so none writes after the driver cleans up."""
        for ref in refs:
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished
                pass
        if refs:
            self._ray.wait(refs, num_returns=len(refs), timeout=30)

    def share(self, obj: Any) -> Any:
        """One copy of OBJ in the object store, passed to many tasks by reference."""
        return self._ray.put(obj)

    def groups(self, buckets: list[tuple[str, int]]) -> list[list[str]]:
        return _groups(buckets, self.workers)

    def summary(self) -> str:
        return f"{self.tasks} Ray tasks on {len(self.nodes)} node(s)"

    def close(self) -> None:
        self._ray.shutdown()
