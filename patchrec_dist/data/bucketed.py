"""Bounded-memory sharding: the same data set as `sharding.shard_log`, byte for byte, with a working
set that does not grow with the log.

Why this engine: polars on bounded pieces, pyarrow IPC files for the buckets, numpy for the runs.
The output must be byte-identical to the in-memory path, whose semantics are polars' (id and time
normalisation, a stable sort that keeps input order on ties, polars' string order, its duplicate
detection). Running the same polars code on pieces whose size we choose gives those semantics for
free and an explicit memory bound (piece size x bytes per row), with no new dependency; DuckDB or
polars' streaming engine would bound memory too, but would re-implement the ordering and
normalisation rules in SQL or lazy plans that we would then have to prove equal.

Memory model (docs/data_format.md, "Memory"):

* bounded by --memory-limit: an input chunk (read), one bucket per worker (dedupe, k-core rounds,
  quantile histograms, sort), one window of a shard per worker (write);
* O(items): the catalog, item counts, the item mask and renumbering table (driver, and workers);
* O(users): one small row per user (key, bucket, start, length, split ranges) in the driver, to
  put all users in the global key order that fixes sample keys and shard boundaries;
* never O(interactions): interactions live on local disk, in hash buckets of the user.

Stages:
  A  stream the input once in chunks: normalise, --min-rating, join the catalog (unknown items),
     hash the user into one of B buckets (Arrow IPC files, appended chunk by chunk, so a bucket
     stays in input order);
  B  per bucket: duplicates (within a user, so within a bucket), then k-core rounds: each round
     is one pass over the buckets with the item counts of the previous one;
  C  global-time: the two cut points of the time quantiles by radix selection (a few passes of
     histograms over (time, input row); no pass holds more than one bucket);
  D  per bucket: sort by (user, time, row), write the bucket's items and times as flat arrays in
     that order, and a table of its users (key, start, length, split ranges);
  E  driver: all users in key order (O(users)); shard boundaries as the in-memory path cuts them;
  F  per shard, in parallel: its users' slices, read from the bucket arrays window by window.

The number of buckets and of workers changes nothing in the output (tests/test_sharding_bounded.py).

Engines (engines.py): every stage's per-bucket and per-shard work is a module-level task function run
through an executor (`pool.map`): this machine's spawned processes (--engine local) or the tasks of an
existing Ray cluster (--engine ray; then stage A's chunks are partitioned in tasks too, and the bucket
files live in a staging folder under the output store). Tasks reach the files through the `Staging`
they are handed; the driver keeps stage E, the catalog and the manifest (tests/test_sharding_ray.py:
the same bytes on both engines).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
from tqdm import tqdm

from patchrec_dist.data import storage
from patchrec_dist.data.engines import (
    ENGINES,
    IPC_OPTIONS,
    LocalExecutor,
    RayExecutor,
    Staging,
    explicit_storage_options,
    local_staging,
    store_staging,
)
from patchrec_dist.data.manifest import SPLITS, Manifest, ShardInfo
from patchrec_dist.data.readers import (
    InputError,
    RawLog,
    _items,
    _read_table_file,
    decode_strict,
    normalise_ids,
    normalise_ratings,
    normalise_times,
)
from patchrec_dist.data.sharding import (
    FastTarWriter,
    ShardOptions,
    _dense_item_index,
    _kept_ranges,
    _leave_one_out_ranges,
    add_sample,
    boundaries_from_lengths,
    check_output,
    drop_duplicates,
    examples_from_ranges,
    publish,
)

# Working set of one interaction while a bucket is processed (read, dedupe hash, sort and gather,
# the flat arrays), measured with bench/shard.py; buckets are sized from it.
BYTES_PER_ROW = 160
# An input chunk holds the raw columns, the normalised ones and the partitions: more per row.
_READ_BYTES_PER_ROW = 400
DEFAULT_MEMORY_FRACTION = 0.5
_RADIX_BITS = 20
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


@dataclass
class BucketOptions:
    memory_limit: int | None = None  # bytes for the whole run's working set; None: a fraction of the machine
    buckets: int = 0  # 0: from the log's size and the memory limit
    staging: str | None = None  # folder for bucket files (local engine: the system's temp folder; ray: under --output)
    engine: str = "local"  # where the passes run: "local" (this machine's processes) or "ray" (engines.py)
    engine_address: str | None = None  # ray: the cluster's address (ray.init(address=...))
    ran_on: str = ""  # set by the run: where its tasks ran, for the tool's last line

    def limit(self) -> int:
        return self.memory_limit or int(machine_memory() * DEFAULT_MEMORY_FRACTION)


def parse_size(text: str, flag: str = "--memory-limit") -> int:
    """'4GB' -> 4 * 2**30; plain numbers are bytes."""
    t = str(text).strip().upper().replace("IB", "B")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?B?)", t)
    if not m:
        raise InputError(f"{flag} {text!r}: a size such as 4GB, 512MB or a number of bytes")
    mult = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30,
            "T": 2**40, "TB": 2**40}[m.group(2)]
    value = int(float(m.group(1)) * mult)
    if value <= 0:
        raise InputError(f"{flag} {text!r}: must be more than 0 bytes")
    return value


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TB"


def machine_memory() -> int:
    """Physical memory, or the cgroup's limit when it is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


# ---------------------------------------------------------------------------------------------
# input: a log as a stream of normalised chunks


@dataclass
class LogSource:
    """What stage A reads: the catalog (O(items)) and the interactions as chunks, each a frame of
    user, item_key, time, row (Int64, the input row), and rating / split when present."""

    items: pl.DataFrame
    chunks: Callable[[int], Iterator[pl.DataFrame]]  # chunk rows -> chunks in input order
    estimated_rows: int
    has_timestamps: bool = True
    has_rating: bool = False
    user_text: bool = False  # user ids may be text: stored as text, integer order only if all are integers
    split_labels: bool = False  # chunks carry `split` (Int8 code, null: history only): the table's own split
    split_col: str = "split"  # the column that held it, for messages
    splits: pl.DataFrame | None = None  # kept ranges of an in-memory reader (patchrec)
    sources: dict[str, str] = field(default_factory=dict)
    prompt: dict[str, str] | None = None


