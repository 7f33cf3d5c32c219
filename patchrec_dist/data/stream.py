"""The history stream: examples from a sharded data set, split over ranks and DataLoader workers.

The design in one paragraph. For each epoch there is one *global order* of the split's examples
that depends only on (seed, epoch) and the manifest, never on the number of ranks or workers:
shards are permuted, consecutive shards form *windows* (the bounded shuffle buffer), and the
examples inside a window are permuted. An epoch's *work* is a list of intervals of that order
(all of it for a fresh epoch). The work is cut into `world * workers` equal *pieces* of whole
batches, one per (rank, worker) slot, so every rank gets the same number of batches (design.md:
unequal counts hang ZeRO-3); the remainder is dropped, or padded with repeats flagged `pad`.
Rank r's j-th batch comes from its worker j % W, so after K batches the consumed examples are a
function of K alone: the checkpointed state is (epoch, work, K), the same on every rank. A resume
with the same world size and workers continues exactly; with other sizes, the unconsumed part of
the work becomes the new work: nothing lost, nothing repeated.

Stages (each usable alone): plan_epoch -> slot_intervals -> load_window -> expand_example.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

from patchrec_dist.data import storage
from patchrec_dist.data.manifest import (
    MIN_TARGET_POSITION,
    SPLITS,
    DataSetError,
    Manifest,
    load_manifest,
    verify_blob,
)

Interval = tuple[int, int]  # [start, end) of the global example order


@dataclass(frozen=True)
class StreamConfig:
    split: str = "train"
    batch_size: int = 16  # examples per batch on each rank (the micro-batch)
    seed: int = 42
    shuffle: bool = True
    window_shards: int = 2  # shards whose examples are shuffled together (memory: this many shards)
    max_history: int | None = None  # most recent items kept per example; None keeps the whole history
    remainder: str = "drop"  # drop | pad: what to do with examples that do not fill a batch on every rank
    num_workers: int = 2
    verify_checksums: bool = True
    max_examples: int | None = None  # only the first N examples of the epoch's order (evaluation subsets)
    keep_seen: bool = False  # Example.seen: the whole history before the target (for --exclude-seen)

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split {self.split!r}: expected one of {SPLITS}")
        if self.remainder not in ("drop", "pad"):
            raise ValueError(f"remainder {self.remainder!r}: expected drop or pad")
        if self.batch_size < 1 or self.window_shards < 1 or self.num_workers < 0:
            raise ValueError("batch_size and window_shards must be >= 1, num_workers >= 0")


@dataclass
class Example:
    """One training target: the history before position `position` of a user's sequence."""

    user: str
    position: int  # target position in the user's full history
    target: int  # dense catalog index of the target item
    history: np.ndarray  # int32 item indices, oldest first (capped at max_history)
    times: np.ndarray | None  # int64 timestamps of `history`
    target_time: int | None
    index: int  # position in the epoch's global order
    epoch: int
    pad: bool = False  # a repeat that only fills the last batch (remainder="pad"); weight it 0
    batch: int = -1  # which of its rank's batches (in this epoch) the example lands in
    seen: np.ndarray | None = None  # with keep_seen: every item before the target, not capped


# ---------------------------------------------------------------------------------------------
# planning (pure functions of manifest counts, seed and epoch)


@dataclass
class EpochPlan:
    epoch: int
    shard_order: np.ndarray  # shard indices in this epoch's order
    window_starts: np.ndarray  # (num_windows + 1,) global order offset of each window
    windows: list[list[int]]  # shard indices of each window
    work: list[Interval]
    slots: int  # world * workers
    piece: int  # examples per slot (a multiple of batch_size)
    real: int  # examples of `work` that are covered (the rest are dropped, or padded up to slots*piece)

    @property
    def total(self) -> int:
        return int(self.window_starts[-1])


