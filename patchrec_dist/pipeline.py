"""pretrain -> finetune -> evaluate as submitit jobs (SLURM, or local processes).

Each stage is a submitit Checkpointable that runs one launcher on one node. The stage's process is
the node's launcher: it starts the N rank processes itself, with the environment and arguments
DeepSpeed's launcher gives them (`deepspeed --num_gpus N LAUNCHER FLAGS`, which `command()`
shows and patchrec_dist/runner.py runs): RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, CROSS_RANK,
CROSS_SIZE, MASTER_ADDR, MASTER_PORT, CUDA_VISIBLE_DEVICES and `--local_rank=i`.

Stopping, checked on the local SLURM cluster (tests/test_submit.py):

- SLURM signals every process of the job step, not only submitit's: `--signal=USR2@90` before the
  time limit (submitit's default; USR2 is submitit's preemption signal), SIGTERM on a preemption
  or `scancel`; submitit's `job._interrupt()` sends TERM then USR2 (`_interrupt(timeout=True)`:
  USR2 only). `scancel --signal=TERM` makes slurmstepd log `*** STEP N.0 ... CANCELLED ***`, but
  the step goes on.
- The ranks save at the next step boundary and exit 75 on USR1 or TERM (train/signals.py). They
  start with USR1 and USR2 ignored: USR2 is not theirs (its default action would kill them), and a
  USR1 before the trainer installed its handler must not kill them either. Evaluation cannot stop
  at a checkpoint (`resumable=False`): a stop request terminates its ranks and the requeued job
  evaluates again from the start.
- submitit's USR2 handler runs here (submitit's rank 0) and calls `checkpoint()`, which sends USR1
  to the ranks (again every few seconds) and returns once every rank exited, so submitit dumps the
  stage and runs `scontrol requeue` (which ends the job at once) only after the ranks saved. The
  wait is bounded by `stop_timeout_s` and by the job's time left (squeue), so that the requeue
  still happens before the time limit.
- Ranks that stop at a checkpoint without submitit's signal (a preemption that sends only TERM,
  `scancel --signal=USR1 JOBID`, `kill -USR1` by hand) are requeued the same way: the stage calls
  submitit's own handler, as if its signal had come. Outside a submitit job the stage resumes in
  place. USR1 and TERM sent to this process are forwarded to the ranks (USR1; TERM for evaluation).

Why not DeepSpeed's launcher processes here: the runner (`deepspeed`) has no SIGTERM handler and
dies of it, and the per-node launcher (`deepspeed.launcher.launch`) answers SIGTERM with SIGTERM
to the ranks, SIGKILL 30 s later and exit 1: a preemption could kill ranks in the middle of a
ZeRO-3 save, and the stage never saw their exit 75. And the waits never block in `Popen.wait()`:
it holds a lock that makes `poll()` from a signal handler return None until the process is reaped
(the earlier `checkpoint()` waited its whole timeout before requeueing).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # imported here, never inside a signal handler: handlers nest (TERM, then USR2)
import submitit

from patchrec_dist.train.signals import RESUME_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]

#: After a rank failed (exit not 0/75) the others get SIGTERM, then SIGKILL this much later (as
#: DeepSpeed's launcher does).
FAILED_RANK_GRACE_S = 30.0
#: checkpoint() sends USR1 again this often while it waits (a rank still starting up ignores it).
RESEND_S = 5.0
#: Kept free before the time limit for the dump and `scontrol requeue` after the ranks stopped.
REQUEUE_MARGIN_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _preempt_signal() -> int:
    """submitit's preemption signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    return int(getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG, signal.SIGUSR2))


def _rank_preexec(pgid: int, ignored: tuple[int, ...]) -> None:
    """In each rank process before exec: one process group for the stage's ranks (and their
    DataLoader workers), and the stop/preemption signals ignored until the trainer installs its
    own USR1/TERM handler (ignored dispositions survive exec)."""
    os.setpgid(0, pgid)
    for sig in ignored:
        signal.signal(sig, signal.SIG_IGN)


def _log(message: str) -> None:
    print(f"[patchrec stage {time.strftime('%F %T')}] {message}", file=sys.stderr, flush=True)


