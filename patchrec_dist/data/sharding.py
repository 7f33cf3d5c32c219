"""Interaction logs -> a WebDataset data set (shards + catalog + manifest), published atomically.

Stages, each a function: read (readers.py) -> clean (rating filter, unknown items, duplicates,
k-core) -> order (stable time order per user) -> split (train/val/test target ranges) -> cut into
shards -> write shards in parallel -> catalog -> manifest last.

Everything between read and write is columnar (polars / numpy over whole columns): a real log has
10^8 rows. This module's `shard_log` holds the whole log in memory (tools/shard_histories.py
--in-memory); bucketed.py writes the same bytes in bounded memory from the same pieces
(`add_sample`, `boundaries_from_lengths`, `examples_from_ranges`, `publish`). Files of one run carry a generation id, so a new run never overwrites the files an
existing manifest points at; the old generation is removed only after the new manifest is live.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import re
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
from patchrec_dist.data.readers import InputError, RawLog, align_id_types

# Fixed tar metadata so the same input gives byte-identical shards (and checksums).
_TAR_MTIME = 0
# Rough tar cost of one user beyond its arrays: three 512-byte headers, padding, json.
_SAMPLE_OVERHEAD_BYTES = 2048
# The names this tool gives its files (a generation id is a UTC time plus 6 hex digits), with the
# temporary names of an atomic write: what --overwrite may remove besides the old manifest's
# files, e.g. the shards of a run that was killed before it could clean up after itself.
_GENERATION = r"\d{8}T\d{6}-[0-9a-f]{6}"
_OWN_FILE = re.compile(rf"^(shards/{_GENERATION}-\d{{5}}\.tar|catalog-{_GENERATION}\.parquet|{MANIFEST_NAME})"
                       r"(\.tmp-\d+)?$")


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
    """Apply the filters; return (interactions with a dense int32 `item` index, catalog)."""
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
    inter = inter.drop("rating", strict=False)

    inter_keys, item_keys = align_id_types(inter["item_key"], items["item_key"])
    items = _sorted_by_key(items.with_columns(item_keys))
    dense = _dense_item_index(inter_keys, items["item_key"])
    unknown = int((dense < 0).sum())
    if unknown:
        if not opts.drop_unknown_items:
            first = int(np.flatnonzero(dense < 0)[0])
            row = int(inter["row"][first]) + 1
            raise InputError(
                f"{inter_file}: row {row}: item {str(inter_keys[first])!r} is not in the items table "
                f"({unknown} such interactions; --drop-unknown-items drops them)"
            )
        if opts.split == "keep":
            raise InputError(f"{inter_file}: {unknown} interactions with items missing from the items table; "
                             "--split keep keeps the input's own target ranges, which dropping them would shift")
        report["dropped_unknown_items"] = unknown
    inter = inter.select("user", "time", "row").with_columns(item=pl.Series(dense, dtype=pl.Int32))
    if unknown:
        inter = inter.filter(pl.col("item") >= 0)

    if opts.dedupe != "none" and opts.split != "keep":
        keys = ["user", "item", "time"] if opts.dedupe == "exact" else ["user", "item"]
        before = inter.height
        inter = drop_duplicates(inter, keys)
        report["dropped_duplicates"] = before - inter.height

    if opts.min_user_interactions > 1 or opts.min_item_interactions > 1:
        inter = k_core(inter, opts.min_user_interactions, opts.min_item_interactions, report)

    if inter.height == 0:
        raise InputError(f"{inter_file}: no interactions left after filtering ({json.dumps(report)})")

    items = items.with_row_index("item").with_columns(pl.col("item").cast(pl.Int32))
    if changing:  # a filtered catalog holds only the items that survived; renumber densely
        present = np.zeros(items.height, dtype=bool)
        present[inter["item"].to_numpy()] = True
        renumber = np.cumsum(present, dtype=np.int64) - 1
        items = items.filter(pl.Series(present)).with_columns(
            pl.Series("item", np.arange(int(present.sum()), dtype=np.int32)))
        inter = inter.with_columns(pl.Series("item", renumber[inter["item"].to_numpy()].astype(np.int32)))
    return inter, items


def drop_duplicates(inter: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Keep the first of rows equal on KEYS (the frame is in input order).

    A hash per row finds the candidates in a fraction of the memory of a full `unique` (which
    needs ~4x the frame at 10^7 rows); the candidates are then compared exactly, so a hash
    collision never drops a row."""
    h = inter.select(pl.struct(keys).hash()).to_series()
    repeated = h.filter(~h.is_first_distinct()).unique()
    if repeated.len() == 0:
        return inter
    suspects = inter.filter(h.is_in(repeated.implode()))
    dup_rows = suspects.filter(~pl.struct(keys).is_first_distinct())["row"]
    return inter.filter(~pl.col("row").is_in(dup_rows.implode()))