def source_from_rawlog(log: RawLog) -> LogSource:
    """A log an in-memory reader returned (recbole, movielens, patchrec, JSONL tables), in slices."""
    inter = log.interactions

    def chunks(rows: int) -> Iterator[pl.DataFrame]:
        for start in range(0, inter.height, rows):
            yield inter.slice(start, rows).with_columns(pl.col("row").cast(pl.Int64))

    return LogSource(items=log.items, chunks=chunks, estimated_rows=inter.height, has_timestamps=log.has_timestamps,
                     has_rating="rating" in inter.columns, user_text=inter["user"].dtype == pl.Utf8,
                     splits=log.splits, sources=log.sources or {}, prompt=log.prompt)


def streams_table(path: str) -> bool:
    return path.lower().endswith((".parquet", ".pq", ".csv", ".tsv", ".txt"))


def _offset_rows(exc: InputError, path: str, offset: int, word: str = "row") -> InputError:
    """A reader's message names the row inside a chunk: name the row of the file instead."""
    prefix = f"{path}: {word} "
    text = str(exc)
    if offset and text.startswith(prefix):
        m = re.match(r"(\d+)", text[len(prefix):])
        if m:
            text = prefix + str(int(m.group(1)) + offset) + text[len(prefix) + len(m.group(1)):]
    return InputError(text)


