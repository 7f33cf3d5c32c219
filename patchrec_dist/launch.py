"""The per-node launcher: one process per node starts that node's ranks, watches them, and decides
what the job does when they stop. sbatch (`slurm/common.sh`: one srun task per node running
`python -m patchrec_dist.launch`) and submitit (`pipeline.Stage`: one task per node) both run it,
on 1 or N nodes; `deepspeed launchers/X.py` stays the one-node entry point for a shell.

    python -m patchrec_dist.launch --nproc 8 launchers/finetune.py --data s3://b/ml1m --output ...
    python -m patchrec_dist.launch --nproc 2 --cpu --nnodes 2 --node-rank 1 --master-addr host0 ...

The world comes from SLURM inside a job step (SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST: the
master is the allocation's first host, the port 20000 + job id % 20000, the same after a
requeue), else from the flags. Each rank gets exactly the environment DeepSpeed's launcher gives
(RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, CROSS_RANK, CROSS_SIZE, MASTER_ADDR, MASTER_PORT,
CUDA_VISIBLE_DEVICES, `--local_rank=i`).

Why a launcher of our own, and one per node rather than one srun task per rank:
- DeepSpeed's per-node launcher and torchrun answer SIGTERM (a preemption's signal) by SIGTERM to
  the ranks and SIGKILL a fixed time later: a ZeRO-3 save in progress dies, and the job fails
  instead of requeueing. Here USR1, USR2 and TERM only ask the ranks to save at the next step
  boundary (train/signals.py sets the flag in each rank; the ranks agree through an all-reduce).
- submitit runs its checkpoint hook in its task-0 process; that process must be a launcher that
  can wait for the ranks' save, not a rank busy training.
- A node that dies leaves srun waiting for its tasks until SLURM marks it down (SlurmdTimeout,
  300 s by default: measured 5.5 min on the namespace cluster). The launcher of a surviving node
  sees its ranks fail at their next collective and ends the job at once (requeue or fail), naming
  the nodes whose slurmd no longer answers.

What happens when the ranks end is decided in one place, `NodeLauncher.finish`:
- every rank 0: done;
- every rank 75 (stopped at a checkpoint): in a SLURM job, node 0 requeues it (`scontrol requeue`,
  or submitit's own requeue for a submitit stage; every rank has committed the checkpoint before
  any exits 75, see exit_process), unless PATCHREC_MAX_REQUEUES restarts happened already;
  outside SLURM exit 75 ("run me again");
- a rank failed: the node's other ranks get SIGTERM, then SIGKILL after FAILED_RANK_GRACE_S; in a
  job of several nodes the job is ended now: requeued while fewer than PATCHREC_FAILURE_REQUEUES
  restarts happened (default 0), else its batch shell is killed (JobState FAILED).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # imported here, never inside a signal handler: handlers nest (TERM, then USR2)

from patchrec_dist.train.distributed import free_port
from patchrec_dist.train.signals import RESUME_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]

#: After a rank failed (exit not 0/75) the others get SIGTERM, then SIGKILL this much later.
FAILED_RANK_GRACE_S = 30.0
#: stop_ranks() sends the stop signal again this often while it waits (a rank still starting up
#: ignores it).
RESEND_S = 5.0
#: Kept free before the time limit for the requeue after the ranks stopped.
REQUEUE_MARGIN_S = 15.0
#: How long a node asks another node's slurmd whether it is alive.
PROBE_TIMEOUT_S = 3.0


def log(message: str) -> None:
    print(f"[patchrec launch {time.strftime('%F %T')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# the world


def slurm_hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames NODELIST`: node[1-3] -> node1, node2, node3."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not out.stdout.split():
        raise RuntimeError(f"scontrol show hostnames {nodelist} failed: {out.stderr.strip()}")
    return out.stdout.split()


def job_master_port(job_id: str) -> int:
    """The same port for every node of a job, and again after a requeue: 20000-39999."""
    return 20000 + int(job_id) % 20000


@dataclass(frozen=True)
class World:
    """Where this node's ranks sit in the job."""

    nnodes: int
    node_rank: int
    nproc: int  # ranks per node
    master_addr: str
    master_port: int
    hosts: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return self.nnodes * self.nproc

    @classmethod
    def from_env(cls, nproc: int, master_port: int | None = None) -> World:
        """Inside a SLURM job step: the step's nodes (PATCHREC_MASTER_ADDR/PORT override); outside
        one: a single node on 127.0.0.1."""
        env = os.environ
        if env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID") is not None and env.get("SLURM_NODEID"):
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
            hosts = tuple(slurm_hostnames(nodelist))
            nnodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or len(hosts))
            port = int(env.get("PATCHREC_MASTER_PORT") or master_port or job_master_port(env["SLURM_JOB_ID"]))
            return cls(nnodes, int(env["SLURM_NODEID"]), nproc, env.get("PATCHREC_MASTER_ADDR") or hosts[0], port,
                       hosts)
        port = int(env.get("PATCHREC_MASTER_PORT") or master_port or free_port())
        return cls(1, 0, nproc, env.get("PATCHREC_MASTER_ADDR", "127.0.0.1"), port)


