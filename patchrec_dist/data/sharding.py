"""Interaction logs -> a WebDataset data set (shards + catalog + manifest), published atomically.

Stages, each a function: read (readers.py) -> clean (rating filter, unknown items, duplicates,
k-core) -> order (stable time order per user) -> split (train/val/test target ranges) -> cut into
shards -> write shards in parallel -> catalog -> manifest last.

Everything between read and write is columnar (polars / numpy over whole columns): a real log has
10^8 rows. Files of one run carry a generation id, so a new run never overwrites the files an
existing manifest points at; the old generation is removed only after the new manifest is live.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import tarfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from patchrec_dist.data import storage
from patchrec_dist.data.manifest import (
    MANIFEST_NAME,
    MIN_TARGET_POSITION,
    SCHEMA_VERSION,
    SPLITS,
    Manifest,
    ShardInfo,
)
from patchrec_dist.data.readers import InputError, RawLog

# Fixed tar metadata so the same input gives byte-identical shards (and checksums).
_TAR_MTIME = 0
# Rough tar cost of one user beyond its arrays: three 512-byte headers, padding, json.
_SAMPLE_OVERHEAD_BYTES = 2048


@dataclass
class ShardOptions:
    output: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    min_rating: float | None = None
    min_user_interactions: int = 0
    min_item_interactions: int = 0
    dedupe: str = "exact"  # none | exact (same user, item, time) | first (first user-item pair only)
    split: str = "global-time"  # global-time | leave-one-out | keep
    split_fractions: tuple[float, float, float] = (0.96, 0.02, 0.02)
    shard_size: str = "2000"  # users per shard, or a byte size such as 64MB
    workers: int = 2
    overwrite: bool = False
    drop_unknown_items: bool = False
    progress: bool = True


@dataclass
class UserHistories:
    """Histories of all users as flat columns: user u owns items[offsets[u]:offsets[u+1]]."""

    user_keys: np.ndarray  # object array of str
    offsets: np.ndarray  # int64 (U+1,)
    items: np.ndarray  # int32 dense catalog indices, time order per user
    times: np.ndarray | None  # int64 seconds, or None without timestamps
    ranges: np.ndarray  # int64 (U, 3, 2) inclusive [start, end] per split, -1 for an empty split

    @property
    def num_users(self) -> int:
        return len(self.user_keys)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


# ---------------------------------------------------------------------------------------------
# clean


def clean_interactions(log: RawLog, opts: ShardOptions, report: dict[str, Any]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Apply the filters; return (interactions with a dense `item` index, catalog)."""
    inter, items = log.interactions, log.items
    inter_file = (log.sources or {}).get("interactions", "interactions")
    changing = opts.min_rating is not None or opts.min_user_interactions > 1 or opts.min_item_interactions > 1
    if opts.split == "keep" and (changing or opts.dedupe == "first"):
        raise InputError("--split keep keeps the input's own target ranges, so it cannot be combined with "
                         "--min-rating, k-core filtering or --dedupe first (they would shift those ranges)")
    report["rows_read"] = inter.height

    if opts.min_rating is not None:
        if "rating" not in inter.columns:
            raise InputError(f"--min-rating: {inter_file} has no rating column")
        inter = inter.filter(pl.col("rating") >= opts.min_rating)
        report["rows_after_min_rating"] = inter.height

    known = inter["item_key"].is_in(items["item_key"].implode())
    unknown = int((~known).sum())
    if unknown:
        if not opts.drop_unknown_items:
            first = int(np.flatnonzero(~known.to_numpy())[0])
            row = int(inter["row"][first]) + 1
            raise InputError(
                f"{inter_file}: row {row}: item {inter['item_key'][first]!r} is not in the items table "
                f"({unknown} such interactions; --drop-unknown-items drops them)"
            )
        inter = inter.filter(known)
        report["dropped_unknown_items"] = unknown

    if opts.dedupe != "none" and opts.split != "keep":
        keys = ["user", "item_key", "time"] if opts.dedupe == "exact" else ["user", "item_key"]
        before = inter.height
        inter = inter.sort("row").unique(subset=keys, keep="first", maintain_order=True)
        report["dropped_duplicates"] = before - inter.height

    if opts.min_user_interactions > 1 or opts.min_item_interactions > 1:
        inter = k_core(inter, opts.min_user_interactions, opts.min_item_interactions, report)

    if inter.height == 0:
        raise InputError(f"{inter_file}: no interactions left after filtering ({json.dumps(report)})")

    if changing:  # a filtered catalog holds only items that survived
        items = items.filter(pl.col("item_key").is_in(inter["item_key"].unique().implode()))
    items = _sorted_by_key(items, "item_key").with_row_index("item").with_columns(pl.col("item").cast(pl.Int32))
    inter = inter.join(items.select("item_key", "item"), on="item_key", how="left")
    return inter, items