def source_from_table(path: str, items_path: str | None, user_col: str, item_col: str, time_col: str,
                      rating_col: str | None, items_item_col: str | None, title_col: str, encoding: str,
                      storage_options=None, split_col: str | None = None) -> LogSource:
    """A Parquet, CSV or TSV interactions table read in chunks (never whole), plus its items table."""
    if not items_path:
        raise InputError("--items: the table format needs an items table with ids and titles")
    needed = [user_col, item_col, time_col] + ([rating_col] if rating_col else []) + ([split_col] if split_col else [])
    hint = "--user-col/--item-col/--time-col/--rating-col/--split-col"
    lower = path.lower()
    try:
        fs, fpath = storage.filesystem_for(path, storage_options)
        size = fs.size(fpath)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    if lower.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        try:
            with fs.open(fpath, "rb") as fh:
                meta = pq.ParquetFile(fh)
                columns, total = meta.schema_arrow.names, meta.metadata.num_rows
                user_type = meta.schema_arrow.field(user_col).type if user_col in columns else None
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{path}: cannot parse: {exc}") from None
        _missing(columns, needed, path, hint)
        user_text = not (pa.types.is_integer(user_type) or pa.types.is_floating(user_type))

        def raw_chunks(rows: int) -> Iterator[pl.DataFrame]:
            with fs.open(fpath, "rb") as fh:
                try:
                    for batch in pq.ParquetFile(fh).iter_batches(batch_size=rows, columns=needed):
                        yield pl.from_arrow(batch)
                except (pa.ArrowException, OSError) as exc:
                    raise InputError(f"{path}: cannot parse: {exc}") from None
        estimated = total
    elif lower.endswith((".csv", ".tsv", ".txt")):
        sep = "\t" if lower.endswith(".tsv") else ","
        with fs.open(fpath, "rb") as fh:
            header = fh.readline()
        columns = _parse_csv(decode_strict(header, path, encoding), path, sep).columns
        _missing(columns, needed, path, hint)
        user_text = True

        def raw_chunks(rows: int) -> Iterator[pl.DataFrame]:
            yield from _csv_chunks(fs, fpath, path, sep, encoding, rows, needed)
        estimated = max(1, size // 16)
    else:
        raise InputError(f"{path}: unknown table type; use .csv, .tsv, .parquet or .jsonl")

    def chunks(rows: int) -> Iterator[pl.DataFrame]:
        offset = 0
        for raw in raw_chunks(rows):
            try:
                cols = [normalise_ids(raw[user_col], path, user_col).alias("user"),
                        normalise_ids(raw[item_col], path, item_col).alias("item_key"),
                        normalise_times(raw[time_col], path, time_col)]
                if rating_col:
                    cols.append(normalise_ratings(raw[rating_col], path, rating_col))
                if split_col:
                    cols.append(_split_codes(raw[split_col], path, split_col))
            except InputError as exc:
                raise _offset_rows(exc, path, offset) from None
            df = pl.DataFrame(cols).with_columns(row=pl.int_range(offset, offset + raw.height, dtype=pl.Int64))
            offset += raw.height
            yield df

    dt = _read_table_file(items_path, encoding, storage_options)
    key_col = items_item_col or item_col
    _missing(dt.columns, [key_col, title_col], items_path, "--items-item-col/--title-col")
    items = _items(items_path, dt[key_col], dt[title_col], dt.drop([key_col, title_col]), key_col, title_col)
    return LogSource(items=items, chunks=chunks, estimated_rows=estimated, has_rating=bool(rating_col),
                     user_text=user_text, split_labels=bool(split_col), split_col=split_col or "split",
                     sources={"interactions": path, "items": items_path})


def _missing(columns: list[str], needed: list[str], path: str, hint: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing} ({hint}); columns present: {list(columns)}")


def _parse_csv(text: str, path: str, sep: str) -> pl.DataFrame:
    try:
        return pl.read_csv(io.StringIO(text), separator=sep, infer_schema=False)
    except pl.exceptions.PolarsError as exc:
        raise InputError(f"{path}: cannot parse: {exc}") from None


def _csv_chunks(fs, fpath: str, path: str, sep: str, encoding: str, rows: int,
                needed: list[str]) -> Iterator[pl.DataFrame]:
    """Blocks of whole lines, each decoded strictly (errors name the file's line) and parsed with the
    header; about ROWS rows each. A quoted field holding a line break is not split correctly."""
    block = max(1 << 16, rows * 32)
    with fs.open(fpath, "rb") as fh:
        header = fh.readline()
        lines_before, rest = 1, b""
        while True:
            data = fh.read(block)
            buf = rest + data
            if not data:
                if buf.strip():
                    yield _csv_block(header, buf, path, sep, encoding, lines_before, needed)
                return
            cut = buf.rfind(b"\n")
            if cut < 0:
                rest = buf
                continue
            piece, rest = buf[: cut + 1], buf[cut + 1:]
            yield _csv_block(header, piece, path, sep, encoding, lines_before, needed)
            lines = piece.count(b"\n")
            lines_before += lines
            block = max(1 << 16, rows * max(1, len(piece) // max(1, lines)))  # about ROWS lines a block


def _csv_block(header: bytes, piece: bytes, path: str, sep: str, encoding: str, lines_before: int,
               needed: list[str]) -> pl.DataFrame:
    try:
        text = decode_strict(piece, path, encoding)
    except InputError as exc:
        raise _offset_rows(exc, path, lines_before, "line") from None
    return _parse_csv(decode_strict(header, path, encoding) + text, path, sep).select(needed)


def _split_codes(labels: pl.Series, path: str, column: str) -> pl.Series:
    """A table's split column as codes 0/1/2 (null: history only); a bad label names its row."""
    text = labels.cast(pl.Utf8).str.strip_chars()
    text = text.set(text == "", None)
    bad = text.is_not_null() & ~text.is_in(list(_SPLIT_CODE))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0]) + 1
        raise InputError(f"{path}: row {row}, column '{column}': split {text[row - 1]!r} is not one of "
                         f"train, val, test (or empty for a history-only row)")
    return text.replace_strict(_SPLIT_CODE, default=None, return_dtype=pl.Int8).alias("split")


# ---------------------------------------------------------------------------------------------
# bucket files


def _bucket_schema(source: LogSource) -> pa.Schema:
    fields = [pa.field("user", pa.large_string() if source.user_text else pa.int64()),
              pa.field("item", pa.int32()), pa.field("time", pa.int64()), pa.field("row", pa.int64())]
    if source.split_labels:
        fields.append(pa.field("split", pa.int8()))
    return pa.schema(fields)


def _bucket_of(users: pl.Series, buckets: int, seed: int) -> pl.Series:
    return (users.hash(seed=seed) % buckets).cast(pl.Int32).alias("_b")


class _BucketWriters:
    """One Arrow IPC file per bucket, appended chunk by chunk (so each stays in input order)."""

    def __init__(self, staging: Staging, prefix: str, buckets: int, schema: pa.Schema) -> None:
        self.staging = staging
        self.names = [f"{prefix}{b:05d}.arrow" for b in range(buckets)]
        self.rows = [0] * buckets
        self.schema = schema
        self._writers: dict[int, Any] = {}

    def write(self, b: int, df: pl.DataFrame) -> None:
        if df.height == 0:
            return
        w = self._writers.get(b)
        if w is None:
            f = self.staging.writer(self.names[b])
            w = self._writers[b] = (f, ipc.new_file(f.__enter__(), self.schema, options=IPC_OPTIONS))
        w[1].write_table(df.to_arrow().cast(self.schema))
        self.rows[b] += df.height

    def close(self) -> list[tuple[str, int]]:
        for f, w in self._writers.values():
            w.close()
            f.__exit__(None, None, None)
        return [(p, n) for p, n in zip(self.names, self.rows) if n]


def _read_bucket(staging: Staging, name: str, columns: list[str] | None = None) -> pl.DataFrame:
    return staging.read_ipc(name, columns)


def _write_bucket(staging: Staging, name: str, df: pl.DataFrame, schema: pa.Schema) -> None:
    staging.write_ipc(name, df, schema)


# ---------------------------------------------------------------------------------------------
# worker tasks (module-level: they run in spawned processes)


def _task_clean(staging: Staging, paths: list[str], dedupe_keys: list[str] | None, item_alive: np.ndarray | None,
                min_user: int, n_items: int, schema: pa.Schema) -> tuple[int, np.ndarray, list[int]]:
    """Duplicates and/or one k-core round over each bucket; rewrites a bucket that changed (a retry
    reads the rewritten bucket: both steps leave a bucket they already cleaned as it is).
    Returns (rows left, item counts, rows left per bucket)."""
    staging.check_fault("clean")
    total, counts, rows = 0, np.zeros(n_items, dtype=np.int64), []
    for path in paths:
        df = _read_bucket(staging, path)
        before = df.height
        if dedupe_keys:
            df = drop_duplicates(df, dedupe_keys)
        if item_alive is not None:
            df = df.filter(pl.Series(item_alive[df["item"].to_numpy()]))
        if min_user > 1:
            df = df.filter(pl.len().over("user") >= min_user)
        if df.height != before:
            _write_bucket(staging, path, df, schema)
        total += df.height
        rows.append(df.height)
        counts += np.bincount(df["item"].to_numpy(), minlength=n_items)
    return total, counts, rows


def _task_histogram(staging: Staging, paths: list[str], specs: list[tuple]) -> list[tuple[int, np.ndarray]]:
    """For each spec (column, time_equals, lo, hi, shift): (values < lo, histogram of (v - lo) >> shift
    over [lo, hi]), among the rows whose time equals time_equals when that is not None."""
    staging.check_fault("histogram")
    out = [(0, np.zeros(((hi - lo) >> shift) + 1, dtype=np.int64)) for _, _, lo, hi, shift in specs]
    for path in paths:
        df = _read_bucket(staging, path, ["time", "row"])
        t, r = df["time"].to_numpy(), df["row"].to_numpy()
        for k, (col, teq, lo, hi, shift) in enumerate(specs):
            v = t if col == "time" else r
            if teq is not None:
                v = v[t == teq]
            below, hist = out[k]
            inside = v[(v >= lo) & (v <= hi)]
            hist += np.bincount((inside - lo) >> shift, minlength=len(hist))
            out[k] = (below + int((v < lo).sum()), hist)
    return out


def _task_order(staging: Staging, path: str, run_prefix: str, lut_path: str, sort_int: bool, has_times: bool,
                cuts: list[tuple[int, int]] | None, split_labels: bool) -> tuple[int, tuple | None]:
    """Sort one bucket into its users' histories; write items / times as flat arrays in that order and a
    table of its users. Returns (users, the first non-consecutive split of a user, or None)."""
    staging.check_fault("order")
    if staging.local:
        lut = np.load(staging.path(lut_path), mmap_mode="r")
    else:
        lut = np.load(io.BytesIO(staging.read_bytes(lut_path)))
    df = _read_bucket(staging, path)
    sort_key = pl.col("user").cast(pl.Int64) if sort_int else pl.col("user")
    df = df.with_columns(_k=sort_key).sort(["_k", "time", "row"] if has_times else ["_k", "row"])
    uidx = df.select(pl.col("_k").rle_id()).to_series().to_numpy()
    n_users = int(uidx[-1]) + 1
    lengths = np.bincount(uidx, minlength=n_users).astype(np.int64)
    starts = np.zeros(n_users, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    staging.write_bytes(run_prefix + ".items", lut[df["item"].to_numpy()].astype(np.int32).tobytes())
    if has_times:
        staging.write_bytes(run_prefix + ".times", df["time"].to_numpy().astype(np.int64).tobytes())
    ranges = None
    gap = None
    if cuts is not None:
        t, r = df["time"].to_numpy(), df["row"].to_numpy()
        split_of = np.zeros(len(t), dtype=np.int64)
        for ct, cr in cuts:
            split_of += (t > ct) | ((t == ct) & (r >= cr))
        per_user = np.bincount(uidx * 3 + split_of, minlength=3 * n_users).reshape(-1, 3)
        start = np.concatenate([np.zeros((n_users, 1), np.int64), np.cumsum(per_user, axis=1)[:, :2]], axis=1)
        ranges = np.stack([start, start + per_user - 1], axis=2)
        ranges[per_user == 0] = -1
    elif split_labels:
        ranges, gap = _label_ranges(df, uidx, starts, n_users, sort_int)
    table = {"_k": df["_k"].gather(starts), "user": df["user"].gather(starts).cast(pl.Utf8),
             "start": starts, "length": lengths}
    if ranges is not None:
        for s in range(3):
            for b in range(2):
                table[f"r{s}{b}"] = ranges[:, s, b]
    staging.write_ipc(run_prefix + ".users.arrow", pl.DataFrame(table))
    return n_users, gap


def _label_ranges(df: pl.DataFrame, uidx: np.ndarray, starts: np.ndarray, n_users: int,
                  sort_int: bool) -> tuple[np.ndarray, tuple | None]:
    """A table's own split: per user the [first, last] position of each split's marked rows."""
    pos = np.arange(len(uidx), dtype=np.int64) - starts[uidx]
    marked = pl.DataFrame({"u": uidx, "split": df["split"], "pos": pos, "row": df["row"]}).filter(
        pl.col("split").is_not_null())
    g = marked.group_by(["u", "split"]).agg(start=pl.col("pos").min(), end=pl.col("pos").max(), n=pl.len(),
                                             row=pl.col("row").min())
    gap = None
    gaps = g.filter(pl.col("end") - pl.col("start") + 1 != pl.col("n")).sort("row")
    if gaps.height:
        first = gaps.row(0, named=True)
        user = df["user"][int(starts[first["u"]])]
        gap = (first["row"], int(user) if sort_int else user, SPLITS[first["split"]])
    ranges = np.full((n_users, 3, 2), -1, dtype=np.int64)
    u, s = g["u"].to_numpy(), g["split"].to_numpy().astype(np.int64)
    ranges[u, s, 0], ranges[u, s, 1] = g["start"].to_numpy(), g["end"].to_numpy()
    return ranges, gap


def _task_shard(staging: Staging, url: str, storage_options: dict[str, Any], first_user: int, users: list[str],
                buckets: np.ndarray,
                starts: np.ndarray, lengths: np.ndarray, ranges: np.ndarray, run_prefixes: list[str],
                has_times: bool, window_rows: int) -> tuple[int, str]:
    """One shard from its users' slices of the bucket arrays, read a window of users at a time (a
    window's users of one bucket are one contiguous range there: buckets and shards are both in key order)."""
    staging.check_fault("shard")
    bounds = ranges.tolist()
    with storage.open_url(url, "wb", storage_options) as raw:
        tar = FastTarWriter(raw)
        i, n = 0, len(users)
        while i < n:
            j, rows = i + 1, int(lengths[i])
            while j < n and rows + lengths[j] <= window_rows:
                rows += int(lengths[j])
                j += 1
            loaded: dict[int, tuple[int, np.ndarray, np.ndarray | None]] = {}
            for b in np.unique(buckets[i:j]).tolist():
                sel = buckets[i:j] == b
                lo = int(starts[i:j][sel].min())
                hi = int((starts[i:j][sel] + lengths[i:j][sel]).max())
                items = staging.read_array(run_prefixes[b] + ".items", np.int32, lo, hi - lo)
                times = staging.read_array(run_prefixes[b] + ".times", np.int64, lo, hi - lo) if has_times else None
                loaded[b] = (lo, items, times)
            for k in range(i, j):
                lo, items, times = loaded[int(buckets[k])]
                a = int(starts[k]) - lo
                e = a + int(lengths[k])
                add_sample(tar, first_user + k, users[k], bounds[k], items[a:e], None if times is None else times[a:e])
            i = j
        tar.close()
    return tar.size, tar.sha.hexdigest()


# ---------------------------------------------------------------------------------------------
# the run


def _executor(bopts: BucketOptions, workers: int):
    if bopts.engine == "local":
        return LocalExecutor(workers)
    if bopts.engine == "ray":
        return RayExecutor(bopts.engine_address)
    raise InputError(f"--engine {bopts.engine!r}: expected one of {', '.join(ENGINES)}")


def shard_log_bucketed(source: LogSource, opts: ShardOptions, source_info: dict[str, Any],
                       bopts: BucketOptions | None = None) -> Manifest:
    """The same data set as sharding.shard_log(read(...)), in bounded memory (see the module doc), its
    passes run by bopts.engine (engines.py)."""
    bopts = bopts or BucketOptions()
    previous = check_output(opts)
    limit = bopts.limit()
    workers = max(1, opts.workers)
    per_process = max(1, limit // (workers + 1))
    _check_options(opts, source)

    pool = _executor(bopts, workers)
    if pool.name == "local":
        staging, task_options = local_staging(bopts.staging), opts.storage_options
    else:  # tasks on other machines: staging under the output store, storage options written out
        task_options = explicit_storage_options(opts.output, opts.storage_options)
        staging = store_staging(opts.output, explicit_storage_options(bopts.staging or opts.output,
                                                                      opts.storage_options), bopts.staging)
    try:
        report: dict[str, Any] = {}
        t0 = time.perf_counter()
        est_buckets = bopts.buckets or max(workers, math.ceil(1.5 * source.estimated_rows * BYTES_PER_ROW / per_process))
        part = _partition(source, opts, staging, est_buckets, per_process, report, pool)
        buckets = _fit_buckets(part["buckets"], staging, part["schema"], per_process, limit, workers, source)
        counts, total, report_changes = _clean(pool, staging, buckets, part, opts, source)
        report.update(report_changes)
        if total == 0:
            raise InputError(f"{source.sources.get('interactions', 'interactions')}: no interactions left after "
                             f"filtering ({json.dumps(report)})")
        items, lut = _final_catalog(source.items, part["item_all_int"], counts, opts)
        cuts = _time_cuts(pool, staging, buckets, total, part, opts) if opts.split == "global-time" else None
        users, run_prefixes = _order(pool, buckets, staging, lut, part, source, cuts)
        lengths = users["length"].to_numpy()
        ranges = _user_ranges(users, opts, source, lengths)
        per_user = examples_from_ranges(lengths, ranges)
        bounds = boundaries_from_lengths(lengths, source.has_timestamps, opts.shard_size)
        report["seconds_prepare"] = round(time.perf_counter() - t0, 3)
        counts_out = {"users": len(lengths), "items": items.height, "interactions": int(lengths.sum()),
                      "examples": {s: int(per_user[:, i].sum()) for i, s in enumerate(SPLITS)}}
        window_rows = max(1, per_process // (2 * BYTES_PER_ROW))
        manifest = publish(
            lambda generation, written: _write_shards(pool, staging, users, ranges, per_user, bounds, run_prefixes,
                                                      source.has_timestamps, window_rows, opts, task_options,
                                                      generation, written),
            items, counts_out, source.has_timestamps, source.prompt, opts, source_info, report, previous)
        bopts.ran_on = pool.summary()
        return manifest
    finally:
        try:
            pool.close()
        finally:
            staging.remove_all()


def _check_options(opts: ShardOptions, source: LogSource) -> None:
    """The refusals the in-memory path makes on flags alone, before any data is read."""
    changing = opts.min_rating is not None or opts.min_user_interactions > 1 or opts.min_item_interactions > 1
    if opts.split == "keep" and (changing or opts.dedupe == "first"):
        raise InputError("--split keep keeps the input's own target ranges, so it cannot be combined with "
                         "--min-rating, k-core filtering or --dedupe first (they would shift those ranges)")
    if opts.min_rating is not None and not source.has_rating:
        raise InputError(f"--min-rating: {source.sources.get('interactions', 'interactions')} has no rating column")
    if opts.split not in ("keep", "leave-one-out", "global-time"):
        raise InputError(f"--split {opts.split!r}: expected global-time, leave-one-out or keep")
    if opts.split == "global-time":
        if not source.has_timestamps:
            raise InputError("--split global-time needs timestamps, and this input has none; use --split keep or "
                             "leave-one-out")
        fractions = opts.split_fractions
        if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
            raise InputError(f"--split-fractions {fractions}: three non-negative fractions that sum to 1")
    if opts.split == "keep" and source.splits is None and not source.split_labels:
        raise InputError("--split keep: this input has no target ranges of its own (the patchrec format has them; a "
                         "table gets them from --split-col); use global-time or leave-one-out")


def _catalog_keys(items: pl.DataFrame) -> tuple[pl.Series, pl.Series]:
    keys = items["item_key"]
    return keys, keys.cast(pl.Utf8)


def _partition_chunk(df: pl.DataFrame, source: LogSource, opts: ShardOptions, cat_keys: pl.Series,
                     cat_text: pl.Series, buckets: int) -> tuple[dict[str, Any], dict[int, pl.DataFrame]]:
    """Stage A on one chunk: --min-rating, the catalog join, the bucket of each row.
    Returns (this chunk's counts, {bucket: its rows, in input order})."""
    st: dict[str, Any] = {"rows_read": df.height, "rows_rated": 0, "unknown": 0, "first_unknown": None,
                          "user_all_int": df["user"].dtype == pl.Int64, "item_all_int": df["item_key"].dtype == pl.Int64,
                          "tmin": None, "tmax": None, "rmax": 0}
    if opts.min_rating is not None:
        df = df.filter(pl.col("rating") >= opts.min_rating)
        st["rows_rated"] = df.height
    keys = df["item_key"]
    if keys.dtype == cat_keys.dtype:
        dense = _dense_item_index(keys, cat_keys)
    else:
        dense = _dense_item_index(keys.cast(pl.Utf8), cat_text)
    bad = dense < 0
    n_bad = int(bad.sum())
    if n_bad:
        i = int(np.flatnonzero(bad)[0])
        st["first_unknown"] = (int(df["row"][i]) + 1, str(keys.cast(pl.Utf8)[i]))
        st["unknown"] = n_bad
    cols = [pl.col("user").cast(pl.Utf8) if source.user_text else pl.col("user"),
            pl.Series("item", dense, dtype=pl.Int32), "time", "row"]
    if source.split_labels:
        cols.append("split")
    df = df.select(cols)
    if n_bad:
        df = df.filter(pl.Series(~bad))
    if df.height == 0:
        return st, {}
    if source.has_timestamps:
        st["tmin"], st["tmax"] = df["time"].min(), df["time"].max()
    st["rmax"] = int(df["row"][-1])
    if buckets == 1:
        return st, {0: df}
    parts = df.with_columns(_bucket_of(df["user"], buckets, 0)).partition_by("_b", as_dict=True, include_key=False)
    return st, {int(b): part for (b,), part in parts.items()}


def _task_partition(staging: Staging, part: int, df: pl.DataFrame, source: LogSource, opts: ShardOptions,
                    catalog: tuple[pl.Series, pl.Series], buckets: int,
                    schema: pa.Schema) -> tuple[dict[str, Any], dict[int, tuple[str, int]]]:
    """Stage A as a task (engines other than local): one chunk's rows of each bucket, as one file per
    bucket and chunk (b<bucket>.p<chunk>.arrow), merged per bucket in chunk order by _task_merge."""
    staging.check_fault("partition")
    st, parts = _partition_chunk(df, source, opts, catalog[0], catalog[1], buckets)
    files = {}
    for b, rows in parts.items():
        name = f"b{b:05d}.p{part:06d}.arrow"
        _write_bucket(staging, name, rows, schema)
        files[b] = (name, rows.height)
    return st, files


def _task_merge(staging: Staging, parts: list[str], name: str, schema: pa.Schema) -> int:
    """One bucket from its chunks' files, in chunk order (so in input order), a chunk at a time."""
    staging.check_fault("merge")
    rows = 0
    with staging.writer(name) as f, ipc.new_file(f, schema, options=IPC_OPTIONS) as w:
        for p in parts:
            df = _read_bucket(staging, p)
            w.write_table(df.to_arrow().cast(schema))
            rows += df.height
    return rows


def _partition(source: LogSource, opts: ShardOptions, staging: Staging, buckets: int, per_process: int,
               report: dict[str, Any], pool) -> dict[str, Any]:
    """Stage A: one pass over the input. The local engine appends each chunk to the bucket files here;
    another engine partitions each chunk in a task and merges each bucket's pieces in another."""
    inter_file = source.sources.get("interactions", "interactions")
    cat_keys, cat_text = _catalog_keys(source.items)
    n_items = source.items.height
    schema = _bucket_schema(source)
    total: dict[str, Any] = {"rows_read": 0, "rows_rated": 0, "unknown": 0, "first_unknown": None,
                             "user_all_int": True, "item_all_int": True, "tmin": None, "tmax": None, "rmax": 0}

    def add(st: dict[str, Any]) -> None:
        for k in ("rows_read", "rows_rated", "unknown"):
            total[k] += st[k]
        for k in ("user_all_int", "item_all_int"):
            total[k] &= st[k]
        if st["first_unknown"] is not None and (total["first_unknown"] is None
                                                or st["first_unknown"] < total["first_unknown"]):
            total["first_unknown"] = st["first_unknown"]
        if st["tmin"] is not None:
            total["tmin"] = st["tmin"] if total["tmin"] is None else min(total["tmin"], st["tmin"])
            total["tmax"] = st["tmax"] if total["tmax"] is None else max(total["tmax"], st["tmax"])
        total["rmax"] = max(total["rmax"], st["rmax"])

    chunk_rows = int(min(4_000_000, max(10_000, per_process // _READ_BYTES_PER_ROW)))
    if pool.name == "local":
        writers = _BucketWriters(staging, "b", buckets, schema)
        try:
            for df in source.chunks(chunk_rows):
                st, parts = _partition_chunk(df, source, opts, cat_keys, cat_text, buckets)
                add(st)
                for b, rows in parts.items():
                    writers.write(b, rows)
        finally:
            written = writers.close()
    else:
        catalog = pool.share((cat_keys, cat_text))
        lean = LogSource(items=source.items.clear(), chunks=None, estimated_rows=0, has_timestamps=source.has_timestamps,
                         has_rating=source.has_rating, user_text=source.user_text, split_labels=source.split_labels)
        pieces: dict[int, list[tuple[str, int]]] = {}
        jobs = ((staging, i, df, lean, opts, catalog, buckets, schema) for i, df in enumerate(source.chunks(chunk_rows)))
        for st, files in pool.map(_task_partition, jobs):  # chunk order
            add(st)
            for b, f in files.items():
                pieces.setdefault(b, []).append(f)
        order = sorted(pieces)
        names = [f"b{b:05d}.arrow" for b in order]
        rows = list(pool.map(_task_merge, [(staging, [n for n, _ in pieces[b]], name, schema)
                                           for b, name in zip(order, names)]))
        staging.remove(n for b in order for n, _ in pieces[b])
        written = list(zip(names, rows))
    report["rows_read"] = total["rows_read"]
    if opts.min_rating is not None:
        report["rows_after_min_rating"] = total["rows_rated"]
    unknown = total["unknown"]
    if unknown:
        if not opts.drop_unknown_items:
            row, key = total["first_unknown"]
            raise InputError(f"{inter_file}: row {row}: item {key!r} is not in the items table "
                             f"({unknown} such interactions; --drop-unknown-items drops them)")
        if opts.split == "keep":
            raise InputError(f"{inter_file}: {unknown} interactions with items missing from the items table; "
                             "--split keep keeps the input's own target ranges, which dropping them would shift")
        report["dropped_unknown_items"] = unknown
    # a user column of text whose every id is an integer sorts as integers, as the in-memory reader's does
    return {"buckets": written, "schema": schema, "user_sort_int": (not source.user_text) or total["user_all_int"],
            "item_all_int": total["item_all_int"], "n_items": n_items, "time_range": (total["tmin"], total["tmax"]),
            "max_row": total["rmax"], "rows": sum(n for _, n in written)}


def _fit_buckets(buckets: list[tuple[str, int]], staging: Staging, schema: pa.Schema, per_process: int, limit: int,
                 workers: int, source: LogSource, depth: int = 1) -> list[tuple[str, int]]:
    """Split every bucket too large for one process's share of --memory-limit by another hash of the
    user; refuse a user whose history alone is too large, naming it."""
    out = []
    cap = max(1, per_process // BYTES_PER_ROW)
    for path, rows in buckets:
        if rows <= cap:
            out.append((path, rows))
            continue
        with staging.open_read(path) as src:
            reader = ipc.open_file(src)
            sizes = None
            for i in range(reader.num_record_batches):
                c = pl.from_arrow(reader.get_batch(i)).group_by("user").len()
                sizes = c if sizes is None else pl.concat([sizes, c]).group_by("user").agg(pl.col("len").sum())
        top = sizes.sort(["len", "user"], descending=[True, False]).row(0)
        if top[1] > cap:
            raise InputError(
                f"--memory-limit {format_size(limit)}: user {str(top[0])!r} has {top[1]:,} interactions; a user's "
                f"history is processed in one piece, about {format_size(top[1] * BYTES_PER_ROW)} at "
                f"~{BYTES_PER_ROW} bytes per interaction, more than the {format_size(per_process)} each of "
                f"{workers} worker(s) and the main process may use (--memory-limit / (workers + 1)); raise "
                "--memory-limit or lower --workers")
        k = max(2, math.ceil(2 * rows / cap))
        sub = _BucketWriters(staging, path[:-6] + f"-{depth}-", k, schema)
        try:
            with staging.open_read(path) as src:
                reader = ipc.open_file(src)
                for i in range(reader.num_record_batches):
                    df = pl.from_arrow(reader.get_batch(i))
                    for (b,), part in df.with_columns(_bucket_of(df["user"], k, depth)).partition_by(
                            "_b", as_dict=True, include_key=False).items():
                        sub.write(int(b), part)
        finally:
            pieces = sub.close()
        staging.remove([path])
        out += _fit_buckets(pieces, staging, schema, per_process, limit, workers, source, depth + 1)
    return out


def _clean(pool, staging: Staging, buckets: list[tuple[str, int]], part: dict[str, Any], opts: ShardOptions,
           source: LogSource) -> tuple[np.ndarray, int, dict[str, Any]]:
    """Stage B: duplicates, then k-core rounds; returns (item counts, rows, report entries)."""
    report: dict[str, Any] = {}
    n_items, schema = part["n_items"], part["schema"]
    total = part["rows"]
    dedupe = opts.dedupe != "none" and opts.split != "keep"
    keys = (["user", "item", "time"] if opts.dedupe == "exact" else ["user", "item"]) if dedupe else None

    def one_pass(dedupe_keys, alive, min_user) -> tuple[int, np.ndarray]:
        rows, counts, left = 0, np.zeros(n_items, dtype=np.int64), {}
        groups = pool.groups(buckets)
        for g, (r, c, per) in zip(groups, pool.map(_task_clean, [(staging, g, dedupe_keys, alive, min_user,
                                                                   n_items, schema) for g in groups])):
            rows += r
            counts += c
            left.update(zip(g, per))
        for i, (path, _) in enumerate(buckets):  # the rows left, for the groups' balance
            buckets[i] = (path, left[path])
        return rows, counts

    counts, total2 = None, total
    if dedupe:
        total2, counts = one_pass(keys, None, 0)
        report["dropped_duplicates"] = total - total2
    min_user, min_item = opts.min_user_interactions, opts.min_item_interactions
    if min_user > 1 or min_item > 1:
        if counts is None:
            total2, counts = one_pass(None, None, 0)
        rounds = 0
        while True:
            rounds += 1
            alive = counts >= min_item if min_item > 1 else None
            rows, new_counts = one_pass(None, alive, min_user)
            if rows == total2:
                break
            total2, counts = rows, new_counts
        report["k_core_rounds"] = rounds
        report["rows_after_k_core"] = total2
    if counts is None:
        total2, counts = one_pass(None, None, 0)
    return counts, total2, report


def _final_catalog(items: pl.DataFrame, item_all_int: bool, counts: np.ndarray,
                   opts: ShardOptions) -> tuple[pl.DataFrame, np.ndarray]:
    """The catalog as the in-memory path writes it, and a table: catalog row as read -> dense item index."""
    keys = items["item_key"]
    if not (item_all_int and keys.dtype == pl.Int64):  # sharding.align_id_types: text on both sides
        keys = keys.cast(pl.Utf8)
    ordered = items.with_columns(keys).with_row_index("_orig").sort("item_key", maintain_order=True)
    orig = ordered["_orig"].to_numpy().astype(np.int64)
    ordered = ordered.drop("_orig").with_row_index("item").with_columns(pl.col("item").cast(pl.Int32))
    lut = np.full(len(orig) + 1, -1, dtype=np.int32)
    changing = opts.min_rating is not None or opts.min_user_interactions > 1 or opts.min_item_interactions > 1
    if changing:
        present = counts[orig] > 0
        renumber = np.cumsum(present, dtype=np.int64) - 1
        ordered = ordered.filter(pl.Series(present)).with_columns(
            pl.Series("item", np.arange(int(present.sum()), dtype=np.int32)))
        lut[orig] = np.where(present, renumber, -1)
    else:
        lut[orig] = np.arange(len(orig), dtype=np.int32)
    return ordered, lut[:-1]


def _time_cuts(pool, staging: Staging, buckets: list[tuple[str, int]], n: int, part: dict[str, Any],
               opts: ShardOptions) -> list[tuple[int, int]]:
    """Stage C: the (time, row) pairs that start val and test: the cut-th smallest of all pairs, as
    sharding._global_time_ranges takes them, found by radix selection over the buckets."""
    fractions = opts.split_fractions
    cuts = [c for c in (int(np.floor(fractions[0] * n)), int(np.floor((fractions[0] + fractions[1]) * n))) if c < n]
    groups = pool.groups(buckets)
    tmin, tmax = part["time_range"]
    # per cut: [column, time_equals, lo, hi, k (rank among the rows matching time_equals)]
    state = [["time", None, int(tmin), int(tmax), k] for k in cuts]
    found: list[tuple[int, int] | None] = [None] * len(cuts)
    while any(f is None for f in found):
        active = [i for i, f in enumerate(found) if f is None]
        specs = []
        for i in active:
            col, teq, lo, hi, _ = state[i]
            specs.append((col, teq, lo, hi, max(0, (hi - lo).bit_length() - _RADIX_BITS)))
        totals = None
        for res in pool.map(_task_histogram, [(staging, g, specs) for g in groups]):
            totals = res if totals is None else [(a + b, h1 + h2) for (a, h1), (b, h2) in zip(totals, res)]
        for i, spec, (below, hist) in zip(active, specs, totals):
            col, teq, lo, hi, k = state[i]
            shift = spec[4]
            cum = below + np.cumsum(hist)
            j = int(np.searchsorted(cum, k, side="right"))  # first bin whose cumulative count exceeds k
            base = below + (int(cum[j - 1] - below) if j else 0)
            new_lo = lo + (j << shift)
            if shift == 0:
                if col == "time":  # the k-th time is new_lo; rank k - base among rows at that time
                    state[i] = ["row", new_lo, 0, int(part["max_row"]), k - base]
                else:
                    found[i] = (teq, new_lo)
            else:
                state[i] = [col, teq, new_lo, min(hi, new_lo + (1 << shift) - 1), k]
    return [f for f in found]


def _order(pool, buckets: list[tuple[str, int]], staging: Staging, lut: np.ndarray, part: dict[str, Any],
           source: LogSource, cuts) -> tuple[pl.DataFrame, list[str]]:
    """Stage D and E: sort each bucket into histories, then all users in key order (O(users))."""
    staging.remove(path for path, rows in buckets if rows == 0)
    buckets = [(path, rows) for path, rows in buckets if rows > 0]  # k-core may empty a bucket
    run_prefixes = [f"run{b:05d}" for b in range(len(buckets))]
    lut_path = "items.lut.npy"
    buf = io.BytesIO()
    np.save(buf, lut)
    staging.write_bytes(lut_path, buf.getvalue())
    args = [(staging, path, run_prefixes[b], lut_path, part["user_sort_int"], source.has_timestamps, cuts, source.split_labels)
            for b, (path, _) in enumerate(buckets)]
    gaps = []
    for _, gap in pool.map(_task_order, args):
        if gap is not None:
            gaps.append(gap)
    if gaps:
        row, user, split = min(gaps)
        raise InputError(f"{source.sources.get('interactions', 'interactions')}: user {user!r}: its {split!r} rows "
                         f"(column '{source.split_col}') are not consecutive in time order; "
                         "each split of a user must be one run of targets")
    staging.remove(path for path, _ in buckets)  # the runs hold everything from here on
    tables = [_read_bucket(staging, p + ".users.arrow").with_columns(pl.lit(b, dtype=pl.Int32).alias("bucket"))
              for b, p in enumerate(run_prefixes)]
    users = pl.concat(tables).sort("_k")
    return users, run_prefixes


def _user_ranges(users: pl.DataFrame, opts: ShardOptions, source: LogSource, lengths: np.ndarray) -> np.ndarray:
    if opts.split == "leave-one-out":
        return _leave_one_out_ranges(lengths)
    if opts.split == "global-time" or (opts.split == "keep" and source.split_labels):
        out = np.empty((users.height, 3, 2), dtype=np.int64)
        for s in range(3):
            for b in range(2):
                out[:, s, b] = users[f"r{s}{b}"].to_numpy()
        return out
    log = RawLog(pl.DataFrame(), source.items, splits=source.splits)
    return _kept_ranges(users["user"].to_numpy().astype(object), log)


def _write_shards(pool, staging: Staging, users: pl.DataFrame, ranges: np.ndarray, per_user: np.ndarray,
                  bounds: list[tuple[int, int]], run_prefixes: list[str], has_times: bool, window_rows: int,
                  opts: ShardOptions, storage_options: dict[str, Any], generation: str,
                  written: list[str]) -> list[ShardInfo]:
    out = opts.output.rstrip("/")
    keys = users["user"]
    bucket, start, length = (users[c].to_numpy() for c in ("bucket", "start", "length"))
    jobs, paths = [], []
    for i, (a, b) in enumerate(bounds):
        path = f"shards/{generation}-{i:05d}.tar"
        written.append(path)
        paths.append(path)
        jobs.append((staging, storage.join(out, path), storage_options, a, keys.slice(a, b - a).to_list(),
                     bucket[a:b], start[a:b], length[a:b], ranges[a:b], run_prefixes, has_times, window_rows))
    bar = tqdm(total=len(jobs), unit="shard", desc="writing shards", disable=not opts.progress)
    results = []
    for res in pool.map(_task_shard, jobs):
        results.append(res)
        bar.update()
    bar.close()
    cum = np.zeros(len(length) + 1, dtype=np.int64)
    np.cumsum(length, out=cum[1:])
    return [ShardInfo(path=paths[i], samples=b - a, interactions=int(cum[b] - cum[a]), bytes=results[i][0],
                      sha256=results[i][1], examples={s: int(per_user[a:b, k].sum()) for k, s in enumerate(SPLITS)})
            for i, (a, b) in enumerate(bounds)]