# ------------------------------------------------------------------------------------------------
# SLURM job control


def in_slurm_job() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))


def restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


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


def scontrol_requeue() -> bool:
    """Requeue this job: SLURM ends every step now and starts the job again (same id)."""
    job = os.environ["SLURM_JOB_ID"]
    log(f"scontrol requeue {job}")
    out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        log(f"scontrol requeue {job} failed: {out.stderr.strip()}")
    return out.returncode == 0


def fail_job() -> None:
    """End this job as FAILED now: SIGKILL to its batch shell (slurmstepd then ends every step,
    also those whose node no longer answers). `scancel` alone would record CANCELLED."""
    job = os.environ["SLURM_JOB_ID"]
    log(f"ending job {job}: scancel --batch --signal=KILL {job}")
    subprocess.run(["scancel", "--batch", "--signal=KILL", job], capture_output=True, timeout=60)


def slurmd_port() -> int:
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
        m = re.search(r"^SlurmdPort\s*=\s*(\d+)", out, re.M)
        return int(m.group(1)) if m else 6818
    except (OSError, subprocess.SubprocessError):
        return 6818


def unreachable_hosts(hosts: list[str], port: int, timeout_s: float = PROBE_TIMEOUT_S) -> list[str]:
    """The hosts whose slurmd does not accept a TCP connection within TIMEOUT_S (a dead node:
    connection refused on a live kernel, a time-out on a dead machine)."""
    def dead(host: str) -> bool:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return False
        except OSError:
            return True

    if not hosts:
        return []
    with ThreadPoolExecutor(len(hosts)) as pool:
        return [h for h, d in zip(hosts, pool.map(dead, hosts)) if d]


# ------------------------------------------------------------------------------------------------
# the ranks of one node


def _rank_preexec(pgid: int, ignored: tuple[int, ...]) -> None:
    """In each rank process before exec: one process group for the node's ranks (and their
    DataLoader workers), and the stop signals ignored until the trainer installs its own handler
    (ignored dispositions survive exec)."""
    os.setpgid(0, pgid)
    for sig in ignored:
        signal.signal(sig, signal.SIG_IGN)


def alive(proc: subprocess.Popen) -> bool:
    """Whether PROC still runs. Safe in a signal handler: unlike Popen.poll(), which returns None
    while the interrupted main thread holds the Popen's wait lock."""
    if proc.returncode is not None:
        return False
    try:
        return psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