def k_core(inter: pl.DataFrame, min_user: int, min_item: int, report: dict[str, Any]) -> pl.DataFrame:
    """Repeat the user and item count filters until both hold (a k-core)."""
    rounds = 0
    while True:
        rounds += 1
        before = inter.height
        if min_item > 1:
            inter = inter.filter(pl.len().over("item_key") >= min_item)
        if min_user > 1:
            inter = inter.filter(pl.len().over("user") >= min_user)
        if inter.height == before:
            break
    report["k_core_rounds"] = rounds
    report["rows_after_k_core"] = inter.height
    return inter


def _sorted_by_key(df: pl.DataFrame, col: str) -> pl.DataFrame:
    """Numeric order when every key is an integer, else text order: stable across runs."""
    as_int = df[col].cast(pl.Int64, strict=False)
    if as_int.null_count() == 0:
        return df.with_columns(as_int.alias("_k")).sort("_k").drop("_k")
    return df.sort(col)


# ---------------------------------------------------------------------------------------------
# order + split


def build_histories(inter: pl.DataFrame, log: RawLog, opts: ShardOptions) -> UserHistories:
    """Group into per-user histories in a stable time order (ties keep input order) and split."""
    users = _sorted_by_key(inter.select(pl.col("user").unique()), "user").with_row_index("uidx")
    inter = inter.join(users, on="user", how="left")
    sort_keys = ["uidx", "time", "row"] if log.has_timestamps else ["uidx", "row"]
    inter = inter.sort(sort_keys)
    uidx = inter["uidx"].to_numpy()
    counts = np.bincount(uidx, minlength=users.height)
    offsets = np.zeros(users.height + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    items = inter["item"].to_numpy().astype(np.int32, copy=False)
    times = inter["time"].to_numpy().astype(np.int64, copy=False) if log.has_timestamps else None
    user_keys = users["user"].to_numpy().astype(object)

    if opts.split == "keep":
        ranges = _kept_ranges(users, log)
    elif opts.split == "leave-one-out":
        ranges = _leave_one_out_ranges(counts)
    elif opts.split == "global-time":
        if not log.has_timestamps:
            raise InputError("--split global-time needs timestamps, and this input has none; use --split keep or leave-one-out")
        ranges = _global_time_ranges(inter, offsets, opts.split_fractions)
    else:
        raise InputError(f"--split {opts.split!r}: expected global-time, leave-one-out or keep")
    return UserHistories(user_keys, offsets, items, times, ranges)


def _kept_ranges(users: pl.DataFrame, log: RawLog) -> np.ndarray:
    if log.splits is None:
        raise InputError("--split keep: this input format has no target ranges of its own; use global-time or leave-one-out")
    joined = users.join(log.splits, on="user", how="left").sort("uidx")
    out = np.full((users.height, 3, 2), -1, dtype=np.int64)
    for s, split in enumerate(SPLITS):
        for b, bound in enumerate(("start", "end")):
            out[:, s, b] = joined[f"{split}_{bound}"].fill_null(-1).to_numpy()
    return out


def _leave_one_out_ranges(lengths: np.ndarray) -> np.ndarray:
    """Last item test, second to last val, the rest train."""
    n = lengths.astype(np.int64)
    out = np.full((len(n), 3, 2), -1, dtype=np.int64)
    has_train = n >= 3
    out[has_train, 0, 0], out[has_train, 0, 1] = 0, n[has_train] - 3
    has_val = n >= 2
    out[has_val, 1, 0] = out[has_val, 1, 1] = n[has_val] - 2
    has_test = n >= 1
    out[has_test, 2, 0] = out[has_test, 2, 1] = n[has_test] - 1
    return out


def _global_time_ranges(inter: pl.DataFrame, offsets: np.ndarray, fractions: tuple[float, float, float]) -> np.ndarray:
    """Targets go to train/val/test by global time quantiles: the oldest `train` fraction of all
    interactions are train targets, and so on. Ordering by (time, input row) breaks ties the same
    way as the per-user order, so each user's split ranges are contiguous."""
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise InputError(f"--split-fractions {fractions}: three non-negative fractions that sum to 1")
    n = inter.height
    # global rank of each row of `inter` (which is sorted by user, time, row)
    order = np.lexsort((inter["row"].to_numpy(), inter["time"].to_numpy()))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    cut_val = int(np.floor(fractions[0] * n))
    cut_test = int(np.floor((fractions[0] + fractions[1]) * n))
    split_of = np.where(rank < cut_val, 0, np.where(rank < cut_test, 1, 2))
    pos = np.arange(n) - np.repeat(offsets[:-1], np.diff(offsets))
    num_users = len(offsets) - 1
    uidx = np.repeat(np.arange(num_users), np.diff(offsets))
    out = np.full((num_users, 3, 2), -1, dtype=np.int64)
    for s in range(3):
        sel = split_of == s
        if not sel.any():
            continue
        u, p = uidx[sel], pos[sel]
        lo = np.full(num_users, np.iinfo(np.int64).max)
        hi = np.full(num_users, -1)
        np.minimum.at(lo, u, p)
        np.maximum.at(hi, u, p)
        has = hi >= 0
        out[has, s, 0], out[has, s, 1] = lo[has], hi[has]
    return out


def examples_per_user(h: UserHistories) -> np.ndarray:
    """(U, 3) examples each user yields per split (targets at position >= 3 of a history of > 3 items)."""
    n = h.lengths()[:, None]
    start, end = h.ranges[:, :, 0], h.ranges[:, :, 1]
    lo = np.maximum(start, MIN_TARGET_POSITION)
    hi = np.minimum(end, n - 1)
    count = np.where((start >= 0) & (n > MIN_TARGET_POSITION), np.maximum(hi - lo + 1, 0), 0)
    return count.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# shards


def parse_shard_size(text: str) -> tuple[str, int]:
    """'2000' -> ('users', 2000); '64MB' -> ('bytes', 64 * 2**20)."""
    t = str(text).strip().upper()
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "B": 1}
    for suffix, mult in units.items():
        if t.endswith(suffix) and t[: -len(suffix)].strip().replace(".", "", 1).isdigit():
            return "bytes", int(float(t[: -len(suffix)]) * mult)
    if t.isdigit() and int(t) > 0:
        return "users", int(t)
    raise InputError(f"--shard-size {text!r}: a number of users per shard (e.g. 2000) or a size (e.g. 64MB)")


