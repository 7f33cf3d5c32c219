"""The history stream: disjoint pieces for ranks and workers, equal batch counts, exact resume."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from patchrec_dist.data.manifest import DataSetError, load_manifest
from patchrec_dist.data.stream import (
    StreamConfig,
    StreamLoader,
    iter_examples,
    plan_epoch,
    read_shard,
    slot_intervals,
)
from tests.conftest import REPO


def indices(loader) -> list[list[int]]:
    return [[e.index for e in b] for b in loader]


def all_records(root: str) -> dict[str, np.ndarray]:
    m = load_manifest(root)
    return {r.user: r for i in range(len(m.shards)) for r in read_shard(m, i)}


def test_examples_are_the_histories_before_each_target(small_dataset):
    m = load_manifest(small_dataset)
    records = all_records(small_dataset)
    cfg = StreamConfig(split="train", batch_size=4, num_workers=0, remainder="pad", max_history=7)
    seen = set()
    for batch in StreamLoader(m, cfg, rank=0, world=1):
        for e in batch:
            rec = records[e.user]
            lo, hi = rec.splits["train"]
            assert max(lo, 3) <= e.position <= hi
            assert e.target == rec.items[e.position]
            assert list(e.history) == list(rec.items[max(0, e.position - 7) : e.position])
            assert list(e.times) == list(rec.times[max(0, e.position - 7) : e.position])
            if not e.pad:
                seen.add((e.user, e.position))
    assert len(seen) == m.num_examples("train")


@pytest.mark.parametrize("world,workers", [(1, 1), (1, 3), (2, 2), (3, 1)])
def test_pieces_cover_the_epoch_once_with_equal_batches(small_dataset, world, workers):
    m = load_manifest(small_dataset)
    total = m.num_examples("train")
    for remainder in ("drop", "pad"):
        cfg = StreamConfig(split="train", batch_size=5, num_workers=workers, remainder=remainder)
        plan = plan_epoch(m, cfg, epoch=0, world=world, workers=workers)
        got, pads = [], 0
        for slot in range(world * workers):
            ivs = slot_intervals(plan, slot)
            n = sum(b - a for (a, b), _ in ivs)
            assert n == plan.piece and plan.piece % 5 == 0
            got += [g for (a, b), pad in ivs if not pad for g in range(a, b)]
            pads += sum(b - a for (a, b), pad in ivs if pad)
        assert len(got) == len(set(got))
        if remainder == "pad":
            assert sorted(got) == list(range(total)) and pads < world * workers * 5
        else:
            assert total - len(got) < world * workers * 5 and pads == 0


def test_order_depends_on_seed_and_epoch_only(small_dataset):
    m = load_manifest(small_dataset)
    cfg = StreamConfig(split="train", batch_size=4, num_workers=0)
    plan = plan_epoch(m, cfg, 0, 1, 1)
    order = [(e.user, e.position) for e in iter_examples(m, plan, cfg, [((0, plan.total), False)])]
    again = [(e.user, e.position) for e in iter_examples(m, plan, cfg, [((0, plan.total), False)])]
    assert order == again and len(set(order)) == plan.total
    plan1 = plan_epoch(m, cfg, 1, 1, 1)
    other_epoch = [(e.user, e.position) for e in iter_examples(m, plan1, cfg, [((0, plan1.total), False)])]
    assert sorted(other_epoch) == sorted(order) and other_epoch != order
    # the global order does not depend on the number of ranks or workers
    plan4 = plan_epoch(m, cfg, 0, 2, 2)
    assert [(e.user, e.position) for e in iter_examples(m, plan4, cfg, [((0, plan4.total), False)])] == order


def test_worker_processes_and_in_process_give_the_same_batches(small_dataset):
    cfg2 = StreamConfig(split="train", batch_size=4, num_workers=2)
    with_workers = indices(StreamLoader(small_dataset, cfg2, rank=1, world=2))
    loader = StreamLoader(small_dataset, cfg2, rank=1, world=2)
    loader.cfg = StreamConfig(split="train", batch_size=4, num_workers=0)  # same plan, read in-process

    def in_process():
        from patchrec_dist.data.stream import HistoryStream

        stream = HistoryStream(loader.manifest, cfg2, loader.plan, 1, 2)
        items = list(stream)
        return [[e.index for e in items[i : i + 4]] for i in range(0, len(items), 4)]

    assert in_process() == with_workers


@pytest.mark.multiproc
def test_two_ranks_two_workers_as_processes(small_dataset):
    """Two rank processes, each with two DataLoader worker processes: every example exactly once."""
    procs = [subprocess.Popen([sys.executable, "tests/scripts/stream_rank.py", small_dataset, str(r), "2", "2", "4",
                               "pad"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    counts = [len(o["batches"]) for o in outs]
    assert counts[0] == counts[1] > 0
    real = [(u, pos) for o in outs for b in o["batches"] for idx, pad, u, pos in b if not pad]
    assert len(real) == len(set(real)) == load_manifest(small_dataset).num_examples("train")


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_is_exact(small_dataset, workers):
    cfg = StreamConfig(split="train", batch_size=4, num_workers=workers, seed=5)
    full = indices(StreamLoader(small_dataset, cfg, rank=0, world=2))
    first = StreamLoader(small_dataset, cfg, rank=0, world=2)
    head = []
    for b in first:
        head.append([e.index for e in b])
        if len(head) == 7:
            break
    state = json.loads(json.dumps(first.state_dict()))  # it goes to a JSON file beside the checkpoint
    resumed = StreamLoader(small_dataset, cfg, rank=0, world=2)
    resumed.load_state_dict(state)
    assert len(resumed) == len(full)
    assert head + indices(resumed) == full
    assert resumed.epoch == 1 and resumed.batches_done == 0  # then the next epoch starts


def _run_ranks(data, world, workers, batch, state_file="-", stop=None, state_out=None):
    outs = []
    for r in range(world):
        cmd = [sys.executable, "tests/scripts/stream_rank.py", data, str(r), str(world), str(workers), str(batch), "pad",
               state_file]
        if stop is not None:
            cmd += [str(stop), f"{state_out}.{r}"]
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=90)
        assert p.returncode == 0, p.stderr
        outs.append(json.loads(p.stdout.strip().splitlines()[-1])["batches"])
    return outs


@pytest.mark.multiproc
def test_resume_with_other_world_size_and_workers_loses_and_repeats_nothing(small_dataset, tmp_path):
    state_out = str(tmp_path / "state")
    head = _run_ranks(small_dataset, 2, 2, 4, stop=5, state_out=state_out)
    states = [json.load(open(f"{state_out}.{r}")) for r in range(2)]
    assert states[0] == states[1]  # the position is rank-independent
    tail = _run_ranks(small_dataset, 3, 1, 3, state_file=f"{state_out}.0")
    assert len({len(t) for t in tail}) == 1  # equal batches on the new ranks too
    seen = [(u, pos) for part in head + tail for b in part for _, pad, u, pos in b if not pad]
    assert len(seen) == len(set(seen)) == load_manifest(small_dataset).num_examples("train")


def test_state_from_another_stream_is_refused(small_dataset):
    a = StreamLoader(small_dataset, StreamConfig(split="train", batch_size=4, num_workers=0, seed=1), rank=0, world=1)
    b = StreamLoader(small_dataset, StreamConfig(split="train", batch_size=4, num_workers=0, seed=2), rank=0, world=1)
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict(a.state_dict())


def test_too_little_data_for_the_ranks_is_a_clear_error(small_dataset):
    with pytest.raises(DataSetError, match="cannot give one batch"):
        StreamLoader(small_dataset, StreamConfig(split="test", batch_size=512, num_workers=2), rank=0, world=8)


def test_altered_shard_fails_the_stream(small_dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small_dataset, copy)
    m = load_manifest(str(copy))
    path = copy / m.shards[1].path
    path.write_bytes(path.read_bytes()[:-512])
    with pytest.raises(DataSetError, match="truncated"):
        for _ in StreamLoader(str(copy), StreamConfig(split="train", batch_size=4, num_workers=0), rank=0, world=1):
            pass


def test_examples_know_their_batch_number(small_dataset):
    cfg = StreamConfig(split="train", batch_size=3, num_workers=2)
    loader = StreamLoader(small_dataset, cfg, rank=1, world=2)
    for j, batch in enumerate(loader):
        assert {e.batch for e in batch} == {j}
        if j == 5:
            state = loader.state_dict()
            break
    resumed = StreamLoader(small_dataset, cfg, rank=1, world=2)
    resumed.load_state_dict(state)
    assert {e.batch for e in next(iter(resumed))} == {6}


def test_max_examples_takes_a_fixed_prefix_of_the_order(small_dataset):
    cfg = StreamConfig(split="train", batch_size=4, num_workers=0, shuffle=False, remainder="pad", max_examples=30)
    per_rank = []
    for rank in range(2):
        per_rank.append([e for b in StreamLoader(small_dataset, cfg, rank=rank, world=2) for e in b])
    real = sorted(e.index for part in per_rank for e in part if not e.pad)
    assert real == list(range(30)) and len(per_rank[0]) == len(per_rank[1])


# ---------------------------------------------------------------------------------------------
# a stream that never waits: window prefetch, workers that outlive an epoch, ranged retried reads


def _trace(loader, batches: int) -> list[list[tuple]]:
    """What `batches` batches of LOADER (across epochs, as the trainer reads it) hold."""
    out: list[list[tuple]] = []
    while len(out) < batches:
        for b in loader:
            out.append([(e.epoch, e.index, e.user, e.position, e.pad, e.batch) for e in b])
            if len(out) == batches:
                break
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world,rank,workers,remainder", [(1, 0, 0, "drop"), (2, 1, 2, "pad"), (3, 2, 1, "drop")])
def test_prefetch_gives_the_examples_of_reading_in_line(small_dataset, world, rank, workers, remainder):
    """Reading the next window on a thread changes nothing: same examples, same order, same batch
    numbers, over two epochs (window_shards=1: a window boundary every few batches)."""
    def trace(prefetch: bool) -> list[list[tuple]]:
        cfg = StreamConfig(split="train", batch_size=8, num_workers=workers, window_shards=1, seed=11,
                           remainder=remainder, prefetch=prefetch)
        loader = StreamLoader(small_dataset, cfg, rank=rank, world=world)
        n = 2 * len(loader)
        try:
            return _trace(loader, n)
        finally:
            loader.close()

    reference = trace(prefetch=False)
    assert trace(prefetch=True) == reference
    assert {b[0][0] for b in reference} == {0, 1}


@pytest.mark.timeout(60)
def test_prefetch_reads_at_most_one_window_ahead_and_stops(small_dataset, monkeypatch):
    import threading
    import time

    from patchrec_dist.data import stream

    m = load_manifest(small_dataset)
    cfg = StreamConfig(split="train", batch_size=4, num_workers=0, window_shards=1, seed=2)
    plan = plan_epoch(m, cfg, 0, 1, 1)
    loads: list[int] = []
    real_load = stream.load_window
    monkeypatch.setattr(stream, "load_window", lambda *a, **k: loads.append(a[3]) or real_load(*a, **k))
    examples = stream.iter_examples(m, plan, cfg, [((0, plan.total), False)])
    visited: list[int] = []
    for ex in examples:
        w = int(np.searchsorted(plan.window_starts, ex.index, side="right") - 1)
        if not visited or visited[-1] != w:
            visited.append(w)
            time.sleep(0.2)  # a slow consumer: the thread gets every chance to run further ahead
        assert len(loads) <= len(visited) + 1  # the window in use and the next one, never more
        if len(visited) == 4:
            break
    assert loads[:4] == visited  # loaded in the order they are used
    examples.close()
    assert not [t for t in threading.enumerate() if t.name == "patchrec-window-prefetch"]


class StepProbe:
    """A transform like the Patcher's PPT path: the global micro-batch index of its example is
    micro_step_offset (set by the trainer for the epoch's batch 0) + the example's batch number."""

    def __init__(self) -> None:
        self.micro_step_offset = 0

    def __call__(self, ex):
        import os

        return ex.epoch, ex.index, self.micro_step_offset + ex.batch, os.getpid()


def _source(loader, probe, counters, batches):
    from patchrec_dist.train.trainer import micro_batch_source

    source = micro_batch_source(loader, probe, counters)
    out = [next(source) for _ in range(batches)]
    source.close()  # as the trainer does when it ends: the workers go now
    return out


@pytest.mark.timeout(60)
def test_workers_outlive_epochs_and_resume_stays_exact(small_dataset):
    """Persistent workers (the same processes for three epochs) give what a fresh DataLoader per
    epoch gives, PPT's global micro-batch index included; a mid-epoch resume in epoch 1 continues
    the same sequence."""
    cfg = StreamConfig(split="train", batch_size=16, num_workers=2, window_shards=1, seed=4)

    def run(persistent: bool, batches: int, state=None, counters=None):
        loader = StreamLoader(small_dataset, cfg, rank=0, world=1, transform=StepProbe(),
                              persistent_workers=persistent)
        if state is not None:
            loader.load_state_dict(state)
        counters = counters or {"micro_before_epoch": 0}
        return loader, counters, _source(loader, loader.transform, counters, batches)

    per_epoch = len(StreamLoader(small_dataset, cfg, rank=0, world=1))
    n = 3 * per_epoch
    loader, _, fresh = run(False, n)
    _, _, kept = run(True, n)
    strip = [[x[:3] for x in b] for b in kept]
    assert strip == [[x[:3] for x in b] for b in fresh]
    assert all({x[2] for x in b} == {j} for j, b in enumerate(kept))  # the global micro-batch index
    assert [b[0][0] for b in kept[::per_epoch]] == [0, 1, 2]
    pids = [{x[3] for b in kept[e * per_epoch:(e + 1) * per_epoch] for x in b} for e in range(3)]
    assert pids[0] == pids[1] == pids[2] and len(pids[0]) == 2  # the same two workers all along
    fresh_pids = [{x[3] for b in fresh[e * per_epoch:(e + 1) * per_epoch] for x in b} for e in range(3)]
    assert len(set.union(*fresh_pids)) == 6  # (the check can tell: per-epoch loaders fork anew)

    stop = per_epoch + 7  # mid-epoch 1
    first, counters, head = run(True, stop)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == 1 and state["batches_done"] == 7
    # the trainer re-anchors the schedule on resume: step * grad_accum - batches_done
    _, _, tail = run(True, n - stop, state, {"micro_before_epoch": stop - state["batches_done"]})
    assert [[x[:3] for x in b] for b in head + tail] == strip


@pytest.mark.timeout(60)
def test_missing_shard_is_named_from_the_prefetch_thread(small_dataset, tmp_path):
    """A shard that disappeared fails the stream at once, naming it, from a worker's prefetch thread too."""
    import shutil
    import time

    copy = tmp_path / "copy"
    shutil.copytree(small_dataset, copy)
    m = load_manifest(str(copy))
    (copy / m.shards[5].path).unlink()
    for workers in (0, 2):
        cfg = StreamConfig(split="train", batch_size=4, num_workers=workers, window_shards=1, shuffle=False)
        t0 = time.time()
        with pytest.raises(DataSetError, match=f"{m.shards[5].path}: shard listed in the manifest is missing"):
            for _ in StreamLoader(str(copy), cfg, rank=0, world=1):
                pass
        assert time.time() - t0 < 20


def _upload(fs, local: str, bucket: str, name: str) -> str:
    fs.put(f"{local.rstrip('/')}/", f"{bucket}/{name}", recursive=True)  # the folder's contents
    return f"s3://{bucket}/{name}"


def test_transient_and_permanent_storage_errors():
    """What a ranged read retries: resets, timeouts, 5xx/throttling (s3fs's EBUSY, EREMOTEIO, EIO),
    botocore's and aiohttp's connection errors; never a missing object, a denial or a 4xx."""
    import errno

    import aiohttp
    from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError

    from patchrec_dist.data.storage import is_transient

    retried = [ConnectionResetError(104, "reset"), OSError(errno.EBUSY, "SlowDown"), OSError(errno.EIO, "?"),
               TimeoutError("t"), ConnectionClosedError(endpoint_url="u"), ReadTimeoutError(endpoint_url="u"),
               aiohttp.ClientPayloadError("p"), aiohttp.ServerDisconnectedError()]
    final = [FileNotFoundError("f"), PermissionError("p"), OSError(errno.EINVAL, "416 InvalidRange"), ValueError("v"),
             ClientError({"Error": {"Code": "X"}}, "GetObject")]
    assert [is_transient(e) for e in retried] == [True] * len(retried)
    assert [is_transient(e) for e in final] == [False] * len(final)


@pytest.mark.timeout(60)
@pytest.mark.s3
@pytest.mark.parametrize("error", ["reset", "botocore"])
def test_s3_transient_errors_are_retried_per_range(small_dataset, s3_env, monkeypatch, error):
    """Faults injected into the real s3fs (moto behind it): the failed ranges are read again, the
    stream gives what local disk gives."""
    import s3fs
    from botocore.exceptions import ConnectionClosedError

    from patchrec_dist.data import storage

    url = _upload(s3_env["fs"], small_dataset, s3_env["bucket"], f"ds-{error}")
    monkeypatch.setattr(storage, "RANGE_BYTES", 16 << 10)  # several ranges per shard
    monkeypatch.setattr(storage, "READ_BACKOFF_S", 0.01)
    calls: list[tuple[str, int]] = []
    real = s3fs.S3FileSystem._cat_file

    async def flaky(self, path, *args, start=None, **kwargs):
        calls.append((path, start))
        if "/shards/" in path and start == 16 << 10 and len([c for c in calls if c == (path, start)]) <= 2:
            raise ConnectionResetError(104, "Connection reset by peer") if error == "reset" else \
                ConnectionClosedError(endpoint_url=s3_env["endpoint"])
        return await real(self, path, *args, start=start, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", flaky)
    cfg = StreamConfig(split="train", batch_size=4, num_workers=0, remainder="pad")
    # one pass: a persistent loader reads the next epoch's first windows ahead on its thread, at
    # times that depend on the machine's load, and those reads would enter the counts below
    one_pass = StreamLoader(url, cfg, rank=0, world=1, persistent_workers=False)
    from_s3 = [[(e.user, e.position) for e in b] for b in one_pass]
    from_disk = [[(e.user, e.position) for e in b] for b in StreamLoader(small_dataset, cfg, rank=0, world=1)]
    assert from_s3 == from_disk
    shard = [c for c in calls if c[0].endswith(load_manifest(small_dataset).shards[0].path)]
    assert shard.count((shard[0][0], 16 << 10)) == 3  # the failing range: twice failed, then read
    assert shard.count((shard[0][0], 0)) == 1  # the others once


@pytest.mark.timeout(60)
@pytest.mark.s3
def test_s3_missing_shard_fails_fast_and_named(small_dataset, s3_env):
    import time

    url = _upload(s3_env["fs"], small_dataset, s3_env["bucket"], "gone")
    m = load_manifest(small_dataset)
    s3_env["fs"].rm(f"{s3_env['bucket']}/gone/{m.shards[0].path}")
    cfg = StreamConfig(split="train", batch_size=4, num_workers=0, shuffle=False)
    t0 = time.time()
    with pytest.raises(DataSetError, match=f"{url}/{m.shards[0].path}: shard listed in the manifest is missing"):
        next(iter(StreamLoader(url, cfg, rank=0, world=1)))
    assert time.time() - t0 < 5  # not retried


@pytest.mark.multiproc
@pytest.mark.timeout(150)
def test_trainer_ppt_schedule_runs_on_across_epochs_with_persistent_workers(tmp_path):
    """The real trainer, 2 persistent workers, 4-batch epochs, 12 steps: PPT's p at every step is
    the schedule's (a worker's Patcher copy that kept its epoch-0 offset would restart it every
    epoch: 0, .08, .17, .25, 0, ...)."""
    from patchrec_dist.data.synthetic import NeedleSpec, write_needle_log
    from patchrec_dist.monitor.tensorboard import read_scalars
    from patchrec_dist.patching.layouts import ppt_probability
    from tools.shard_histories import main as shard_main

    raw = write_needle_log(NeedleSpec(users=40, min_history=20, max_history=20, distances=(3, 10), val_users=0.1,
                                      test_users=0.1), tmp_path / "raw")
    data = str(tmp_path / "ds")
    assert shard_main(["--format", "table", "--input", raw["interactions"], "--items", raw["items"], "--user-col",
                       "user", "--item-col", "item", "--time-col", "timestamp", "--split-col", "split", "--output",
                       data, "--shard-size", "4", "--workers", "1", "--no-progress"]) == 0
    run = tmp_path / "run"
    cmd = [sys.executable, "launchers/finetune.py", "--data", data, "--model", "tiny", "--stage", "ppt",
           "--ppt-schedule", "linear", "--max-steps", "12", "--micro-batch", "4", "--num-workers", "2",
           "--window-shards", "1", "--output", str(run), "--export", "false", "--save-every", "0", "--lr", "1e-3"]
    import os

    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert p.returncode == 0, p.stderr[-2000:]
    got = dict(read_scalars(str(run / "tb"))["train/ppt_p"])
    assert got == pytest.approx({s: ppt_probability(s - 1, 12) for s in range(1, 13)}, abs=1e-6)