def _dense_item_index(keys: pl.Series, catalog_keys: pl.Series) -> np.ndarray:
    """Position of each key in the (sorted) catalog, -1 when absent."""
    if keys.dtype.is_integer() and catalog_keys.len() and catalog_keys.min() >= 0 \
            and catalog_keys.max() < 4 * catalog_keys.len() + 1_000_000:
        # small non-negative integer ids: a lookup table beats a hash join by far
        lut = np.full(int(catalog_keys.max()) + 1, -1, dtype=np.int32)
        lut[catalog_keys.to_numpy()] = np.arange(catalog_keys.len(), dtype=np.int32)
        k = keys.to_numpy()
        inside = (k >= 0) & (k < len(lut))
        out = np.full(len(k), -1, dtype=np.int32)
        out[inside] = lut[k[inside]]
        return out
    table = pl.DataFrame({"item_key": catalog_keys, "_i": pl.int_range(catalog_keys.len(), dtype=pl.Int32, eager=True)})
    joined = pl.DataFrame({"item_key": keys}).join(table, on="item_key", how="left", maintain_order="left")
    return joined["_i"].fill_null(-1).to_numpy()


def k_core(inter: pl.DataFrame, min_user: int, min_item: int, report: dict[str, Any]) -> pl.DataFrame:
    """Repeat the user and item count filters until both hold (a k-core)."""
    rounds = 0
    while True:
        rounds += 1
        before = inter.height
        if min_item > 1:
            inter = inter.filter(pl.len().over("item") >= min_item)
        if min_user > 1:
            inter = inter.filter(pl.len().over("user") >= min_user)
        if inter.height == before:
            break
    report["k_core_rounds"] = rounds
    report["rows_after_k_core"] = inter.height
    return inter


def _sorted_by_key(df: pl.DataFrame, col: str = "item_key") -> pl.DataFrame:
    return df.sort(col, maintain_order=True)


# ---------------------------------------------------------------------------------------------
# order + split


def build_histories(inter: pl.DataFrame, log: RawLog, opts: ShardOptions) -> UserHistories:
    """Group into per-user histories in a stable time order (ties keep input order) and split."""
    # users in key order; inside a user, time order; a stable sort keeps input order on ties
    sort_keys = ["user", "time"] if log.has_timestamps else ["user"]
    inter = inter.sort(sort_keys, maintain_order=True)
    uidx = inter.select(pl.col("user").rle_id()).to_series().to_numpy()
    num_users = int(uidx[-1]) + 1
    counts = np.bincount(uidx, minlength=num_users)
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    user_col = inter["user"]
    user_keys = user_col.gather(offsets[:-1]).cast(pl.Utf8).to_numpy().astype(object)
    items = inter["item"].to_numpy().astype(np.int32, copy=False)
    times = inter["time"].to_numpy().astype(np.int64, copy=False) if log.has_timestamps else None

    if opts.split == "keep":
        ranges = _kept_ranges(user_keys, log)
    elif opts.split == "leave-one-out":
        ranges = _leave_one_out_ranges(counts)
    elif opts.split == "global-time":
        if not log.has_timestamps:
            raise InputError("--split global-time needs timestamps, and this input has none; use --split keep or leave-one-out")
        ranges = _global_time_ranges(times, inter["row"].to_numpy(), uidx, counts, opts.split_fractions)
    else:
        raise InputError(f"--split {opts.split!r}: expected global-time, leave-one-out or keep")
    return UserHistories(user_keys, offsets, items, times, ranges)


def _kept_ranges(user_keys: np.ndarray, log: RawLog) -> np.ndarray:
    if log.splits is None:
        raise InputError("--split keep: this input has no target ranges of its own (the patchrec format has them; a "
                         "table gets them from --split-col); use global-time or leave-one-out")
    users = pl.DataFrame({"user": pl.Series(user_keys.tolist(), dtype=pl.Utf8)}).with_row_index("uidx")
    joined = users.join(log.splits.with_columns(pl.col("user").cast(pl.Utf8)), on="user", how="left").sort("uidx")
    out = np.full((len(user_keys), 3, 2), -1, dtype=np.int64)
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


