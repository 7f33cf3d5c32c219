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

Reading never makes the consumer wait: each reader loads the next window on a thread while the
current one is consumed (Prefetcher, one window ahead), the DataLoader workers live across epochs
(StreamLoader keeps one DataLoader pass; HistoryStream iterates the epochs itself), and remote
shards come in ranged requests retried one range at a time (storage.read_ranged). None of this
changes the order or the checkpointed position.

Stages (each usable alone): plan_epoch -> slot_intervals -> load_window -> expand_example.
"""

from __future__ import annotations

import io
import json
import math
import queue
import tarfile
import threading
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
    # read and decode the next window on a thread while this one is consumed (memory: two windows);
    # the examples and their order are the same either way
    prefetch: bool = True

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
        # ranged reads, each retried on transient errors; a missing shard fails at once
        data = storage.read_ranged(url, info.bytes, storage_options)
    except FileNotFoundError:
        raise DataSetError(f"{url}: shard listed in the manifest is missing") from None
    except storage.StorageError:
        raise  # its message names the URL
    except Exception as exc:  # what a store may raise besides OSError: still name the shard
        raise DataSetError(f"{url}: reading the shard failed: {type(exc).__name__}: {exc}") from exc
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


@dataclass
class _Visit:
    """One stay of a reader in one window: the runs [start, stop) of the global order it takes from
    there, in order. `first` is the reader's position (examples) in its epoch sequence at the visit's
    first example; `batch_base` counts the loader's batches in earlier epochs of this pass."""

    plan: EpochPlan
    window: int
    runs: list[tuple[int, int, bool]]
    first: int = 0
    batch_base: int = 0


def _visits(plan: EpochPlan, intervals: list[tuple[Interval, bool]], first: int = 0,
            batch_base: int = 0) -> Iterator[_Visit]:
    """The window visits of INTERVALS, in order (the window is reloaded when it changes, as before)."""
    cur: _Visit | None = None
    pos = first
    for (a, b), pad in intervals:
        g = a
        while g < b:
            w = int(np.searchsorted(plan.window_starts, g, side="right") - 1)
            stop = min(b, int(plan.window_starts[w + 1]))
            if cur is not None and cur.window == w:
                cur.runs.append((g, stop, pad))
            else:
                if cur is not None:
                    yield cur
                cur = _Visit(plan, w, [(g, stop, pad)], pos, batch_base)
            pos += stop - g
            g = stop
    if cur is not None:
        yield cur


def _visit_examples(visit: _Visit, window: Window, cfg: StreamConfig) -> Iterator[Example]:
    base = int(visit.plan.window_starts[visit.window])
    for g0, g1, pad in visit.runs:
        for gi in range(g0, g1):
            yield expand_example(window, gi - base, cfg, gi, visit.plan.epoch, pad)