def plan_epoch(manifest: Manifest, cfg: StreamConfig, epoch: int, world: int, workers: int,
               work: list[Interval] | None = None) -> EpochPlan:
    counts = np.array([s.examples[cfg.split] for s in manifest.shards], dtype=np.int64)
    order = np.arange(len(counts))
    if cfg.shuffle:
        order = np.random.default_rng([cfg.seed, epoch, 0]).permutation(len(counts))
    windows = [order[i : i + cfg.window_shards].tolist() for i in range(0, len(order), cfg.window_shards)]
    window_starts = np.zeros(len(windows) + 1, dtype=np.int64)
    np.cumsum([counts[w].sum() for w in windows], out=window_starts[1:])
    total = int(window_starts[-1])
    if cfg.max_examples is not None:
        total = min(total, cfg.max_examples)
    work = [(0, total)] if work is None else [(int(a), int(b)) for a, b in work if b > a]
    available = sum(b - a for a, b in work)
    slots = world * max(1, workers)
    if cfg.remainder == "drop":
        piece = (available // (slots * cfg.batch_size)) * cfg.batch_size
    else:
        piece = math.ceil(available / (slots * cfg.batch_size)) * cfg.batch_size if available else 0
    real = min(available, slots * piece)
    return EpochPlan(epoch, order, window_starts, windows, work, slots, piece, real)


def _map_work(work: list[Interval], start: int, end: int) -> list[Interval]:
    """Global intervals covering positions [start, end) of the concatenation of WORK."""
    out, pos = [], 0
    for a, b in work:
        n = b - a
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            out.append((a + lo - pos, a + hi - pos))
        pos += n
        if pos >= end:
            break
    return out


def slot_intervals(plan: EpochPlan, slot: int, skip: int = 0) -> list[tuple[Interval, bool]]:
    """Global intervals slot SLOT reads after skipping its first SKIP examples; bool marks padding."""
    available = sum(b - a for a, b in plan.work)
    start, end = slot * plan.piece + skip, (slot + 1) * plan.piece
    real_end = min(end, available)
    out = [(iv, False) for iv in _map_work(plan.work, start, real_end)] if start < real_end else []
    if end > available and available:  # padding repeats the work from its beginning
        lo = max(start, available)
        while lo < end:
            a = (lo - available) % available
            n = min(end - lo, available - a)
            out += [(iv, True) for iv in _map_work(plan.work, a, a + n)]
            lo += n
    return out


def consumed_work(plan: EpochPlan, workers: int, batch_size: int, batches: int) -> list[Interval]:
    """The work left after every rank consumed BATCHES batches (rank-independent)."""
    remaining = []
    for slot in range(plan.slots):
        worker = slot % workers
        done = _worker_batches_before(batches, worker, workers) * batch_size
        remaining += [iv for iv, pad in slot_intervals(plan, slot, done) if not pad]
    total_work = sum(b - a for a, b in plan.work)
    remaining += _map_work(plan.work, plan.real, total_work)  # the dropped tail was never seen: keep it
    return _merge(remaining)


def _worker_batches_before(batches: int, worker: int, workers: int) -> int:
    """Batches worker WORKER had produced once its rank consumed BATCHES batches (round robin)."""
    return max(0, (batches - worker + workers - 1) // workers)


def _merge(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


# ---------------------------------------------------------------------------------------------
# reading


@dataclass
class UserRecord:
    user: str
    items: np.ndarray
    times: np.ndarray | None
    splits: dict[str, list[int] | None]


def decode_shard(data: bytes, url: str) -> list[UserRecord]:
    """Samples of one shard tar, in file order."""
    records = []
    try:
        files = tariterators.tar_file_expander([{"stream": io.BytesIO(data), "url": url}])
        for sample in tariterators.group_by_keys(files):
            meta = json.loads(sample["json"])
            items = np.load(io.BytesIO(sample["items.npy"]), allow_pickle=False)
            times = np.load(io.BytesIO(sample["times.npy"]), allow_pickle=False) if "times.npy" in sample else None
            records.append(UserRecord(meta["user"], items, times, meta["splits"]))
    except (tarfile.TarError, KeyError, ValueError) as exc:
        raise DataSetError(f"{url}: unreadable shard: {type(exc).__name__}: {exc}") from exc
    return records


def read_shard(manifest: Manifest, index: int, verify: bool = True,
               storage_options: dict[str, Any] | None = None) -> list[UserRecord]:
    info = manifest.shards[index]
    url = manifest.shard_url(index)
    try:
        data = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise DataSetError(f"{url}: shard listed in the manifest is missing") from None
    if verify:
        verify_blob(data, url, info.bytes, info.sha256)
    records = decode_shard(data, url)
    if len(records) != info.samples:
        raise DataSetError(f"{url}: {len(records)} samples, manifest says {info.samples}")
    return records


@dataclass
class Window:
    """The users of one window's shards and where each one's examples start in the window."""

    index: int
    users: list[UserRecord]
    first_target: np.ndarray  # (U,) first target position of the split per user
    example_offsets: np.ndarray  # (U+1,) CSR offsets of each user's examples
    permutation: np.ndarray | None  # window-local order -> example id


def load_window(manifest: Manifest, plan: EpochPlan, cfg: StreamConfig, w: int,
                storage_options: dict[str, Any] | None = None) -> Window:
    users: list[UserRecord] = []
    for shard in plan.windows[w]:
        users += read_shard(manifest, shard, cfg.verify_checksums, storage_options)
    first = np.zeros(len(users), dtype=np.int64)
    counts = np.zeros(len(users), dtype=np.int64)
    for i, u in enumerate(users):
        rng, n = u.splits.get(cfg.split), len(u.items)
        if rng is None or n <= MIN_TARGET_POSITION:
            continue
        lo, hi = max(rng[0], MIN_TARGET_POSITION), min(rng[1], n - 1)
        first[i], counts[i] = lo, max(0, hi - lo + 1)
    offsets = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    expected = int(plan.window_starts[w + 1] - plan.window_starts[w])
    if offsets[-1] != expected:
        raise DataSetError(f"window {w} (shards {plan.windows[w]}): {offsets[-1]} {cfg.split} examples, "
                           f"the manifest says {expected}")
    perm = None
    if cfg.shuffle:
        perm = np.random.default_rng([cfg.seed, plan.epoch, 1, w]).permutation(expected)
    return Window(w, users, first, offsets, perm)


def expand_example(window: Window, local: int, cfg: StreamConfig, index: int, epoch: int, pad: bool) -> Example:
    eid = int(window.permutation[local]) if window.permutation is not None else local
    u = int(np.searchsorted(window.example_offsets, eid, side="right") - 1)
    rec = window.users[u]
    t = int(window.first_target[u] + eid - window.example_offsets[u])
    lo = 0 if cfg.max_history is None else max(0, t - cfg.max_history)
    times = rec.times
    return Example(
        user=rec.user, position=t, target=int(rec.items[t]), history=rec.items[lo:t],
        times=None if times is None else times[lo:t], target_time=None if times is None else int(times[t]),
        index=index, epoch=epoch, pad=pad, seen=rec.items[:t] if cfg.keep_seen else None,
    )


def iter_examples(manifest: Manifest, plan: EpochPlan, cfg: StreamConfig,
                  intervals: list[tuple[Interval, bool]], storage_options=None) -> Iterator[Example]:
    """Examples of the given global intervals, loading one window at a time."""
    window: Window | None = None
    for (a, b), pad in intervals:
        g = a
        while g < b:
            w = int(np.searchsorted(plan.window_starts, g, side="right") - 1)
            if window is None or window.index != w:
                window = load_window(manifest, plan, cfg, w, storage_options)
            stop = min(b, int(plan.window_starts[w + 1]))
            base = int(plan.window_starts[w])
            for gi in range(g, stop):
                yield expand_example(window, gi - base, cfg, gi, plan.epoch, pad)
            g = stop


# ---------------------------------------------------------------------------------------------
# the torch side


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class HistoryStream(IterableDataset):
    """Examples of one rank for one pass, from batch `start_batch` on; workers read disjoint pieces.

    `transform` maps an Example to what the collate function takes (the patching stage plugs in
    here so it runs on the workers)."""

    def __init__(self, manifest: Manifest, cfg: StreamConfig, plan: EpochPlan, rank: int, workers: int,
                 start_batch: int = 0, transform: Callable[[Example], Any] | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.manifest, self.cfg, self.plan, self.rank = manifest, cfg, plan, rank
        self.workers, self.start_batch, self.transform = max(1, workers), start_batch, transform
        self.storage_options = storage_options

    def _slot_worker(self) -> int:
        info = get_worker_info()
        i = info.id if info is not None else 0
        # DataLoader asks worker 0 first; after K batches the next batch belongs to worker K % W.
        return (i + self.start_batch) % self.workers

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        if info is None and self.workers > 1:
            # in-process: interleave the workers' batches the same way a DataLoader would
            yield from self._iter_in_process()
            return
        worker = self._slot_worker()
        yield from self._iter_worker(worker)

    def _iter_worker(self, worker: int) -> Iterator[Any]:
        slot = self.rank * self.workers + worker
        done = _worker_batches_before(self.start_batch, worker, self.workers)
        b = self.cfg.batch_size
        examples = iter_examples(self.manifest, self.plan, self.cfg, slot_intervals(self.plan, slot, done * b),
                                 self.storage_options)
        for i, ex in enumerate(examples):
            ex.batch = (done + i // b) * self.workers + worker
            yield self.transform(ex) if self.transform else ex

    def _iter_in_process(self) -> Iterator[Any]:
        iters = [self._iter_worker((i + self.start_batch) % self.workers) for i in range(self.workers)]
        b = self.cfg.batch_size
        while iters:
            for it in list(iters):
                chunk = [x for _, x in zip(range(b), it)]
                if len(chunk) < b:
                    iters.remove(it)
                yield from chunk


def collate_examples(batch: list[Any]) -> list[Any]:
    return batch


def _worker_ignores_stop_signals(worker_id: int) -> None:
    """SIGTERM/SIGUSR1 are for the trainer: the deepspeed launcher signals the whole process tree,
    and a worker that died on it would fail the step the trainer is finishing before it saves."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class StreamLoader:
    """A DataLoader over HistoryStream that knows where it is: iterate it for one epoch's batches;
    state_dict() / load_state_dict() give a rank-independent position (epoch, work, batches)."""

    def __init__(self, data: str | Manifest, cfg: StreamConfig, rank: int | None = None,
                 world: int | None = None, transform: Callable[[Example], Any] | None = None,
                 collate_fn: Callable[[list[Any]], Any] = collate_examples,
                 storage_options: dict[str, Any] | None = None, prefetch_factor: int = 4) -> None:
        self.manifest = data if isinstance(data, Manifest) else load_manifest(data, storage_options)
        if world is None or rank is None:
            rank, world = _dist_rank_world()
        self.cfg, self.rank, self.world = cfg, rank, world
        self.transform, self.collate_fn, self.storage_options = transform, collate_fn, storage_options
        self.prefetch_factor = prefetch_factor
        self.epoch, self.batches_done = 0, 0
        self._work: list[Interval] | None = None
        self._plan = self._make_plan()

    @property
    def workers(self) -> int:
        return max(1, self.cfg.num_workers)

    def _make_plan(self) -> EpochPlan:
        plan = plan_epoch(self.manifest, self.cfg, self.epoch, self.world, self.workers, self._work)
        if plan.piece == 0:
            raise DataSetError(
                f"{self.manifest.root}: {sum(b - a for a, b in plan.work)} {self.cfg.split} examples left cannot give "
                f"one batch of {self.cfg.batch_size} to each of {self.world} ranks x {self.workers} workers "
                "(lower --micro-batch or workers, or use remainder=pad)")
        return plan

    def __len__(self) -> int:
        """Batches each rank gets in the current epoch (the same on every rank)."""
        return (self._plan.piece // self.cfg.batch_size) * self.workers

    @property
    def plan(self) -> EpochPlan:
        return self._plan

    def __iter__(self) -> Iterator[Any]:
        total = len(self)
        if self.batches_done < total:
            stream = HistoryStream(self.manifest, self.cfg, self._plan, self.rank, self.workers,
                                   self.batches_done, self.transform, self.storage_options)
            loader = DataLoader(
                stream, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers,
                collate_fn=self.collate_fn, persistent_workers=False, pin_memory=torch.cuda.is_available(),
                prefetch_factor=self.prefetch_factor if self.cfg.num_workers > 0 else None,
                multiprocessing_context="fork" if self.cfg.num_workers > 0 else None,
                worker_init_fn=_worker_ignores_stop_signals if self.cfg.num_workers > 0 else None,
            )
            for batch in loader:
                self.batches_done += 1
                yield batch
                if self.batches_done >= total:
                    break
        self.epoch += 1
        self.batches_done, self._work = 0, None
        self._plan = self._make_plan()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "batches_done": self.batches_done,
            "work": [list(iv) for iv in self._plan.work], "world": self.world, "workers": self.workers,
            "batch_size": self.cfg.batch_size, "split": self.cfg.split, "seed": self.cfg.seed,
            "shuffle": self.cfg.shuffle, "window_shards": self.cfg.window_shards,
            "remainder": self.cfg.remainder, "generation": self.manifest.generation,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("split", "seed", "shuffle", "window_shards", "generation"):
            mine = self.manifest.generation if key == "generation" else getattr(self.cfg, key)
            if state[key] != mine:
                raise ValueError(f"stream state has {key}={state[key]!r}, this stream has {mine!r}: "
                                 "the example order would differ")
        self.epoch = int(state["epoch"])
        work = [tuple(iv) for iv in state["work"]]
        same_layout = (state["world"], state["workers"], state["batch_size"], state["remainder"]) == (
            self.world, self.workers, self.cfg.batch_size, self.cfg.remainder)
        if same_layout:
            self._work, self.batches_done = work, int(state["batches_done"])
            self._plan = self._make_plan()
            return
        # another world size / worker count / batch: continue with what nobody consumed yet
        old_cfg = StreamConfig(**{**self.cfg.__dict__, "batch_size": state["batch_size"],
                                  "remainder": state["remainder"], "num_workers": state["workers"]})
        old = plan_epoch(self.manifest, old_cfg, self.epoch, state["world"], state["workers"], work)
        self._work = consumed_work(old, state["workers"], state["batch_size"], int(state["batches_done"]))
        self.batches_done = 0
        self._plan = self._make_plan()


def stream_statistics(manifest: Manifest, split: str) -> dict[str, Any]:
    """Counts a user would ask for before training: examples per split, shards, history lengths."""
    lengths = []
    for i in range(len(manifest.shards)):
        lengths += [len(r.items) for r in read_shard(manifest, i)]
    arr = np.asarray(lengths)
    return {
        "users": int(len(arr)), "shards": len(manifest.shards), "split": split,
        "examples": manifest.num_examples(split),
        "history_length": {"mean": float(arr.mean()), "median": float(np.median(arr)), "max": int(arr.max())},
    }


__all__ = [
    "EpochPlan", "Example", "HistoryStream", "StreamConfig", "StreamLoader", "UserRecord", "Window",
    "collate_examples", "consumed_work", "decode_shard", "expand_example", "iter_examples", "load_window",
    "plan_epoch", "read_shard", "slot_intervals", "stream_statistics",
]
