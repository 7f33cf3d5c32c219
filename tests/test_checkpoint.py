"""Tests for patchrec_dist.train.checkpoint and patchrec_dist.train.signals.

Fast tests run in this process (config hashes, refusal messages, --resume semantics, the commit
protocol with a stand-in engine, signal handling, a 2-process gloo all-reduce of the stop flag).
The multiproc tests launch real DeepSpeed ZeRO-3 ranks on CPU
(tests/dist_scripts/checkpoint_zero3.py) and compare resumed runs with an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from patchrec_dist.train.checkpoint import (
    LATEST_FILE,
    STATE_FILE,
    CheckpointError,
    CheckpointManager,
    config_diff,
    read_by_rank,
    step_of_tag,
    tag_for_step,
)
from patchrec_dist.train.config import RESUME_NEUTRAL, TrainConfig
from patchrec_dist.train.signals import RESUME_EXIT_CODE, StopFlag
from tests.distlaunch import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "tests/dist_scripts/checkpoint_zero3.py"
TAGS = [tag_for_step(s) for s in range(9)]


# ---------------------------------------------------------------------------------------------
# config hashes and compatibility
def test_tags():
    assert tag_for_step(120) == "step_00000120"
    assert step_of_tag("step_00000120") == 120
    assert step_of_tag("latest") is None and step_of_tag("step_12") is None
    with pytest.raises(ValueError):
        tag_for_step(-1)


def test_config_diff_names_the_differing_keys_the_trainer_reports():
    # what check_resume_unchanged and check_compatible name in their refusals (DeepSpeed configs are nested)
    a = {"lr": 1e-3, "model": {"layers": 2, "heads": (2, 2)}, "log_every": 10}
    d = {"lr": 0.001, "model": {"heads": [2, 2], "layers": 3}, "log_every": 50, "new": 1}
    assert config_diff(a, d) == ["log_every", "model.layers", "new"]
    assert config_diff(a, d, ignore={"log_every", "model.layers"}) == ["new"]
    assert config_diff(a, a) == []


def test_check_compatible_refusals():
    # hashed as the trainer hashes its config: TrainConfig.hash minus the resume-neutral fields
    cfg = TrainConfig(data="/d", bf16=False)
    state = {"config": cfg.to_dict(), "config_hash": cfg.hash(ignore=RESUME_NEUTRAL), "world_size": 2}
    ok = {"config_hash": dataclasses.replace(cfg, num_workers=7).hash(ignore=RESUME_NEUTRAL)}
    CheckpointManager.check_compatible(state, ok, 2, "/x/ckpt")  # a resume-neutral field changed: fine
    CheckpointManager.check_compatible(state, None, 2, "/x/ckpt")

    new = dataclasses.replace(cfg, layout=dataclasses.replace(cfg.layout, group_size=3))
    with pytest.raises(CheckpointError, match=r"/x/ckpt.*different configuration.*differing keys: layout\.group_size\."):
        CheckpointManager.check_compatible(
            state, {"config_hash": new.hash(ignore=RESUME_NEUTRAL), "config": new.to_dict(), "ignore": RESUME_NEUTRAL},
            2, "/x/ckpt")
    with pytest.raises(CheckpointError, match=r"s3://b/run/checkpoints/step_00000004.*2 ranks.*has 1.*--universal"):
        CheckpointManager.check_compatible(state, ok, 1, "s3://b/run/checkpoints/step_00000004")
    with pytest.raises(CheckpointError, match="--universal"):
        CheckpointManager.check_compatible(state, {"world_size": 4}, 2, "/x")
    CheckpointManager.check_compatible(state, ok, 1, "/x", universal=True)  # universal allows it
    with pytest.raises(CheckpointError, match="world_size"):
        CheckpointManager.check_compatible({"config_hash": "h"}, None, 1, "/x")


# ---------------------------------------------------------------------------------------------
# the commit protocol, in one process, with a stand-in engine (DeepSpeed itself: multiproc tests)
class StandInEngine:
    """Writes and reads files the way engine.save_checkpoint/load_checkpoint lay them out: the
    checkpoint files through its checkpoint engine, the recovery script by a plain copy."""

    class _Config:
        load_universal_checkpoint = False

    class _TorchFiles:  # DeepSpeed's TorchCheckpointEngine, minus logging
        def save(self, state_dict, path):
            torch.save(state_dict, path)

        def makedirs(self, path, exist_ok=False):
            os.makedirs(path, exist_ok=exist_ok)

    def __init__(self, value: int = 0):
        self.value = value
        self._config = self._Config()
        self.checkpoint_engine = self._TorchFiles()
        self.loaded: list[tuple[str, str, bool]] = []

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True):
        assert save_latest is False and client_state == {}
        self.checkpoint_engine.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        for kind in ("model", "optim"):
            path = os.path.join(save_dir, tag, f"zero_pp_rank_0_mp_rank_00_{kind}_states.pt")
            self.checkpoint_engine.save({kind: self.value}, path)
        with open(os.path.join(save_dir, "zero_to_fp32.py"), "w") as f:
            f.write("# recovery script\n")
        return True

    def load_checkpoint(self, load_dir, tag=None, **kwargs):
        assert kwargs["load_module_strict"] and kwargs["load_lr_scheduler_states"]
        path = os.path.join(load_dir, tag, "zero_pp_rank_0_mp_rank_00_model_states.pt")
        if not os.path.exists(path):
            return None, None
        if self._config.load_universal_checkpoint:  # real DeepSpeed files: check what a load reads
            assert os.path.isfile(os.path.join(load_dir, tag, "zero", "optimizer_state.pt"))
            self.loaded.append((load_dir, tag, True))
            return path, {}
        self.value = torch.load(path)["model"]
        self.loaded.append((load_dir, tag, self._config.load_universal_checkpoint))
        return path, {}


def _state(step: int) -> dict:
    return {"data": {"examples": step * 4}, "config_hash": "h", "config": {"lr": 1}}


def test_save_layout_latest_and_keep_last(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "run"), keep_last=2)
    assert mgr.latest_tag() is None and mgr.resolve_resume("auto") is None
    engine = StandInEngine()
    for step in (2, 4, 6):
        engine.value = step
        assert mgr.save(engine, step, _state(step)) == tag_for_step(step)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [TAGS[4], TAGS[6]]
    assert (ckpts / LATEST_FILE).read_text().strip() == TAGS[6]
    assert (ckpts / "zero_to_fp32.py").exists()
    state = json.loads((ckpts / TAGS[6] / STATE_FILE).read_text())
    assert state["step"] == 6 and state["tag"] == TAGS[6] and state["world_size"] == 1
    assert state["data"] == {"examples": 24}
    assert set(state["checkpoint"]["files"]) == {
        "rng_rank0.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    }
    assert mgr.complete_tags() == [TAGS[4], TAGS[6]]

    fresh = StandInEngine()
    got = CheckpointManager(str(tmp_path / "run")).load(fresh, expect={"config_hash": "h"})
    assert got["step"] == 6 and fresh.value == 6
    with pytest.raises(CheckpointError, match="different configuration"):
        CheckpointManager(str(tmp_path / "run")).load(StandInEngine(), expect={"config_hash": "other"})
    with pytest.raises(CheckpointError, match="JSON-serialisable.*state\\['bad'\\]"):
        mgr.save(engine, 8, {"bad": object()})


class Position:
    """A stand-in stream position: a registered component."""

    def __init__(self) -> None:
        self.examples = 0

    def state_dict(self) -> dict:
        return {"examples": self.examples}

    def load_state_dict(self, state) -> None:
        self.examples = state["examples"]


def test_registered_components_are_saved_and_restored_by_the_manager(tmp_path):
    mgr, position, engine = CheckpointManager(str(tmp_path / "run")), Position(), StandInEngine()
    mgr.register("stream", position)
    with pytest.raises(ValueError, match="taken"):
        mgr.register("stream", Position())
    position.examples, engine.value = 12, 3
    mgr.save(engine, 3, {"config_hash": "h"})
    position.examples, engine.value = 99, 5
    mgr.save(engine, 5, {"config_hash": "h"})
    assert json.loads((tmp_path / "run" / "checkpoints" / TAGS[3] / STATE_FILE).read_text())["stream"] == {"examples": 12}

    resumed, again = Position(), CheckpointManager(str(tmp_path / "run"))
    again.register("stream", resumed)
    again.load(StandInEngine(), TAGS[3])
    assert resumed.examples == 12  # restored by load() itself, not by its caller
    # a checkpoint without a registered component's state is refused before the engine is touched
    other = CheckpointManager(str(tmp_path / "run"))
    other.register("scheduler", Position())
    untouched = StandInEngine()
    with pytest.raises(CheckpointError, match="no state for scheduler"):
        other.load(untouched, TAGS[5])
    assert untouched.value == 0 and untouched.loaded == []


def test_crash_mid_save_keeps_previous_latest(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "run"), keep_last=2)
    engine = StandInEngine(4)
    mgr.save(engine, 4, _state(4))

    def crash(rank, tag):
        raise KeyboardInterrupt("killed mid-save")

    mgr.after_engine_save = crash
    engine.value = 6
    with pytest.raises(KeyboardInterrupt):
        mgr.save(engine, 6, _state(6))
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / TAGS[6] / "zero_pp_rank_0_mp_rank_00_model_states.pt").exists()  # DeepSpeed wrote
    assert not (ckpts / TAGS[6] / STATE_FILE).exists()
    assert (ckpts / LATEST_FILE).read_text().strip() == TAGS[4]
    assert not mgr.is_complete(TAGS[6])
    assert mgr.resolve_resume("auto") == str(ckpts / TAGS[4])
    with pytest.raises(CheckpointError, match=r"step_00000006 has no state.json.*interrupted"):
        mgr.resolve_resume(str(ckpts / TAGS[6]))

    # `latest` naming a damaged checkpoint: fall back to the newest complete one
    (ckpts / LATEST_FILE).write_text(TAGS[6])
    assert mgr.latest_tag() == TAGS[4]
    # a file of a complete checkpoint went missing
    (ckpts / TAGS[4] / "rng_rank0.pt").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: missing \['rng_rank0.pt'\]"):
        mgr.resolve_resume(TAGS[4])
    assert mgr.latest_tag() is None


def test_resume_semantics_and_abandoned_timeline(tmp_path):
    run = tmp_path / "run"
    mgr = CheckpointManager(str(run), keep_last=3)
    engine = StandInEngine()
    for step in (2, 4, 6):
        mgr.save(engine, step, _state(step))
    assert mgr.resolve_resume("never") is None and mgr.resolve_resume(None) is None
    assert mgr.resolve_resume("auto") == str(run / "checkpoints" / TAGS[6])
    assert mgr.resolve_resume(TAGS[2]) == str(run / "checkpoints" / TAGS[2])
    assert mgr.resolve_resume(str(run)) == str(run / "checkpoints" / TAGS[6])  # another run's output
    other = CheckpointManager(str(tmp_path / "other"))
    assert other.resolve_resume(str(run / "checkpoints" / TAGS[4])) == str(run / "checkpoints" / TAGS[4])
    with pytest.raises(CheckpointError, match="no checkpoint at .*nowhere"):
        mgr.resolve_resume(str(tmp_path / "nowhere"))

    # resume from step 2 (explicit PATH), save 4 again: 6 belongs to an abandoned timeline
    mgr2 = CheckpointManager(str(run), keep_last=3)
    got = mgr2.load(engine, mgr2.resolve_resume(TAGS[2]))
    assert got["step"] == 2
    assert mgr2.save(engine, 2, _state(2)) == TAGS[2]  # engine equals that checkpoint: not rewritten
    mgr2.save(engine, 4, _state(4))
    assert mgr2.complete_tags() == [TAGS[2], TAGS[4]]
    assert mgr2.latest_tag() == TAGS[4]


def test_each_rank_reads_only_its_own_partition():
    files = ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
             "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_10_mp_rank_00_optim_states.pt",
             "mp_rank_00_model_states.pt", "rng_rank1.pt", "rng_rank10.pt", STATE_FILE, "universal/zero/x.pt"]
    assert [f for f in files if read_by_rank(f, 1)] == [
        "zero_pp_rank_1_mp_rank_00_model_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "mp_rank_00_model_states.pt", "rng_rank1.pt"]
    assert [f for f in files if read_by_rank(f, 10, every_partition=True)] == [  # elastic ZeRO-1/2
        *files[:5], "rng_rank10.pt"]


# ---------------------------------------------------------------------------------------------
# StopFlag
def test_stop_flag_sets_flag_and_restores_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    stop = StopFlag()  # USR1, USR2 (submitit's, SLURM's --signal=USR2 reaches every rank) and TERM
    try:
        assert not stop.requested and not stop.should_stop(None)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert stop.requested and stop.signal_name == "SIGUSR1"
        assert stop.should_stop(None) and stop.agreed  # no process group: the local flag
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the test process survives
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert stop.received == [signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2]
    finally:
        stop.restore()
    assert {s: signal.getsignal(s) for s in before} == before
    with StopFlag(signals=["USR2"]) as s2:
        assert s2.signals == (signal.SIGUSR2,)
        s2.request()
        assert s2.should_stop() and s2.signal_name is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_stop_flag_handler_is_inert_in_forked_children():
    """A DataLoader worker inherits the handler on fork: there it must not touch the flag."""
    stop = StopFlag(signals=[signal.SIGUSR1])
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
            os.write(w, b"1" if stop.requested else b"0")
            os._exit(0)
        os.close(w)
        child_saw = os.read(r, 1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0  # not killed by the signal
        assert child_saw == b"0"
        assert not stop.requested  # the parent got nothing either
    finally:
        stop.restore()


_AGREE = textwrap.dedent(
    """
    import datetime, os, signal, sys, time
    import torch.distributed as dist
    from patchrec_dist.train.signals import StopFlag
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    stop = StopFlag()
    seen = []
    for step in range(1, 6):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
        if stop.should_stop():
            print(f"rank={rank} stop_at={step} local={stop.requested} signal={stop.signal_name}", flush=True)
            break
    dist.destroy_process_group()
    """
)


def test_stop_flag_all_reduce_two_ranks_gloo():
    """One rank gets SIGUSR1; both agree at the same step boundary (gloo all-reduce MAX)."""
    port = str(free_port())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen([sys.executable, "-c", _AGREE, str(r), port], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for r in range(2)
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=90)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("gloo ranks hung")
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "rank=0 stop_at=3 local=False signal=None" in outs[0], outs
    assert "rank=1 stop_at=3 local=True signal=SIGUSR1" in outs[1], outs


_LONG_WORK = textwrap.dedent(
    """
    import datetime, os, sys, time
    import torch.distributed as dist
    from patchrec_dist.train.checkpoint import CheckpointError, CheckpointManager
    rank, out, fail = int(sys.argv[1]), sys.argv[3], sys.argv[4] == "fail"
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=2))  # far below the work's 5 s
    mgr = CheckpointManager(out)
    marker = os.path.join(out, "done")

    def work():
        time.sleep(5)
        if fail:
            raise ValueError("the conversion broke")
        open(marker, "w").close()

    try:
        mgr._rank0_while_others_poll(work, lambda: os.path.exists(marker), os.path.join(out, "failed"), poll_s=0.2)
        print(f"rank={rank} done", flush=True)
    except (CheckpointError, ValueError) as exc:
        print(f"rank={rank} error={exc}", flush=True)
    """
)


@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_long_rank0_work_is_awaited_by_polling_not_in_a_collective(tmp_path, outcome):
    """Rank 0's 5 s of work (as ds_to_universal) with a 2 s collective timeout: the other rank polls
    the output and carries on when it is done; a failure on rank 0 reaches it as an error."""
    port = str(free_port())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", _LONG_WORK, str(r), port, str(tmp_path), outcome], cwd=ROOT,
                              env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    try:
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    if outcome == "ok":
        assert "rank=0 done" in outs[0] and "rank=1 done" in outs[1], outs
    else:
        assert "rank=0 error=the conversion broke" in outs[0], outs
        assert "rank=1 error=rank 0 failed: ValueError: the conversion broke" in outs[1], outs


# ---------------------------------------------------------------------------------------------
# S3, in process: staging, upload, download into a fresh staging dir
@pytest.mark.s3
def test_s3_save_load_with_staging(s3_env, tmp_path):
    url = f"s3://{s3_env['bucket']}/run"
    fs = s3_env["fs"]
    mgr = CheckpointManager(url, keep_last=1, staging_dir=str(tmp_path / "stage1"))
    engine = StandInEngine()
    for step in (3, 5):
        engine.value = step
        mgr.save(engine, step, _state(step))
    root = f"{s3_env['bucket']}/run/checkpoints"
    assert fs.cat(f"{root}/{LATEST_FILE}").decode().strip() == TAGS[5]
    assert not fs.exists(f"{root}/{TAGS[3]}")  # keep_last=1
    assert fs.exists(f"{root}/zero_to_fp32.py")
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{root}/{TAGS[5]}")) == [
        "rng_rank0.pt", STATE_FILE, "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ]
    assert not any(p.is_file() for p in (tmp_path / "stage1").rglob("*"))  # nothing staged: streamed

    other = CheckpointManager(url, staging_dir=str(tmp_path / "stage2"))
    fresh = StandInEngine()
    ckpt = other.resolve_resume("auto")
    assert ckpt == f"{url}/checkpoints/{TAGS[5]}"
    assert other.load(fresh, ckpt)["step"] == 5 and fresh.value == 5
    load_dir, tag, universal = fresh.loaded[-1]
    assert load_dir.startswith(str(tmp_path / "stage2")) and tag == TAGS[5] and not universal
    assert not any(p.is_file() for p in (tmp_path / "stage2").rglob("*"))

    # an interrupted remote save: objects uploaded, no state.json -> not resumable, latest unchanged
    fs.pipe(f"{root}/{TAGS[7]}/zero_pp_rank_0_mp_rank_00_model_states.pt", b"model=7")
    assert other.resolve_resume("auto") == ckpt
    with pytest.raises(CheckpointError, match="interrupted"):
        other.resolve_resume(f"{url}/checkpoints/{TAGS[7]}")
    with pytest.raises(CheckpointError, match="no checkpoint at s3://"):
        other.resolve_resume(f"{url}/checkpoints/{TAGS[8]}")


# ---------------------------------------------------------------------------------------------
# 2 ranks, DeepSpeed ZeRO-3 on CPU
@dataclass
class Run:
    rc: int | None  # None: killed on timeout
    out: str
    seconds: float

    def steps(self) -> dict[int, tuple[float, str]]:
        """{step: (loss, rng draws as printed)}"""
        return {int(s): (float(loss), rng) for s, loss, rng in re.findall(r"\bSTEP (\d+) loss=(\S+) lr=\S+ rng=(.*)$",
                                                                         self.out, re.M)}

    def cksum(self, when: str, step: int) -> tuple[float, str]:
        m = re.search(rf"\bCKSUM when={when} step={step} sum=(\S+) sha=(\w+)$", self.out, re.M)
        assert m, f"no CKSUM when={when} step={step}:\n{self.tail()}"
        return float(m.group(1)), m.group(2)

    def tail(self, n: int = 6000) -> str:
        return self.out[-n:]


def launch(args: list[str], nprocs: int = 2, timeout: float = 240, env: dict | None = None,
           on_line=None) -> Run:
    """`deepspeed --num_gpus N` the script (tests/distlaunch.py: own process group, killed at the end
    or at TIMEOUT, then rc is None). ON_LINE(line) sees the output as it comes."""
    from tests.distlaunch import launch as launch_script

    run = launch_script(SCRIPT, args, nprocs=nprocs, timeout=timeout, env=env, on_line=on_line)
    return Run(run.returncode, run.output, run.seconds)


def _ok(run: Run, what: str) -> None:
    assert run.rc is not None, f"{what} hung (killed after timeout):\n{run.tail()}"
    assert run.rc == 0, f"{what} exited {run.rc}:\n{run.tail()}"


def _same_as_reference(run: Run, ref: Run, steps, tol: float = 1e-5, rng: bool = True) -> None:
    got, want = run.steps(), ref.steps()
    for s in steps:
        assert s in got, f"step {s} missing:\n{run.tail()}"
        assert abs(got[s][0] - want[s][0]) <= tol, f"step {s}: loss {got[s][0]} != {want[s][0]}"
        if rng:
            assert got[s][1] == want[s][1], f"step {s}: RNG draws {got[s][1]} != {want[s][1]} (RNG not restored?)"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[Run, Path]:
    """Run A: 8 uninterrupted steps, a checkpoint every 2 steps, keep_last=2."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run = launch(["--output", str(out), "--steps", "8", "--save-every", "2", "--keep-last", "2"])
    _ok(run, "reference run")
    assert sorted(run.steps()) == list(range(1, 9)), run.tail()
    print(f"reference run: {run.seconds:.1f} s")
    return run, out