def _global_time_ranges(times: np.ndarray, rows: np.ndarray, uidx: np.ndarray, counts: np.ndarray,
                        fractions: tuple[float, float, float]) -> np.ndarray:
    """Targets go to train/val/test by global time quantiles: the oldest `train` fraction of all
    interactions are train targets, and so on. Ties in time are broken by input row, the same way
    as inside a user, so each user's history is train, then val, then test: contiguous ranges."""
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise InputError(f"--split-fractions {fractions}: three non-negative fractions that sum to 1")
    n = len(times)
    cut_val = int(np.floor(fractions[0] * n))
    cut_test = int(np.floor((fractions[0] + fractions[1]) * n))
    key = _time_row_key(times, rows)
    split_of = np.zeros(n, dtype=np.int64)
    for cut in (cut_val, cut_test):
        if cut < n:  # the cut-th smallest key starts the next split (a partition, not a sort: O(n))
            kth = np.partition(key, cut)[cut]
            split_of += key >= kth
    per_user = np.bincount(uidx * 3 + split_of, minlength=3 * len(counts)).reshape(-1, 3)
    start = np.concatenate([np.zeros((len(counts), 1), np.int64), np.cumsum(per_user, axis=1)[:, :2]], axis=1)
    out = np.stack([start, start + per_user - 1], axis=2)
    out[per_user == 0] = -1
    return out