def rank_env(cpu: bool) -> dict[str, str]:
    """This process's environment for rank processes (before the world's variables): unbuffered
    output, and for CPU ranks DeepSpeed's CPU accelerator with one thread unless told otherwise."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
                   TOKENIZERS_PARALLELISM=env.get("TOKENIZERS_PARALLELISM", "false"))
    return env


@dataclass
class NodeLauncher:
    """SCRIPT FLAGS on this node's ranks of WORLD, and what the job does when they end."""

    script: str  # a path, relative to the repository or absolute
    flags: list[str]
    world: World
    cpu: bool = False
    #: False for scripts that cannot stop at a checkpoint (evaluate.py): a stop request terminates
    #: their ranks (SIGTERM) and a requeued job runs them again from the start.
    resumable: bool = True
    stop_timeout_s: float = 300.0
    #: How a stopped job is requeued (scontrol_requeue; a submitit stage passes submitit's own).
    requeue: Callable[[], bool] = scontrol_requeue
    #: Signals this process leaves to another handler (submitit's preemption signal).
    foreign_signals: tuple[int, ...] = ()
    _procs: list[Any] = field(default_factory=list, repr=False)
    _stop_requested: bool = field(default=False, repr=False)

    @property
    def stop_signal(self) -> int:
        """What asks the ranks to stop: USR1 (save, exit 75), or TERM for a non-resumable script."""
        return signal.SIGUSR1 if self.resumable else signal.SIGTERM

    def device_ids(self) -> list[str]:
        """This node's device ids: the CUDA_VISIBLE_DEVICES SLURM gave when it names enough of
        them, else 0..N-1 (LOCAL_RANK counts from 0 either way)."""
        ids = [str(i) for i in range(max(1, self.world.nproc))]
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if not self.cpu and visible != ["NoDevFiles"] and len(visible) >= len(ids):
            ids = visible[:len(ids)]
        return ids

    def rank_commands(self) -> list[tuple[list[str], dict[str, str]]]:
        """(argv, environment) of each rank process of this node, as DeepSpeed's launcher starts them."""
        script = str(REPO / self.script)
        w, env = self.world, rank_env(self.cpu)
        env.update(MASTER_ADDR=w.master_addr, MASTER_PORT=str(w.master_port), WORLD_SIZE=str(w.size),
                   LOCAL_SIZE=str(w.nproc), CROSS_RANK=str(w.node_rank), CROSS_SIZE=str(w.nnodes),
                   CUDA_VISIBLE_DEVICES=",".join(self.device_ids()))
        return [([sys.executable, "-u", script, f"--local_rank={i}", *self.flags],
                 {**env, "RANK": str(w.node_rank * w.nproc + i), "LOCAL_RANK": str(i)})
                for i in range(w.nproc)]

    # -- running --------------------------------------------------------------------------------
    def run(self) -> int:
        """Run the ranks to their end, then act on it (finish). Returns this node's exit code."""
        restore = self._forward_stop_signals()
        try:
            return self.finish(self.run_ranks())
        finally:
            restore()
            self.kill_ranks()

    def run_ranks(self) -> list[int]:
        """Start this node's ranks and wait for all of them; their exit codes."""
        ignored = tuple(dict.fromkeys((*STOP_SIGNALS, *self.foreign_signals)))
        self._procs, self._stop_requested = [], False
        w = self.world
        for argv, env in self.rank_commands():
            pgid = self._procs[0].pid if self._procs else 0
            self._procs.append(subprocess.Popen(argv, cwd=REPO, env=env,
                                                preexec_fn=lambda pgid=pgid: _rank_preexec(pgid, ignored)))
        log(f"node {w.node_rank}/{w.nnodes} ({socket.gethostname()}): ranks "
            f"{w.node_rank * w.nproc}-{(w.node_rank + 1) * w.nproc - 1} of {w.size} started, master "
            f"{w.master_addr}:{w.master_port}: {self.script} {' '.join(self.flags)}")
        failed_at: float | None = None
        while True:
            codes = [p.poll() for p in self._procs]  # main thread, never a blocking wait (see alive)
            if all(c is not None for c in codes):
                break
            if failed_at is None and any(c not in (None, 0, RESUME_EXIT_CODE) for c in codes):
                failed_at = time.monotonic()
                log(f"node {w.node_rank}: a rank failed ({self._describe(codes)}): stopping this node's others")
                self.signal_ranks(signal.SIGTERM)
            elif failed_at is not None and time.monotonic() - failed_at > FAILED_RANK_GRACE_S:
                self.kill_ranks()
            time.sleep(0.2)
        log(f"node {w.node_rank}: ranks exited: {self._describe(codes)}")
        return codes

    def _describe(self, codes: list[int | None]) -> str:
        base = self.world.node_rank * self.world.nproc
        return ", ".join(f"rank {base + i}: {'running' if c is None else c}" for i, c in enumerate(codes))

    def outcome(self, codes: list[int]) -> int:
        """0, 75 (stopped at a checkpoint, or a non-resumable script stopped on request) or the
        first failure's code."""
        bad = [c for c in codes if c not in (0, RESUME_EXIT_CODE)]
        if bad and not self.resumable and (self._stop_requested or set(bad) == {-signal.SIGTERM}):
            return RESUME_EXIT_CODE  # stopped on request (or by SLURM's TERM): run it again
        if bad:
            return 128 - bad[0] if bad[0] < 0 else bad[0]  # killed by signal N: 128 + N, as a shell says
        return RESUME_EXIT_CODE if RESUME_EXIT_CODE in codes else 0

    def finish(self, codes: list[int]) -> int:
        """The one place that decides what the job does after this node's ranks ended."""
        code, w = self.outcome(codes), self.world
        if code == 0 or not in_slurm_job():
            return code
        if code == RESUME_EXIT_CODE:
            if w.node_rank != 0:
                return code  # node 0 requeues the job
            limit = int(os.environ.get("PATCHREC_MAX_REQUEUES", 100))
            if restart_count() >= limit:
                log(f"stopped at a checkpoint (exit 75); not requeued: {restart_count()} restarts already "
                    f"(PATCHREC_MAX_REQUEUES={limit})")
                return code
            log("stopped at a checkpoint (exit 75): requeueing (resumes from it)")
            self.requeue()
            return code
        if w.nnodes > 1:
            self.end_job_after_failure(code)
        return code

    def end_job_after_failure(self, code: int) -> None:
        """Another node may be dead, and srun would wait for its tasks until SLURM marks it down:
        end the job now."""
        w = self.world
        others = [h for i, h in enumerate(w.hosts) if i != w.node_rank]
        lost = unreachable_hosts(others, slurmd_port())
        where = f"lost node(s) {', '.join(lost)} (slurmd does not answer)" if lost else \
            "every other node's slurmd answers (a rank failed, or a node lost its network)"
        log(f"node {w.node_rank}: training failed (exit {code}); {where}")
        allowed = int(os.environ.get("PATCHREC_FAILURE_REQUEUES", 0))
        if restart_count() < allowed:
            log(f"requeueing after the failure ({restart_count()} of PATCHREC_FAILURE_REQUEUES={allowed} "
                "restarts used): the job resumes from its newest complete checkpoint")
            if scontrol_requeue():
                return
        fail_job()

    # -- stopping -------------------------------------------------------------------------------
    def signal_ranks(self, sig: int) -> None:
        for p in self._procs:
            if alive(p):
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass

    def kill_ranks(self) -> None:
        """SIGKILL whatever is left of the ranks' process group (ranks and DataLoader workers)."""
        if self._procs:
            try:
                os.killpg(self._procs[0].pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _forward_stop_signals(self) -> Callable[[], None]:
        """USR1/USR2/TERM to this process -> stop_signal to the ranks (then the previous handler).
        Returns the function that restores the previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous: dict[int, Any] = {}

        def forward(signum, frame) -> None:
            log(f"got {signal.Signals(signum).name}: asking the ranks to stop ({signal.Signals(self.stop_signal).name})")
            self._stop_requested = True
            self.signal_ranks(self.stop_signal)
            old = previous.get(signum)
            if callable(old):
                old(signum, frame)

        for sig in STOP_SIGNALS:
            if sig not in self.foreign_signals:
                previous[sig] = signal.signal(sig, forward)

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old if old is not None else signal.SIG_DFL)

        return restore

    def stop_ranks(self) -> bool:
        """stop_signal to the ranks (again every RESEND_S) until every rank exited, within
        stop_timeout_s and the job's time left. True if they all exited."""
        if not any(alive(p) for p in self._procs):
            log("stop requested: every rank had exited already")
            return True
        budget = self.stop_timeout_s
        left = slurm_time_left_s()
        if left is not None:
            budget = max(1.0, min(budget, left - REQUEUE_MARGIN_S))
        log(f"stop requested: asking the ranks to stop ({signal.Signals(self.stop_signal).name}), "
            f"waiting up to {budget:.0f}s")
        self._stop_requested = True
        t0, sent = time.monotonic(), float("-inf")
        while any(alive(p) for p in self._procs) and time.monotonic() - t0 < budget:
            if time.monotonic() - sent >= RESEND_S:
                self.signal_ranks(self.stop_signal)
                sent = time.monotonic()
            time.sleep(0.2)
        if any(alive(p) for p in self._procs):
            log(f"ranks still running after {budget:.0f}s: requeueing anyway (the requeued job resumes from the "
                "newest complete checkpoint)")
            return False
        log(f"every rank exited after {time.monotonic() - t0:.1f}s: requeueing")
        return True


# ------------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m patchrec_dist.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, required=True, help="ranks on this node (GPUs, or CPU ranks with --cpu)")
    p.add_argument("--cpu", action="store_true", help="CPU ranks (DS_ACCELERATOR=cpu, gloo)")
    p.add_argument("--not-resumable", action="store_true",
                   help="the script cannot stop at a checkpoint (evaluate.py): a stop terminates it")
    p.add_argument("--nnodes", type=int, default=None, help="outside SLURM: nodes of the job")
    p.add_argument("--node-rank", type=int, default=None, help="outside SLURM: this node's index")
    p.add_argument("--master-addr", default=None, help="outside SLURM: node 0's address")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port (SLURM: 20000 + job id %% 20000)")
    p.add_argument("script", help="launchers/pretrain.py, finetune.py or evaluate.py")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="the script's flags")
    args = p.parse_args(argv)
    if args.nproc < 1:
        p.error(f"--nproc must be at least 1, got {args.nproc}")
    if not (REPO / args.script).is_file():
        p.error(f"script not found: {args.script}")
    world = World.from_env(args.nproc, args.master_port)
    if args.nnodes is not None or args.node_rank is not None:
        if in_slurm_job():
            p.error("--nnodes/--node-rank are for runs outside SLURM (inside a job step SLURM gives the world)")
        nnodes, node = args.nnodes or 1, args.node_rank or 0
        if not 0 <= node < nnodes:
            p.error(f"--node-rank {node} is not in 0..{nnodes - 1}")
        if nnodes > 1 and not (args.master_addr and args.master_port):
            p.error("--master-addr and --master-port are required with --nnodes > 1 (node 0's address, one port)")
        world = World(nnodes, node, args.nproc, args.master_addr or world.master_addr,
                      args.master_port or world.master_port)
    launcher = NodeLauncher(args.script, args.flags, world, cpu=args.cpu, resumable=not args.not_resumable)
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
