"""launchers/submit.py: the pipeline through submitit, as local processes and on the SLURM cluster."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.distlaunch import REPO

TRAIN = "--max-steps 3 --micro-batch 4 --num-workers 1 --group-size 2 --lr 3e-3 --dist-timeout-s 60"


def submit(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launchers" / "submit.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def pipeline_args(data: str, runs: Path, cluster: str) -> list[str]:
    return ["--cluster", cluster, "--cpu", "--nproc", "2", "--data", data, "--runs", str(runs),
            "--pretrain-args", TRAIN, "--finetune-args", TRAIN,
            "--eval-args", "--max-examples 8 --beams 4 --top-k 4 --batch-size 4", "--wait"]


def check_done(runs: Path) -> None:
    metrics = json.loads((runs / "finetune" / "eval-test" / "metrics.json").read_text())
    assert metrics["examples"] == 8
    assert json.loads((runs / "finetune" / "config.json").read_text())["init"] == str(runs / "pretrain")
    assert (runs / "pretrain" / "DONE.json").exists() and (runs / "finetune" / "final" / "config.json").exists()


@pytest.mark.multiproc
def test_local_pipeline_runs_the_three_stages_then_skips_them(learnable_dataset, tmp_path):
    runs = tmp_path / "runs"
    dry = submit(*pipeline_args(learnable_dataset, runs, "local"), "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and [ln.split(":")[0] for ln in dry.stdout.splitlines()] == \
        ["pretrain", "finetune", "evaluate"]
    assert not runs.exists()  # a dry run submits nothing
    run = submit(*pipeline_args(learnable_dataset, runs, "local"), cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    check_done(runs)
    again = submit(*pipeline_args(learnable_dataset, runs, "local"), cwd=tmp_path)
    assert again.returncode == 0 and "every stage finished already" in again.stdout


@pytest.mark.slurm
def test_slurm_pipeline_through_submitit(learnable_dataset, slurm_cluster, tmp_path):
    runs = tmp_path / "runs"
    run = submit(*pipeline_args(learnable_dataset, runs, "slurm"), "--slurm", "cpus_per_task=1,timeout_min=10",
                 cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(": job ") == 3
    check_done(runs)


PREEMPT_STEPS = 60


@pytest.mark.slurm
@pytest.mark.timeout(420)
def test_slurm_stage_preempted_through_submitit_saves_requeues_and_resumes_exactly(learnable_dataset, slurm_cluster,
                                                                                   tmp_path):
    """A pretrain Job submitted through submitit (the path of `launchers/submit.py --cluster slurm`) is
    interrupted twice with submitit's own `job._interrupt`: first `timeout=True` (USR2 alone, what SLURM's
    `--signal=USR2@90` sends before the time limit: the ranks stop only because checkpoint() asks them), then
    a preemption (SIGTERM then USR2 to every process of the step). Each time the ranks save before submitit
    requeues; the job resumes from that step and ends with the losses of an uninterrupted run."""
    import submitit

    from patchrec_dist.monitor.tensorboard import read_scalars
    from patchrec_dist.pipeline import Job
    from patchrec_dist.pipeline import submit as submit_stages
    from tests.distlaunch import launch
    from tests.test_slurm import TERMINAL, bounded_wait, job_info, train_flags

    t0 = time.monotonic()
    out, ref_out, folder = tmp_path / "pt", tmp_path / "ref", tmp_path / "submitit"
    flags = ["--data", learnable_dataset, "--output", str(out), "--model", "tiny",
             *train_flags(max_steps=PREEMPT_STEPS, save_every=0)]  # checkpoints: only the stops' (and the end's)
    ref: dict = {}
    reference = threading.Thread(daemon=True, target=lambda: ref.update(run=launch(
        "launchers/pretrain.py", [*flags[:2], "--output", str(ref_out), *flags[4:]], timeout=300,
        while_running=lambda proc: ref.update(proc=proc))))
    reference.start()
    # timeout_min=60: submitit counts a signal in the first 80% of the time limit as a preemption (with the
    # other tests' 10 minutes every signal counts as a timeout, of which submitit requeues at most 3)
    job = submit_stages([Job("pretrain", "launchers/pretrain.py", flags, nproc=2, cpu=True)], "slurm",
                        str(folder), {"cpus_per_task": 1, "timeout_min": 60})[0]
    assert isinstance(job, submitit.SlurmJob)

    def log() -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(folder.glob(f"{job.job_id}_0_log.*")))

    def running_past(step: int):  # the job runs and has trained past STEP
        def check() -> bool:
            state = job_info(job.job_id).get("JobState", "")
            if state in TERMINAL:
                raise AssertionError(f"job {job.job_id} ended ({state}) before it was interrupted:\n{log()[-4000:]}")
            return max((int(s) for s in re.findall(rf"^step (\d+)/{PREEMPT_STEPS} ", log(), re.M)), default=0) > step
        return check

    try:
        bounded_wait(running_past(1), 180, "two training steps")
        t_first = time.monotonic() - t0
        job._interrupt(timeout=True)  # scancel --signal USR2 JOB
        bounded_wait(lambda: len(re.findall(r"resumed at step \d+", log())) == 1, 120, "the first resume")
        first_resume = int(re.search(r"resumed at step (\d+)", log()).group(1))
        bounded_wait(running_past(first_resume + 1), 120, "two steps after the first resume")
        t_second = time.monotonic() - t0
        job._interrupt()  # scancel --signal SIGTERM JOB; scancel --signal USR2 JOB
        ended: list[float] = []

        def finished() -> bool:  # ended after its second requeue, failed, or completed for 5 s without it
            info = job_info(job.job_id)
            if info.get("JobState") not in TERMINAL:
                return False
            ended.append(time.monotonic())
            return info.get("Restarts") == "2" or info.get("JobState") != "COMPLETED" or ended[-1] - ended[0] > 5

        bounded_wait(finished, max(10.0, 330 - (time.monotonic() - t0)), "the twice requeued job to end",
                     interval=0.5)
        info, text = job_info(job.job_id), log()
        print(f"stage job {job.job_id}: interrupted at {t_first:.0f}s and {t_second:.0f}s, done at "
              f"{time.monotonic() - t0:.0f}s")
        assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (info, text[-4000:])
        assert info.get("Restarts") == "2", (info, text[-4000:])
        assert job.result() == {"job": "pretrain", "exit": 0}
        # the ranks saved: the first time on SLURM's USR2 (12), which reaches every process of the step (and
        # checkpoint()'s USR1, 10); the second time SLURM's TERM (15) reached them too (the launcher forwards
        # it as USR1, which may arrive first)
        stops = re.findall(r"stop requested \(signal \[([\d, ]+)\]\): saving at step (\d+)", text)
        signals = [s.split(", ") for s, _ in stops]
        assert len(stops) == 2 and "12" in signals[0] and "15" in signals[1], stops
        # ... before submitit requeued (checkpoint() returned once every rank had exited) ...
        assert "every rank exited after" in text and "ranks still running after" not in text, text[-4000:]
        assert len(re.findall(r"Requeued job \d+", text)) == 2 and text.count("Starting with JobEnvironment") == 3
        # ... and each run resumed from the checkpoint the previous one saved when it stopped (the only ones)
        assert [int(s) for s in re.findall(r"resumed at step (\d+)", text)] == [int(s) for _, s in stops], text[-4000:]
        assert json.loads((out / "DONE.json").read_text()) == {"step": PREEMPT_STEPS, "total_steps": PREEMPT_STEPS}

        reference.join(timeout=max(1.0, 380 - (time.monotonic() - t0)))
        assert not reference.is_alive(), "the reference run did not finish"
        assert ref["run"].returncode == 0, f"reference run failed ({ref['run'].returncode}):\n{ref['run'].tail()}"
        a = dict(read_scalars(str(ref_out / "tb"))["train/loss"])
        b = dict(read_scalars(str(out / "tb"))["train/loss"])
        assert sorted(a) == sorted(b) == list(range(1, PREEMPT_STEPS + 1)), (sorted(a), sorted(b))
        for step in a:
            assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])
    finally:
        subprocess.run(["scancel", job.job_id], capture_output=True, timeout=30)
        if "proc" in ref and reference.is_alive():
            try:
                os.killpg(ref["proc"].pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
