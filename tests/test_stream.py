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