@pytest.mark.multiproc
def test_keep_last_two(reference_run):
    run, out = reference_run
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [TAGS[6], TAGS[8]]
    assert (ckpts / LATEST_FILE).read_text().strip() == TAGS[8]
    mgr = CheckpointManager(str(out))
    assert mgr.complete_tags() == [TAGS[6], TAGS[8]]
    state = mgr.read_state(TAGS[8])
    assert state["world_size"] == 2 and state["step"] == 8
    assert state["data"]["examples_consumed"] == 8 * 4
    assert state["scheduler"] == {"last_batch_iteration": 7}
    files = set(state["checkpoint"]["files"])  # what engine.save_checkpoint wrote (ZeRO-3, 2 ranks)
    assert {f"zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in (0, 1) for k in ("model", "optim")} <= files
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= files
    assert run.cksum("saved", 8) == run.cksum("final", 8)


@pytest.mark.multiproc
def test_resume_after_crash_mid_save_matches_uninterrupted(reference_run, tmp_path):
    """Run B saves at 2 and 4, then rank 1 dies right after engine.save_checkpoint of step 6 (before
    the commit barrier): `latest` stays at step 4 and step 6 is incomplete. A new launch with
    --resume auto continues from step 4: steps 5..8 (loss and RNG draws) and the final parameters
    equal the uninterrupted run's."""
    ref, _ = reference_run
    out = tmp_path / "run"
    common = ["--output", str(out), "--steps", "8", "--save-every", "2"]
    crashed = launch([*common, "--crash-rank", "1", "--crash-step", "6"])
    assert crashed.rc not in (None, 0), crashed.tail()
    assert "RANK 1 CRASHING after engine.save_checkpoint of step_00000006" in crashed.out
    ckpts = out / "checkpoints"
    assert (ckpts / LATEST_FILE).read_text().strip() == TAGS[4]
    assert (ckpts / TAGS[6] / "zero_pp_rank_0_mp_rank_00_model_states.pt").exists()
    assert not (ckpts / TAGS[6] / STATE_FILE).exists()
    _same_as_reference(crashed, ref, range(1, 7))

    resumed = launch([*common, "--resume", "auto"])
    _ok(resumed, "resumed run")
    assert f"RESUMED from={ckpts / TAGS[4]} step=4" in resumed.out, resumed.tail()
    assert resumed.cksum("loaded", 4) == ref.cksum("saved", 4)
    assert sorted(resumed.steps()) == [5, 6, 7, 8]
    _same_as_reference(resumed, ref, range(5, 9))
    assert resumed.cksum("final", 8) == ref.cksum("final", 8)  # bit-identical parameters
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [TAGS[6], TAGS[8]]
    print(f"crashed run {crashed.seconds:.1f} s, resumed run {resumed.seconds:.1f} s")


@pytest.mark.multiproc
@pytest.mark.s3
def test_s3_stop_signal_on_one_rank_then_resume(reference_run, s3_env, tmp_path):
    """SIGUSR1 to rank 1 only: both ranks agree at the next step boundary, save to S3 (staged
    locally) and exit 75; a fresh launch with an empty staging dir resumes from S3 to the end."""
    ref, _ = reference_run
    url = f"s3://{s3_env['bucket']}/run"
    fs = s3_env["fs"]
    sent: list[int] = []
    seen: list[str] = []

    def on_line(line: str) -> None:
        seen.append(line)
        if "STEP 2 " in line and not sent:
            pid = int(re.search(r"RANK 1 PID (\d+)\n", "".join(seen)).group(1))
            os.kill(pid, signal.SIGUSR1)
            sent.append(pid)

    stage1 = tmp_path / "stage1"
    stopped = launch(["--output", url, "--steps", "8", "--step-sleep", "0.5"],
                     env={"PATCHREC_STAGING": str(stage1)}, on_line=on_line)
    assert sent, stopped.tail()
    assert stopped.rc == RESUME_EXIT_CODE, f"exit {stopped.rc}:\n{stopped.tail()}"
    stops = re.findall(r"\bSTOPPED step=(\d+) rank=(\d) signal=(\S+)$", stopped.out, re.M)
    assert sorted(r for _, r, _ in stops) == ["0", "1"], stopped.tail()
    k = int(stops[0][0])
    assert {int(s) for s, _, _ in stops} == {k} and 2 <= k < 8
    assert dict((r, sig) for _, r, sig in stops) == {"0": "None", "1": "SIGUSR1"}  # rank 0 learned it by all-reduce
    assert sorted(stopped.steps()) == list(range(1, k + 1))
    root = f"{s3_env['bucket']}/run/checkpoints"
    assert fs.cat(f"{root}/{LATEST_FILE}").decode().strip() == tag_for_step(k)
    assert fs.exists(f"{root}/{tag_for_step(k)}/{STATE_FILE}")
    assert fs.exists(f"{root}/{tag_for_step(k)}/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert not any(p.is_file() for p in stage1.rglob("*")), "staging dir not cleaned up"

    resumed = launch(["--output", url, "--steps", "8", "--resume", "auto"],
                     env={"PATCHREC_STAGING": str(tmp_path / "stage2")})
    _ok(resumed, "resumed run")
    assert f"RESUMED from={url}/checkpoints/{tag_for_step(k)} step={k}" in resumed.out, resumed.tail()
    assert sorted(resumed.steps()) == list(range(k + 1, 9))
    _same_as_reference(resumed, ref, range(k + 1, 9))
    assert resumed.cksum("final", 8) == ref.cksum("final", 8)
    assert fs.cat(f"{root}/{LATEST_FILE}").decode().strip() == TAGS[8]
    print(f"stopped at step {k}: {stopped.seconds:.1f} s, resumed from S3: {resumed.seconds:.1f} s")


@pytest.mark.multiproc
def test_world_size_change_refused_then_universal(reference_run, tmp_path):
    """A 2-rank checkpoint loaded by 1 rank: refused (message names --universal); with
    universal=True it is converted by ds_to_universal and training continues as if nothing
    changed (the 1-rank run does the same 2 micro-batches per step by gradient accumulation)."""
    ref, ref_out = reference_run
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    ckpt = out / "checkpoints" / TAGS[6]
    run = launch(["--output", str(out), "--steps", "8", "--resume", str(ckpt), "--universal", "fallback"], nprocs=1)
    _ok(run, "1-rank universal run")
    refused = re.search(r"\bREFUSED (.*)$", run.out, re.M)
    assert refused, run.tail()
    assert str(ckpt) in refused.group(1) and "--universal" in refused.group(1)
    assert "saved by 2 ranks but this job has 1" in refused.group(1)
    assert (ckpt / "latest_universal").exists() and (ckpt / "universal" / "zero").is_dir()
    assert f"RESUMED from={ckpt} step=6" in run.out
    assert run.cksum("loaded", 6) == ref.cksum("saved", 6)
    # rank 0's RNG state is restored; rank 1's has no rank to go to
    got, want = run.steps(), ref.steps()
    assert sorted(got) == [7, 8]
    for s in (7, 8):
        assert abs(got[s][0] - want[s][0]) <= 1e-5, (s, got[s], want[s])
        assert json.loads(got[s][1])[0] == json.loads(want[s][1])[0]
    f_got, f_want = run.cksum("final", 8), ref.cksum("final", 8)
    assert abs(f_got[0] - f_want[0]) <= 1e-6 * abs(f_want[0]), (f_got, f_want)
    print(f"1-rank universal run: {run.seconds:.1f} s; parameters bit-identical: {f_got[1] == f_want[1]}")


@pytest.mark.multiproc
@pytest.mark.s3
def test_convert_to_universal_remote(reference_run, s3_env, tmp_path):
    """convert_to_universal on an S3 checkpoint, offline in one process: download to staging,
    ds_to_universal, upload universal/ and then the latest_universal marker."""
    _, ref_out = reference_run
    url = f"s3://{s3_env['bucket']}/uc"
    fs = s3_env["fs"]
    src = ref_out / "checkpoints" / TAGS[8]
    for f in src.iterdir():
        if f.is_file():
            fs.put_file(str(f), f"{s3_env['bucket']}/uc/checkpoints/{TAGS[8]}/{f.name}")
    mgr = CheckpointManager(url, staging_dir=str(tmp_path / "stage"))
    assert mgr.is_complete(TAGS[8])
    assert mgr.convert_to_universal(TAGS[8]) == f"{url}/checkpoints/{TAGS[8]}/universal"
    base = f"{s3_env['bucket']}/uc/checkpoints/{TAGS[8]}"
    assert fs.cat(f"{base}/latest_universal").decode().strip() == "universal"
    names = {p[len(base) + 1:] for p in fs.find(f"{base}/universal")}
    assert "universal/zero/optimizer_state.pt" in names
    assert {"fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"} <= {
        n.rsplit("/", 1)[1] for n in names if n.startswith("universal/zero/lm_head.weight/")
    }
    assert mgr.is_complete(TAGS[8])  # the original files are untouched
    assert not any(p.is_file() for p in (tmp_path / "stage").rglob("*"))

    # a universal load from S3 downloads the universal tree (not the per-rank ZeRO files)
    engine = StandInEngine()
    seen: list[list[str]] = []
    real_rmtree = shutil.rmtree

    def spy_rmtree(path, *a, **kw):
        seen.append(sorted(str(p.relative_to(path)) for p in Path(path).rglob("*") if p.is_file()))
        real_rmtree(path, *a, **kw)

    shutil.rmtree = spy_rmtree
    try:
        state = mgr.load(engine, TAGS[8], expect={"world_size": 3}, universal=True)
    finally:
        shutil.rmtree = real_rmtree
    assert state["step"] == 8
    load_dir, tag, universal = engine.loaded[-1]
    assert tag == "universal" and universal and load_dir.startswith(str(tmp_path / "stage"))
    assert engine._config.load_universal_checkpoint is False  # switched on only for the call
    staged = [f for f in seen[-1] if not f.startswith(".ranks")]
    assert f"{TAGS[8]}/universal/zero/optimizer_state.pt" in staged and f"{TAGS[8]}/rng_rank1.pt" in staged
    assert not any(f.endswith("optim_states.pt") for f in staged)
    with pytest.raises(CheckpointError, match="--universal"):
        mgr.load(StandInEngine(), TAGS[8], expect={"world_size": 3})