class Prefetcher:
    """(key, load(key)) for every key of KEYS, in order, loaded on a daemon thread at most one item
    ahead of the consumer: item k+1 is loaded while item k is consumed, never k+2 (a window is the
    bounded shuffle buffer; prefetching holds two). An error in KEYS or LOAD is raised to the
    consumer, as it was raised, at the item it belongs to. close() stops the thread (after the load
    in progress, if any); a consumer that stops early must call it (iter_windows does)."""

    _END = object()

    def __init__(self, keys: Iterator[Any], load: Callable[[Any], Any], name: str = "patchrec-prefetch") -> None:
        self._keys, self._load = keys, load
        self._results: queue.Queue = queue.Queue()  # never holds more than one item (the permit below)
        self._permit = threading.Semaphore(1)  # released by the consumer when it takes an item
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for key in self._keys:
                self._permit.acquire()
                if self._stop.is_set():
                    return
                self._results.put((key, self._load(key), None))
            self._results.put(self._END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who raises it
            self._results.put((None, None, exc))

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> tuple[Any, Any]:
        if self._done:
            raise StopIteration
        item = self._results.get()
        if item is self._END:
            self._done = True
            raise StopIteration
        key, value, exc = item
        if exc is not None:
            self._done = True
            raise exc
        self._permit.release()  # the thread may load the next item while this one is consumed
        return key, value

    def close(self, timeout: float = 2.0) -> None:
        self._done = True
        self._stop.set()
        self._permit.release()
        self._thread.join(timeout)


def iter_windows(manifest: Manifest, cfg: StreamConfig, visits: Iterator[_Visit],
                 storage_options: dict[str, Any] | None = None) -> Iterator[tuple[_Visit, Window]]:
    """(visit, its window) in order; with cfg.prefetch the next window is read on a thread meanwhile."""

    def load(v: _Visit) -> Window:
        return load_window(manifest, v.plan, cfg, v.window, storage_options)

    if not cfg.prefetch:
        for v in visits:
            yield v, load(v)
        return
    prefetcher = Prefetcher(visits, load, name="patchrec-window-prefetch")
    try:
        yield from prefetcher
    finally:
        prefetcher.close()


def iter_examples(manifest: Manifest, plan: EpochPlan, cfg: StreamConfig,
                  intervals: list[tuple[Interval, bool]], storage_options=None) -> Iterator[Example]:
    """Examples of the given global intervals, loading one window at a time (the next one ahead
    of time with cfg.prefetch)."""
    for visit, window in iter_windows(manifest, cfg, _visits(plan, intervals), storage_options):
        yield from _visit_examples(visit, window, cfg)


# ---------------------------------------------------------------------------------------------
# the torch side


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class HistoryStream(IterableDataset):
    """Examples of one rank for one pass, from batch `start_batch` on; workers read disjoint pieces.

    `transform` maps an Example to what the collate function takes (the patching stage plugs in
    here so it runs on the workers).

    With `continue_epochs` a worker does not stop at the end of PLAN's epoch: it goes on with the
    next epochs (fresh plans from (seed, epoch), its same slot, from their batch 0), so one
    DataLoader pass serves every epoch and its workers live as long as it does (StreamLoader).
    Each worker gives exactly piece / batch_size batches per epoch, so the DataLoader's round robin
    stays aligned across epoch boundaries: batch j of every epoch still comes from slot worker j % W.
    A transform with a `micro_step_offset` (the Patcher: PPT's schedule counts micro-batches from
    the trainer's value for the epoch's batch 0) gets it advanced here, where it runs, by the
    batches of the earlier epochs of the pass; a worker's copy would otherwise keep the value it
    was forked with (the trainer's micro_batch_source sets the same values in the main process)."""

    def __init__(self, manifest: Manifest, cfg: StreamConfig, plan: EpochPlan, rank: int, workers: int,
                 start_batch: int = 0, transform: Callable[[Example], Any] | None = None,
                 storage_options: dict[str, Any] | None = None, continue_epochs: bool = False) -> None:
        self.manifest, self.cfg, self.plan, self.rank = manifest, cfg, plan, rank
        self.workers, self.start_batch, self.transform = max(1, workers), start_batch, transform
        self.storage_options, self.continue_epochs = storage_options, continue_epochs

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

    def _worker_visits(self, worker: int) -> Iterator[_Visit]:
        """The window visits of slot worker WORKER: PLAN's epoch from start_batch on, then (with
        continue_epochs) every later epoch whole."""
        slot, b, w = self.rank * self.workers + worker, self.cfg.batch_size, self.workers
        plan, world = self.plan, self.plan.slots // self.workers
        first = _worker_batches_before(self.start_batch, worker, w) * b
        batch_base = 0
        while True:
            yield from _visits(plan, slot_intervals(plan, slot, first), first, batch_base)
            if not self.continue_epochs:
                return
            batch_base += (plan.piece // b) * w
            plan, first = plan_epoch(self.manifest, self.cfg, plan.epoch + 1, world, w), 0
            if plan.piece == 0:  # StreamLoader refuses such a stream up front; never spin here
                return

    def _iter_worker(self, worker: int) -> Iterator[Any]:
        b, transform = self.cfg.batch_size, self.transform
        offset0 = getattr(transform, "micro_step_offset", None)  # read where the transform runs, at the start
        windows = iter_windows(self.manifest, self.cfg, self._worker_visits(worker), self.storage_options)
        try:
            for visit, window in windows:
                for k, ex in enumerate(_visit_examples(visit, window, self.cfg)):
                    ex.batch = ((visit.first + k) // b) * self.workers + worker
                    if transform is None:
                        yield ex
                        continue
                    if offset0 is not None:  # set per example: in-process workers share one transform
                        transform.micro_step_offset = offset0 + visit.batch_base
                    yield transform(ex)
        finally:
            windows.close()  # stops the prefetch thread now, not when the generator is collected

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


_ENDED = object()


class StreamLoader:
    """A DataLoader over HistoryStream that knows where it is: iterate it for one epoch's batches;
    state_dict() / load_state_dict() give a rank-independent position (epoch, work, batches).

    Workers persist across epochs (`persistent_workers`, the default). DataLoader's own
    persistent_workers=True does not fit: each new iter() restarts iter(dataset) on the workers'
    copies of the dataset, forked before the epoch changed, so they could not learn the next
    epoch's plan (or a resumed work list) without a side channel, and nothing could be read ahead
    across the boundary. Instead the workers iterate every epoch themselves (HistoryStream's
    continue_epochs) and this loader keeps one DataLoader iterator for as long as the stream runs
    on: an epoch ends after len(self) batches, the next one takes the following batches of the
    same iterator, whose workers are already reading and patching them. The order and the
    checkpointed position are what a fresh DataLoader per epoch would give: the position counts
    consumed batches only, never the ones waiting in the DataLoader's queue. An epoch abandoned
    before its end (the consumer closed or dropped its iterator), an error, load_state_dict() and
    close() shut the workers down; the next iteration starts new ones at the saved position."""

    def __init__(self, data: str | Manifest, cfg: StreamConfig, rank: int | None = None,
                 world: int | None = None, transform: Callable[[Example], Any] | None = None,
                 collate_fn: Callable[[list[Any]], Any] = collate_examples,
                 storage_options: dict[str, Any] | None = None, prefetch_factor: int = 4,
                 persistent_workers: bool = True) -> None:
        self.manifest = data if isinstance(data, Manifest) else load_manifest(data, storage_options)
        if world is None or rank is None:
            rank, world = _dist_rank_world()
        self.cfg, self.rank, self.world = cfg, rank, world
        self.transform, self.collate_fn, self.storage_options = transform, collate_fn, storage_options
        self.prefetch_factor, self.persistent_workers = prefetch_factor, persistent_workers
        self.epoch, self.batches_done = 0, 0
        self._work: list[Interval] | None = None
        self._plan = self._make_plan()
        self._batches: Iterator[Any] | None = None  # the DataLoader iterator, positioned at the next batch

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

    def _batch_iterator(self) -> Iterator[Any]:
        if self._batches is None:
            stream = HistoryStream(self.manifest, self.cfg, self._plan, self.rank, self.workers,
                                   self.batches_done, self.transform, self.storage_options,
                                   continue_epochs=self.persistent_workers)
            workers = self.cfg.num_workers
            loader = DataLoader(
                stream, batch_size=self.cfg.batch_size, num_workers=workers,
                collate_fn=self.collate_fn, persistent_workers=False, pin_memory=torch.cuda.is_available(),
                prefetch_factor=self.prefetch_factor if workers > 0 else None,
                multiprocessing_context="fork" if workers > 0 else None,
                worker_init_fn=_worker_ignores_stop_signals if workers > 0 else None,
            )
            self._batches = iter(loader)
        return self._batches

    def __iter__(self) -> Iterator[Any]:
        total = len(self)
        if self.batches_done < total:
            batches = self._batch_iterator()
            try:
                while self.batches_done < total:
                    batch = next(batches, _ENDED)
                    if batch is _ENDED:
                        raise RuntimeError(f"{self.manifest.root}: the stream ended after {self.batches_done} of "
                                           f"{total} batches of epoch {self.epoch}")
                    self.batches_done += 1
                    yield batch
            except BaseException:  # abandoned mid-epoch (GeneratorExit) or failed: no workers left behind
                self.close()
                raise
        self.epoch += 1
        self.batches_done, self._work = 0, None
        self._plan = self._make_plan()
        if not self.persistent_workers:
            self.close()

    def close(self) -> None:
        """Shut the DataLoader workers down now (the position is kept; iterating again restarts them)."""
        batches, self._batches = self._batches, None
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "batches_done": self.batches_done,
            "work": [list(iv) for iv in self._plan.work], "world": self.world, "workers": self.workers,
            "batch_size": self.cfg.batch_size, "split": self.cfg.split, "seed": self.cfg.seed,
            "shuffle": self.cfg.shuffle, "window_shards": self.cfg.window_shards,
            "remainder": self.cfg.remainder, "generation": self.manifest.generation,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()  # running workers are positioned for the old state
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
    "EpochPlan", "Example", "HistoryStream", "Prefetcher", "StreamConfig", "StreamLoader", "UserRecord", "Window",
    "collate_examples", "consumed_work", "decode_shard", "expand_example", "iter_examples", "iter_windows",
    "load_window", "plan_epoch", "read_shard", "slot_intervals", "stream_statistics",
]