def _time_row_key(times: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One int64 per interaction ordering by (time, input row); lexsort ranks when it cannot fit."""
    tmin, span = int(times.min()), int(times.max()) - int(times.min())
    row_bits = max(1, int(rows.max()).bit_length())
    if span.bit_length() + row_bits <= 62:
        return ((times - tmin) << row_bits) | rows.astype(np.int64)
    order = np.lexsort((rows, times))
    rank = np.empty(len(times), dtype=np.int64)
    rank[order] = np.arange(len(times))
    return rank


def examples_per_user(h: UserHistories) -> np.ndarray:
    """(U, 3) examples each user yields per split (targets at position >= 3 of a history of > 3 items)."""
    return examples_from_ranges(h.lengths(), h.ranges)


def examples_from_ranges(lengths: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """examples_per_user from the (U,) history lengths and (U, 3, 2) ranges alone (O(users))."""
    n = np.asarray(lengths)[:, None]
    start, end = ranges[:, :, 0], ranges[:, :, 1]
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
    return boundaries_from_lengths(h.lengths(), h.times is not None, shard_size)


def boundaries_from_lengths(lengths: np.ndarray, has_times: bool, shard_size: str) -> list[tuple[int, int]]:
    """[first, end) user positions of each shard, from the history lengths in data-set order (O(users))."""
    kind, value = parse_shard_size(shard_size)
    u = len(lengths)
    if kind == "users":
        starts = np.arange(0, u, value)
    else:
        per_item = 4 + (8 if has_times else 0)
        cost = np.cumsum(np.asarray(lengths) * per_item + _SAMPLE_OVERHEAD_BYTES)
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


class FastTarWriter:
    """Writes a plain USTAR archive of regular files, a few microseconds per member.

    tarfile's generic header code costs ~40 us a member, and a shard has three members per user
    (10^5-10^6 per data set); everything here is fixed but the name and size, so the header is a
    template with two fields filled in. Readers are the standard ones (tarfile, webdataset).
    Also counts and hashes the bytes on their way out, so a shard is never read back."""

    _BLOCK = 512
    _RECORD = 10240

    def __init__(self, raw) -> None:
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0
        self._buf: list[bytes] = []
        self._buffered = 0
        header = bytearray(self._BLOCK)
        for offset, value in ((100, b"0000444\0"), (108, b"0000000\0"), (116, b"0000000\0"),
                              (136, b"%011o\0" % _TAR_MTIME), (156, b"0"), (257, b"ustar\x00"), (263, b"00"),
                              (265, b"patchrec"), (297, b"patchrec")):
            header[offset : offset + len(value)] = value
        self._template = bytes(header)
        self._base_sum = sum(header) + 8 * 32  # the checksum field counts as eight spaces

    def add(self, name: str, data: bytes) -> None:
        encoded = name.encode()
        if len(encoded) > 100:
            raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
        size_field = b"%011o\0" % len(data)
        checksum = self._base_sum + sum(encoded) + sum(size_field)
        header = b"".join((encoded, self._template[len(encoded) : 124], size_field, self._template[136:148],
                           b"%06o\0 " % checksum, self._template[156:]))
        self._write(header)
        self._write(data)
        pad = -len(data) % self._BLOCK
        if pad:
            self._write(bytes(pad))

    def _write(self, b: bytes) -> None:
        self._buf.append(b)
        self._buffered += len(b)
        if self._buffered >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            chunk = b"".join(self._buf)
            self.sha.update(chunk)
            self.size += len(chunk)
            self.raw.write(chunk)
            self._buf, self._buffered = [], 0

    def close(self) -> None:
        self._write(bytes(2 * self._BLOCK))  # end-of-archive marker
        self._write(bytes(-(self.size + self._buffered) % self._RECORD))
        self.flush()


def npy_bytes(arr: np.ndarray) -> bytes:
    """A 1-D array in .npy format (version 1.0), without numpy's per-call header machinery."""
    arr = np.ascontiguousarray(arr)
    header = f"{{'descr': '{arr.dtype.str}', 'fortran_order': False, 'shape': ({arr.shape[0]},), }}"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin-1") + arr.tobytes()


def write_shard(url: str, storage_options: dict[str, Any], first_user: int, user_keys: list[str],
                offsets: np.ndarray, items: np.ndarray, times: np.ndarray | None,
                ranges: np.ndarray) -> tuple[int, str]:
    """Write one WebDataset tar (one sample per user); return (bytes, sha256).

    Sample `KEY.json` holds the user id and split ranges, `KEY.items.npy` the dense item indices in
    time order, `KEY.times.npy` their timestamps (when the input has them)."""
    bounds = ranges.tolist()
    with storage.open_url(url, "wb", storage_options) as raw:
        tar = FastTarWriter(raw)
        for i, user in enumerate(user_keys):
            a, b = offsets[i], offsets[i + 1]
            add_sample(tar, first_user + i, user, bounds[i], items[a:b], None if times is None else times[a:b])
        tar.close()
    return tar.size, tar.sha.hexdigest()


def add_sample(tar: FastTarWriter, position: int, user: str, bounds: list, items: np.ndarray,
               times: np.ndarray | None) -> None:
    """One user's three members (the only place a sample's bytes are made, for both sharding paths)."""
    key = f"{position:09d}"
    splits = {split: (None if r[0] < 0 else r) for split, r in zip(SPLITS, bounds)}
    tar.add(f"{key}.json", json.dumps({"user": user, "splits": splits}, separators=(",", ":")).encode())
    tar.add(f"{key}.items.npy", npy_bytes(items))
    if times is not None:
        tar.add(f"{key}.times.npy", npy_bytes(times))


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
        return replaced_files(out, opts.storage_options)
    return None


def replaced_files(out: str, storage_options: dict[str, Any]) -> set[str]:
    """What --overwrite replaces: the files the old manifest lists, and files named as this tool
    names its own (an interrupted run's shards, temporary files); never a user's other files
    beside the data set, nor a data set in a subfolder."""
    listed: set[str] = set()
    try:
        old = json.loads(storage.read_bytes(storage.join(out, MANIFEST_NAME), storage_options))
        listed = {s["path"] for s in old.get("shards", [])} | {old["catalog"]["path"]}
    except (ValueError, KeyError, TypeError):
        pass  # an unreadable manifest: only the files named as this tool names them
    present = set(storage.list_files(out, storage_options))
    return (listed & present) | {p for p in present if _OWN_FILE.match(p)}


def shard_log(log: RawLog, opts: ShardOptions, source: dict[str, Any]) -> Manifest:
    """Clean, order, split and write LOG as a data set at opts.output; the manifest is written last."""
    out = opts.output.rstrip("/")
    previous = check_output(opts)

    report: dict[str, Any] = {}
    t0 = time.perf_counter()
    inter, items = clean_interactions(log, opts, report)
    log.interactions = log.interactions.clear()  # the raw frame is no longer needed: free it
    hist = build_histories(inter, log, opts)
    del inter
    per_user = examples_per_user(hist)
    bounds = shard_boundaries(hist, opts.shard_size)
    report["seconds_prepare"] = round(time.perf_counter() - t0, 3)

    counts = {"users": hist.num_users, "items": items.height, "interactions": int(len(hist.items)),
              "examples": {s: int(per_user[:, i].sum()) for i, s in enumerate(SPLITS)}}
    return publish(
        lambda generation, written: _write_shards(hist, per_user, bounds, out, generation, opts, written),
        items, counts, hist.times is not None, log.prompt, opts, source, report, previous)


def publish(write_shards, items: pl.DataFrame, counts: dict[str, Any], has_timestamps: bool,
            prompt: dict[str, str] | None, opts: ShardOptions, source: dict[str, Any], report: dict[str, Any],
            previous: set[str] | None) -> Manifest:
    """Write shards (WRITE_SHARDS(generation, written) -> [ShardInfo]), the catalog, then the manifest;
    remove what was written when anything fails, and the replaced data set's files after success."""
    out = opts.output.rstrip("/")
    manifest_url = storage.join(out, MANIFEST_NAME)
    generation = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    written: list[str] = []
    try:
        shards = write_shards(generation, written)
        catalog = _write_catalog(items, out, generation, opts, written)
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            generation=generation,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            source={**source, "filters": report},
            split={"protocol": opts.split, "fractions": list(opts.split_fractions) if opts.split == "global-time" else None,
                   "min_target_position": MIN_TARGET_POSITION, "ranges": "inclusive target positions [start, end]"},
            has_timestamps=has_timestamps,
            counts=counts,
            catalog=catalog,
            shards=shards,
            prompt=prompt,
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
        .rename({"item_key": "item_id"}).with_columns(pl.col("item_id").cast(pl.Utf8)).write_parquet(buf)
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