def _alive(proc: subprocess.Popen) -> bool:
    """Whether PROC still runs. Safe in a signal handler: unlike Popen.poll(), which returns None
    while the interrupted main thread holds the Popen's wait lock."""
    if proc.returncode is not None:
        return False
    try:
        return psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def slurm_time_left_s() -> float | None:
    """Seconds before this SLURM job's time limit (`squeue -o %L`), None if unknown/unlimited."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", out)
    if not m:
        return None  # UNLIMITED, NOT_SET, INVALID, or no answer
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


@dataclass
class Stage(submitit.helpers.Checkpointable):
    """One stage: LAUNCHER FLAGS on NPROC ranks (`deepspeed --num_gpus N`), plain python for nproc = 0."""

    name: str
    launcher: str  # launchers/pretrain.py, finetune.py or evaluate.py
    flags: list[str]
    nproc: int = 1
    cpu: bool = False
    stop_timeout_s: float = 300.0
    #: False for launchers that cannot stop at a checkpoint (evaluate.py): a stop request
    #: terminates their ranks (SIGTERM) and the requeued job runs them again from the start.
    resumable: bool = True
    _procs: list[Any] = field(default_factory=list, repr=False, compare=False)
    _stop_requested: bool = field(default=False, repr=False, compare=False)

    @property
    def stop_signal(self) -> int:
        """What asks this stage's ranks to stop: USR1 (save, exit 75), or TERM for a non-resumable one."""
        return signal.SIGUSR1 if self.resumable else signal.SIGTERM

    def command(self, port: int = 29500) -> list[str]:
        """The equivalent user command: `deepspeed --num_gpus N LAUNCHER FLAGS` (python for nproc 0)."""
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

    def device_ids(self) -> list[str]:
        """This node's device ids: the CUDA_VISIBLE_DEVICES SLURM gave when it names enough of them,
        else 0..N-1 (as slurm/common.sh does; `deepspeed --num_gpus N` always takes 0..N-1)."""
        ids = [str(i) for i in range(max(1, self.nproc))]
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if not self.cpu and visible != ["NoDevFiles"] and len(visible) >= len(ids):
            ids = visible[:len(ids)]
        return ids

    def rank_commands(self, port: int) -> list[tuple[list[str], dict[str, str]]]:
        """(argv, environment) of each rank process, as DeepSpeed's launcher would start them."""
        script = str(REPO / self.launcher)
        env = self.env()
        if self.nproc <= 0:
            return [([sys.executable, "-u", script, *self.flags], env)]
        n = self.nproc
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(n), LOCAL_SIZE=str(n),
                   CROSS_RANK="0", CROSS_SIZE="1", CUDA_VISIBLE_DEVICES=",".join(self.device_ids()))
        return [([sys.executable, "-u", script, f"--local_rank={i}", *self.flags], {**env, "RANK": str(i),
                                                                                    "LOCAL_RANK": str(i)})
                for i in range(n)]

    # -- running -------------------------------------------------------------------------------
    def __call__(self) -> dict[str, Any]:
        """Run the stage to its end. A stop at a checkpoint (exit 75) is requeued through submitit
        in a submitit job, resumed in place otherwise."""
        restore = self._forward_stop_signals()
        try:
            while True:
                code = self._run_ranks()
                if code != RESUME_EXIT_CODE:
                    break
                self._requeue_after_stop()  # returns only outside submitit: resume in place
        finally:
            restore()
            self._kill_ranks()
        if code != 0:
            raise RuntimeError(f"stage {self.name} failed: {' '.join(self.command())} exited with {code}")
        return {"stage": self.name, "exit": code}

    def _run_ranks(self) -> int:
        """Start the ranks, wait for all of them; 0, 75 (all stopped at a checkpoint, or a
        non-resumable stage stopped on request) or the first failure's exit code."""
        ignored = tuple(dict.fromkeys((signal.SIGUSR1, signal.SIGUSR2, _preempt_signal())))
        self._procs, self._stop_requested = [], False
        for argv, env in self.rank_commands(free_port()):
            pgid = self._procs[0].pid if self._procs else 0
            self._procs.append(subprocess.Popen(argv, cwd=REPO, env=env,
                                                preexec_fn=lambda pgid=pgid: _rank_preexec(pgid, ignored)))
        _log(f"{self.name}: {len(self._procs)} rank(s) started: {' '.join(self.command())}")
        failed_at: float | None = None
        first_failure: int | None = None
        while True:
            codes = [p.poll() for p in self._procs]  # main thread, never a blocking wait (see _alive)
            if all(c is not None for c in codes):
                break
            if failed_at is None and any(c not in (None, 0, RESUME_EXIT_CODE) for c in codes):
                failed_at = time.monotonic()
                first_failure = next(c for c in codes if c not in (None, 0, RESUME_EXIT_CODE))
                _log(f"{self.name}: a rank failed (exit codes {codes}): stopping the others")
                self._signal_ranks(signal.SIGTERM)
            elif failed_at is not None and time.monotonic() - failed_at > FAILED_RANK_GRACE_S:
                self._kill_ranks()
            time.sleep(0.2)
        _log(f"{self.name}: ranks exited with {codes}")
        bad = [c for c in codes if c not in (0, RESUME_EXIT_CODE)]
        if bad and not self.resumable and (self._stop_requested or set(bad) == {-signal.SIGTERM}):
            return RESUME_EXIT_CODE  # stopped on request (or by SLURM's TERM): run it again
        if bad:
            return first_failure if first_failure is not None else bad[0]
        return RESUME_EXIT_CODE if RESUME_EXIT_CODE in codes else 0

    def _signal_ranks(self, sig: int) -> None:
        for p in self._procs:
            if _alive(p):
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass

    def _kill_ranks(self) -> None:
        """SIGKILL whatever is left of the ranks' process group (ranks and DataLoader workers)."""
        if self._procs:
            try:
                os.killpg(self._procs[0].pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _forward_stop_signals(self):
        """USR1/TERM to this process -> stop_signal to the ranks (then the previous handler, e.g.
        submitit's TERM logger). Returns the function that restores the previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous: dict[int, Any] = {}

        def forward(signum, frame) -> None:
            _log(f"{self.name}: got {signal.Signals(signum).name}: asking the ranks to stop "
                 f"({signal.Signals(self.stop_signal).name})")
            self._stop_requested = True
            self._signal_ranks(self.stop_signal)
            old = previous.get(signum)
            if callable(old):
                old(signum, frame)

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            if sig != _preempt_signal():  # never replace submitit's own handler
                previous[sig] = signal.signal(sig, forward)

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old if old is not None else signal.SIG_DFL)

        return restore

    # -- submitit: requeue only after the ranks saved --------------------------------------------
    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """submitit calls this on its preemption/timeout signal, then requeues: stop the ranks first."""
        self.stop_ranks()
        return submitit.helpers.DelayedSubmission(self)

    def stop_ranks(self) -> bool:
        """stop_signal to the ranks (again every RESEND_S) until every rank exited, within
        stop_timeout_s and the job's time left. True if they all exited."""
        if not any(_alive(p) for p in self._procs):
            _log(f"{self.name}: stop requested: every rank had exited already")
            return True
        budget = self.stop_timeout_s
        left = slurm_time_left_s()
        if left is not None:
            budget = max(1.0, min(budget, left - REQUEUE_MARGIN_S))
        _log(f"{self.name}: stop requested: asking the ranks to stop ({signal.Signals(self.stop_signal).name}), "
             f"waiting up to {budget:.0f}s")
        self._stop_requested = True
        t0 = time.monotonic()
        sent = float("-inf")
        while any(_alive(p) for p in self._procs) and time.monotonic() - t0 < budget:
            if time.monotonic() - sent >= RESEND_S:
                self._signal_ranks(self.stop_signal)
                sent = time.monotonic()
            time.sleep(0.2)
        if any(_alive(p) for p in self._procs):
            _log(f"{self.name}: ranks still running after {budget:.0f}s: requeueing anyway (the requeued job "
                 "resumes from the newest complete checkpoint)")
            return False
        _log(f"{self.name}: every rank exited after {time.monotonic() - t0:.1f}s: requeueing")
        return True

    def _requeue_after_stop(self) -> None:
        """The ranks stopped at a checkpoint (exit 75). In a submitit job: requeue through submitit's
        own handler (checkpoint(), dump, `scontrol requeue`, exit), as if its signal had come.
        Returns only outside a submitit job (then the caller resumes in place)."""
        sig = _preempt_signal()
        handler = signal.getsignal(sig) if threading.current_thread() is threading.main_thread() else None
        if not os.environ.get("SUBMITIT_EXECUTOR") or not callable(handler):
            _log(f"{self.name}: the ranks stopped at a checkpoint: resuming in place")
            return
        signal.signal(sig, signal.SIG_IGN)  # a signal arriving now must not requeue a second time
        _log(f"{self.name}: the ranks stopped at a checkpoint without submitit's signal: requeueing through "
             "submitit")
        try:
            handler(sig, None)  # exits (SystemExit) once requeued
        except subprocess.CalledProcessError as exc:  # scontrol requeue refused: the job is ending anyway
            raise RuntimeError(f"stage {self.name} stopped at a checkpoint but could not be requeued ({exc}); "
                               "run it again to resume") from exc

    def __getstate__(self) -> dict[str, Any]:  # submitit pickles the stage to requeue it
        state = dict(self.__dict__)
        state["_procs"], state["_stop_requested"] = [], False
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
        Stage("evaluate", "launchers/evaluate.py", ["--data", data, "--run", ft, *eval_flags], nproc, cpu,
              resumable=False),
    ]
    done = {"pretrain": os.path.join(pre, "DONE.json"), "finetune": os.path.join(ft, "DONE.json"),
            "evaluate": os.path.join(ft, "eval-test", "metrics.json")}
    return [s for s in stages if not os.path.exists(done[s.name])]


def submit(stages: list[Stage], cluster: str, folder: str, slurm_params: dict[str, Any] | None = None,
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