def shard_boundaries(h: UserHistories, shard_size: str) -> list[tuple[int, int]]:
    kind, value = parse_shard_size(shard_size)
    u = h.num_users
    if kind == "users":
        starts = np.arange(0, u, value)
    else:
        per_item = 4 + (8 if h.times is not None else 0)
        cost = np.cumsum(h.lengths() * per_item + _SAMPLE_OVERHEAD_BYTES)
        starts = [0]
        while True:
            base = cost[starts[-1] - 1] if starts[-1] > 0 else 0
            nxt = int(np.searchsorted(cost, base + value, side="right"))
            nxt = max(nxt, starts[-1] + 1)
            if nxt >= u:
                break
            starts.append(nxt)
        starts = np.asarray(starts)
    ends = list(starts[1:]) + [u]
    return [(int(s), int(e)) for s, e in zip(starts, ends)]


class _HashingWriter(io.RawIOBase):
    """Counts bytes and hashes them on the way to the real file: no second read of a shard."""

    def __init__(self, raw):
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        self.raw.write(b)
        return len(b)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), _TAR_MTIME, 0o444, "patchrec", "patchrec"
    tar.addfile(info, io.BytesIO(data))


def write_shard(url: str, storage_options: dict[str, Any], first_user: int, user_keys: list[str],
                offsets: np.ndarray, items: np.ndarray, times: np.ndarray | None,
                ranges: np.ndarray) -> tuple[int, str]:
    """Write one WebDataset tar (one sample per user); return (bytes, sha256).

    Sample `KEY.json` holds the user id and split ranges, `KEY.items.npy` the dense item indices in
    time order, `KEY.times.npy` their timestamps (when the input has them)."""
    with storage.open_url(url, "wb", storage_options) as raw:
        sink = _HashingWriter(raw)
        buffered = io.BufferedWriter(sink, buffer_size=1 << 20)
        with tarfile.open(fileobj=buffered, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for i, user in enumerate(user_keys):
                key = f"{first_user + i:09d}"
                a, b = offsets[i], offsets[i + 1]
                meta = {"user": user, "splits": {
                    split: (None if ranges[i, s, 0] < 0 else [int(ranges[i, s, 0]), int(ranges[i, s, 1])])
                    for s, split in enumerate(SPLITS)}}
                _add_member(tar, f"{key}.json", json.dumps(meta, separators=(",", ":")).encode())
                _add_member(tar, f"{key}.items.npy", _npy_bytes(items[a:b]))
                if times is not None:
                    _add_member(tar, f"{key}.times.npy", _npy_bytes(times[a:b]))
        buffered.flush()
    return sink.size, sink.sha.hexdigest()


def _write_shard_job(args) -> tuple[int, int, str]:
    index, url, storage_options, payload = args
    size, digest = write_shard(url, storage_options, *payload)
    return index, size, digest


# ---------------------------------------------------------------------------------------------
# the whole run


def check_output(opts: ShardOptions) -> set[str] | None:
    """Fail fast on an output that cannot be written, or holds a data set and --overwrite is off.
    Returns the files of the data set to replace (None when there is none)."""
    out = opts.output.rstrip("/")
    storage.check_writable(out, opts.storage_options)
    if storage.exists(storage.join(out, MANIFEST_NAME), opts.storage_options):
        if not opts.overwrite:
            raise InputError(f"{out}: a data set exists there already; pass --overwrite to replace it")
        return set(storage.list_files(out, opts.storage_options))
    return None


def shard_log(log: RawLog, opts: ShardOptions, source: dict[str, Any]) -> Manifest:
    """Clean, order, split and write LOG as a data set at opts.output; the manifest is written last."""
    out = opts.output.rstrip("/")
    manifest_url = storage.join(out, MANIFEST_NAME)
    previous = check_output(opts)

    report: dict[str, Any] = {}
    t0 = time.perf_counter()
    inter, items = clean_interactions(log, opts, report)
    hist = build_histories(inter, log, opts)
    del inter
    per_user = examples_per_user(hist)
    bounds = shard_boundaries(hist, opts.shard_size)
    report["seconds_prepare"] = round(time.perf_counter() - t0, 3)

    generation = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    written: list[str] = []
    try:
        shards = _write_shards(hist, per_user, bounds, out, generation, opts, written)
        catalog = _write_catalog(items, out, generation, opts, written)
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            generation=generation,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            source={**source, "filters": report},
            split={"protocol": opts.split, "fractions": list(opts.split_fractions) if opts.split == "global-time" else None,
                   "min_target_position": MIN_TARGET_POSITION, "ranges": "inclusive target positions [start, end]"},
            has_timestamps=hist.times is not None,
            counts={"users": hist.num_users, "items": items.height, "interactions": int(len(hist.items)),
                    "examples": {s: int(per_user[:, i].sum()) for i, s in enumerate(SPLITS)}},
            catalog=catalog,
            shards=shards,
            root=out,
        )
        storage.write_bytes_atomic(manifest_url, manifest.to_json().encode(), opts.storage_options)
    except BaseException:
        for path in written:  # a refused or failed run leaves no files of its own behind
            storage.remove(storage.join(out, path), opts.storage_options)
        raise
    if previous:
        live = {s.path for s in manifest.shards} | {manifest.catalog["path"], MANIFEST_NAME}
        for path in sorted(previous - live):
            storage.remove(storage.join(out, path), opts.storage_options)
    return manifest


