"""pretrain -> finetune -> evaluate as submitit jobs (SLURM, or local processes).

Each stage is a submitit Checkpointable that runs the stage's launcher under DeepSpeed's launcher
on one node. On preemption or timeout submitit calls `checkpoint()` in the job's main process
(rank 0 of submitit's view, not of training): it forwards SIGUSR1 to the training ranks, waits
until they saved and exited 75, and only then asks submitit to requeue. The requeued stage runs
the same command, which resumes from that checkpoint (`--resume auto`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from patchrec_dist.train.signals import RESUME_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]


def _ignore_stop_signals() -> None:
    """For the launcher processes: USR1 is for the ranks (which install their own handler), USR2 is
    submitit's preemption signal (for the job's main process only)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class Stage(submitit.helpers.Checkpointable):
    """One stage: `deepspeed --num_gpus N LAUNCHER FLAGS` (or plain python for nproc = 0)."""

    name: str
    launcher: str  # launchers/pretrain.py, finetune.py or evaluate.py
    flags: list[str]
    nproc: int = 1
    cpu: bool = False
    stop_timeout_s: float = 300.0
    _proc: Any = field(default=None, repr=False, compare=False)
    _requeueing: bool = field(default=False, repr=False, compare=False)

    def command(self, port: int = 29500) -> list[str]:
        script = str(REPO / self.launcher)
        if self.nproc <= 0:
            return [sys.executable, script, *self.flags]
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(self.nproc),
                "--master_port", str(port), script, *self.flags]

    def env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.cpu:
            env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
        return env

    def __call__(self) -> dict[str, Any]:
        """Run the stage to its end; a stop at a checkpoint (exit 75) is resumed in place."""
        while True:
            self._proc = subprocess.Popen(self.command(_free_port()), cwd=REPO, env=self.env(), start_new_session=True,
                                          preexec_fn=_ignore_stop_signals)
            code = self._proc.wait()
            self._proc = None
            if self._requeueing:
                # checkpoint() ran (preemption/timeout): submitit requeues the job, and SLURM ends
                # this process; returning would record a result for a job that is not finished.
                while True:
                    time.sleep(60)
            if code != RESUME_EXIT_CODE:
                break
        if code != 0:
            raise RuntimeError(f"stage {self.name} failed: {' '.join(self.command())} exited with {code}")
        return {"stage": self.name, "exit": code}

    # -- submitit: requeue only after the ranks saved ------------------------------------------
    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        self._requeueing = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGUSR1)  # launchers ignore it; every rank saves and exits 75
            deadline = time.monotonic() + self.stop_timeout_s
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        return submitit.helpers.DelayedSubmission(self)

    def __getstate__(self) -> dict[str, Any]:  # submitit pickles the stage to requeue it
        state = dict(self.__dict__)
        state["_proc"], state["_requeueing"] = None, False
        return state


def pipeline_stages(data: str, runs: str, nproc: int, cpu: bool, pretrain_flags: list[str],
                    finetune_flags: list[str], eval_flags: list[str], model: str | None = None) -> list[Stage]:
    """The three stages, skipping those that already finished (DONE.json, metrics.json)."""
    pre, ft = os.path.join(runs, "pretrain"), os.path.join(runs, "finetune")
    model_flags = ["--model", model] if model else []
    stages = [
        Stage("pretrain", "launchers/pretrain.py", ["--data", data, "--output", pre, *model_flags, *pretrain_flags],
              nproc, cpu),
        Stage("finetune", "launchers/finetune.py", ["--data", data, "--output", ft, "--init", pre, *finetune_flags],
              nproc, cpu),
        Stage("evaluate", "launchers/evaluate.py", ["--data", data, "--run", ft, *eval_flags], nproc, cpu),
    ]
    done = {"pretrain": os.path.join(pre, "DONE.json"), "finetune": os.path.join(ft, "DONE.json"),
            "evaluate": os.path.join(ft, "eval-test", "metrics.json")}
    return [s for s in stages if not os.path.exists(done[s.name])]


def submit(stages: list[Stage], cluster: str, folder: str, slurm_params: dict[str, Any] | None = None,
           wait: bool = False) -> list[Any]:
    """Submit STAGES in order, each after the previous one succeeded; returns the submitit jobs."""
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    jobs: list[Any] = []
    for stage in stages:
        params: dict[str, Any] = {"name": f"patchrec-{stage.name}", "timeout_min": 60 * 24, "nodes": 1,
                                  "tasks_per_node": 1, **(slurm_params or {})}
        extra: dict[str, Any] = dict(params.pop("slurm_additional_parameters", {}))
        if jobs and cluster == "slurm":
            extra["dependency"] = f"afterok:{jobs[-1].job_id}"
        if cluster == "slurm":
            params["slurm_additional_parameters"] = extra
        else:
            params = {k: v for k, v in params.items() if not k.startswith("slurm_") and k != "nodes"}
        executor.update_parameters(**params)
        if jobs and cluster != "slurm":
            jobs[-1].result()  # no dependencies between local jobs: wait for the previous one
        jobs.append(executor.submit(stage))
    if wait and jobs:
        jobs[-1].result()
    return jobs
