"""pretrain -> finetune -> evaluate as submitit jobs (SLURM, or local processes).

Each stage is a submitit Checkpointable whose job has one task per node (`--slurm nodes=N`); each
task runs patchrec_dist/launch.py's NodeLauncher in-process, the same per-node launcher the sbatch
scripts run under srun, so that a stage is one job over all its nodes and stops, requeues and
fails exactly as an sbatch job does (launch.py says how and why).

What is submitit's here, checked on the local SLURM cluster (tests/test_submit.py,
tests/test_multinode.py):

- SLURM signals every process of the job step: `--signal=USR2@90` before the time limit
  (submitit's default; USR2 is submitit's preemption signal), SIGTERM on a preemption or
  `scancel`; submitit's `job._interrupt()` sends TERM then USR2 (`_interrupt(timeout=True)`: USR2
  only). The ranks take all three as "save at the next step boundary and exit 75".
- submitit's USR2 handler runs in every task but acts only in task 0: it calls `checkpoint()`,
  which asks node 0's ranks to stop (again every few seconds) and returns once they all exited
  (the other nodes' ranks stop at the same step: the ranks agree through an all-reduce), so
  submitit dumps the stage and runs `scontrol requeue` (which ends the job at once) only after
  the checkpoint is committed. The wait is bounded by `stop_timeout_s` and the job's time left.
- Ranks that stop at a checkpoint without submitit's signal (a preemption that sends only TERM,
  `scancel --signal=USR1 JOBID`) are requeued the same way: node 0's launcher calls submitit's
  own handler, as if its signal had come. Outside a SLURM job (submitit's local executor) the
  stage resumes in place.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import submitit

from patchrec_dist.data import storage
from patchrec_dist.launch import REPO, NodeLauncher, World, in_slurm_job, log, scontrol_requeue
from patchrec_dist.train.signals import RESUME_EXIT_CODE


def _preempt_signal() -> int:
    """submitit's preemption signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    return int(getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG, signal.SIGUSR2))


@dataclass
class Job(submitit.helpers.Checkpointable):
    """One job of the pipeline (pretrain, finetune or evaluate: a "stage" is a prompt layout, see
    patching/layouts.py): LAUNCHER FLAGS on NPROC ranks per node of the job (`deepspeed --num_gpus N` on one
    node), plain python for nproc = 0."""

    name: str
    launcher: str  # launchers/pretrain.py, finetune.py or evaluate.py
    flags: list[str]
    nproc: int = 1
    cpu: bool = False
    stop_timeout_s: float = 300.0
    #: False for launchers that cannot stop at a checkpoint (evaluate.py): a stop request
    #: terminates their ranks (SIGTERM) and the requeued job runs them again from the start.
    resumable: bool = True
    _node: NodeLauncher | None = field(default=None, repr=False, compare=False)

    def command(self, port: int = 29500) -> list[str]:
        """The equivalent one-node user command: `deepspeed --num_gpus N LAUNCHER FLAGS` (python for nproc 0)."""
        script = str(REPO / self.launcher)
        if self.nproc <= 0:
            return [sys.executable, script, *self.flags]
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(self.nproc),
                "--master_port", str(port), script, *self.flags]

    def node_launcher(self) -> NodeLauncher:
        return NodeLauncher(self.launcher, self.flags, World.from_env(max(1, self.nproc)), cpu=self.cpu,
                            resumable=self.resumable, stop_timeout_s=self.stop_timeout_s,
                            requeue=self._requeue_through_submitit, foreign_signals=(_preempt_signal(),))

    # -- running -------------------------------------------------------------------------------
    def __call__(self) -> dict[str, Any]:
        """Run this node's part of the stage to its end. A stop at a checkpoint (exit 75) is requeued
        by node 0 in a SLURM job, resumed in place otherwise."""
        while True:
            self._node = self.node_launcher()
            code = self._node.run()
            if code != RESUME_EXIT_CODE or in_slurm_job():
                break
            log(f"{self.name}: the ranks stopped at a checkpoint: resuming in place")
        if code == RESUME_EXIT_CODE and self._node.world.node_rank != 0:
            return {"job": self.name, "exit": code}  # node 0 requeues the job
        if code != 0:
            raise RuntimeError(f"stage {self.name} failed: {' '.join(self.command())} exited with {code}")
        return {"job": self.name, "exit": code}

    # -- submitit: requeue only after the ranks saved --------------------------------------------
    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """submitit calls this on its preemption/timeout signal (task 0), then requeues: stop the ranks first."""
        if self._node is not None:
            self._node.stop_ranks()
        return submitit.helpers.DelayedSubmission(self)

    def _requeue_through_submitit(self) -> bool:
        """The ranks stopped at a checkpoint without submitit's signal: requeue through submitit's own
        handler (checkpoint(), dump, `scontrol requeue`, exit), as if its signal had come."""
        sig = _preempt_signal()
        handler = signal.getsignal(sig) if threading.current_thread() is threading.main_thread() else None
        if not os.environ.get("SUBMITIT_EXECUTOR") or not callable(handler):
            return scontrol_requeue()
        signal.signal(sig, signal.SIG_IGN)  # a signal arriving now must not requeue a second time
        log(f"{self.name}: the ranks stopped at a checkpoint: requeueing through submitit")
        try:
            handler(sig, None)  # exits (SystemExit) once requeued
        except subprocess.CalledProcessError as exc:  # scontrol requeue refused: the job is ending anyway
            raise RuntimeError(f"stage {self.name} stopped at a checkpoint but could not be requeued ({exc}); "
                               "run it again to resume") from exc
        return True

    def __getstate__(self) -> dict[str, Any]:  # submitit pickles the stage to requeue it
        state = dict(self.__dict__)
        state["_node"] = None
        return state