def _write_shards(hist: UserHistories, per_user: np.ndarray, bounds: list[tuple[int, int]], out: str,
                  generation: str, opts: ShardOptions, written: list[str]) -> list[ShardInfo]:
    jobs = []
    for i, (a, b) in enumerate(bounds):
        lo, hi = hist.offsets[a], hist.offsets[b]
        payload = (a, hist.user_keys[a:b].tolist(), hist.offsets[a : b + 1] - lo, hist.items[lo:hi],
                   None if hist.times is None else hist.times[lo:hi], hist.ranges[a:b])
        path = f"shards/{generation}-{i:05d}.tar"
        written.append(path)
        jobs.append((i, storage.join(out, path), opts.storage_options, payload))
    results: dict[int, tuple[int, str]] = {}
    bar = tqdm(total=len(jobs), unit="shard", desc="writing shards", disable=not opts.progress)
    if opts.workers <= 1 or len(jobs) == 1:
        for job in jobs:
            i, size, digest = _write_shard_job(job)
            results[i] = (size, digest)
            bar.update()
    else:
        # spawn, not fork: polars' thread pool and s3fs sessions do not survive a fork
        with ProcessPoolExecutor(opts.workers, mp_context=mp.get_context("spawn")) as pool:
            for fut in as_completed([pool.submit(_write_shard_job, job) for job in jobs]):
                i, size, digest = fut.result()
                results[i] = (size, digest)
                bar.update()
    bar.close()
    shards = []
    for i, (a, b) in enumerate(bounds):
        size, digest = results[i]
        shards.append(ShardInfo(
            path=jobs[i][1][len(out) + 1:], samples=b - a,
            interactions=int(hist.offsets[b] - hist.offsets[a]), bytes=size, sha256=digest,
            examples={s: int(per_user[a:b, k].sum()) for k, s in enumerate(SPLITS)},
        ))
    return shards


def _write_catalog(items: pl.DataFrame, out: str, generation: str, opts: ShardOptions,
                   written: list[str]) -> dict[str, Any]:
    path = f"catalog-{generation}.parquet"
    written.append(path)
    buf = io.BytesIO()
    items.select(["item", "item_key", "title", *[c for c in items.columns if c not in ("item", "item_key", "title")]]) \
        .rename({"item_key": "item_id"}).write_parquet(buf)
    data = buf.getvalue()
    storage.write_bytes_atomic(storage.join(out, path), data, opts.storage_options)
    return {"path": path, "items": items.height, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def options_summary(opts: ShardOptions) -> dict[str, Any]:
    d = asdict(opts)
    d.pop("storage_options")  # may hold credentials
    d.pop("progress")
    return d


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))