#: What marks a stage finished, relative to the pipeline's runs folder or URL.
FINISHED_MARKERS = {"pretrain": ("pretrain", "DONE.json"), "finetune": ("finetune", "DONE.json"),
                    "evaluate": ("finetune", "eval-test", "metrics.json")}


def finished_jobs(runs: str) -> list[str]:
    """The stages of a pipeline in RUNS (local path or URL) that finished already."""
    return [name for name, parts in FINISHED_MARKERS.items() if storage.exists(storage.join(runs, *parts))]


def pipeline_jobs(data: str, runs: str, nproc: int, cpu: bool, pretrain_flags: list[str],
                    finetune_flags: list[str], eval_flags: list[str], model: str | None = None) -> list[Job]:
    """The three stages, skipping those that already finished (DONE.json, metrics.json)."""
    pre, ft = storage.join(runs, "pretrain"), storage.join(runs, "finetune")
    model_flags = ["--model", model] if model else []
    stages = [
        Job("pretrain", "launchers/pretrain.py", ["--data", data, "--output", pre, *model_flags, *pretrain_flags],
              nproc, cpu),
        Job("finetune", "launchers/finetune.py", ["--data", data, "--output", ft, "--init", pre, *finetune_flags],
              nproc, cpu),
        Job("evaluate", "launchers/evaluate.py", ["--data", data, "--run", ft, *eval_flags], nproc, cpu,
              resumable=False),
    ]
    done = set(finished_jobs(runs))
    return [s for s in stages if s.name not in done]


def submit(stages: list[Job], cluster: str, folder: str, slurm_params: dict[str, Any] | None = None,
           wait: bool = False) -> list[Any]:
    """Submit STAGES in order, each after the previous one succeeded; returns the submitit jobs.

    On SLURM every job is submitted with --requeue (so that `scontrol requeue` works where the
    cluster's JobRequeue default is 0) and, from the second on, --dependency=afterok:<previous>."""
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    jobs: list[Any] = []
    for stage in stages:
        params: dict[str, Any] = {"name": f"patchrec-{stage.name}", "timeout_min": 60 * 24, "nodes": 1,
                                  "tasks_per_node": 1, **(slurm_params or {})}
        extra: dict[str, Any] = {"requeue": True, **params.pop("slurm_additional_parameters", {})}
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


def main(argv: list[str] | None = None) -> int:
    """`python -m patchrec_dist.pipeline finished RUNS`: the finished stages, one a line (slurm/pipeline.sh)."""
    p = argparse.ArgumentParser(prog="python -m patchrec_dist.pipeline")
    p.add_argument("command", choices=("finished",))
    p.add_argument("runs", help="the pipeline's runs folder or URL")
    args = p.parse_args(argv)
    for name in finished_jobs(args.runs):
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
