"""Run the launchers on this machine, as a user would type them, with their output in a log file.

`make demo` and bench/quality.py chain several launcher runs (pretrain, finetune, evaluate). Each
run is the same command `deepspeed launchers/X.py ...` a user types (built by pipeline.Job, the
submitit path's command), so the demo exercises exactly what a user runs. The full output of
every rank goes to LOG; only our own progress lines are echoed, so the demo reads as a story
rather than a wall of DeepSpeed start-up messages.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from patchrec_dist.launch import free_port, rank_env
from patchrec_dist.pipeline import REPO, Job
from patchrec_dist.train.signals import RESUME_EXIT_CODE

# Lines worth showing: the trainer's and evaluator's own progress and tables.
PROGRESS = re.compile(r"^(step \d+|training |stop requested|evaluating .*100%|\s*K\s+HR|\s*\d+\s+[01]\.\d|"
                      r"scoring=|\d+ \w+ examples in |\w+: error|.*Error:)")


class LauncherFailed(RuntimeError):
    """A launcher exited non-zero; the message names the command, the exit code and the log."""


def cpu_threads_per_rank(nproc: int) -> int:
    """Ranks share this machine's cores; more threads than cores only adds contention."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, nproc))


def run_launcher(launcher: str, flags: list[str], nproc: int, log_path: str | Path, cpu: bool = True,
                 echo: Callable[[str], None] | None = print, timeout_s: float | None = None,
                 stop_grace_s: float = 0.0) -> float:
    """Run `deepspeed --num_gpus NPROC LAUNCHER FLAGS` (plain python for NPROC 0) to its end.

    A stop at a checkpoint (exit 75) is resumed in place, as the cluster scripts do. If this
    process is interrupted (Ctrl-C, SIGTERM), the ranks get SIGUSR1 and STOP_GRACE_S seconds to
    save a checkpoint (training: the next run resumes from it) before the group is killed.
    Returns the wall seconds; raises LauncherFailed with the log's tail otherwise."""
    stage = Job(Path(launcher).stem, launcher, flags, nproc=nproc, cpu=cpu)
    env = rank_env(cpu)
    if cpu:
        env["OMP_NUM_THREADS"] = str(cpu_threads_per_rank(max(1, nproc)))
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    while True:
        cmd = stage.command(free_port())
        code, tail = _run_logged(cmd, env, log_path, echo, timeout_s, stop_grace_s)
        if code != RESUME_EXIT_CODE:
            break
    if code != 0:
        shown = "\n".join(tail)
        raise LauncherFailed(f"{launcher} exited with {code}; full log: {log_path}\n"
                             f"command: {' '.join(cmd)}\n--- last lines ---\n{shown}")
    return time.perf_counter() - t0


def _run_logged(cmd: list[str], env: dict[str, str], log_path: Path, echo: Callable[[str], None] | None,
                timeout_s: float | None, stop_grace_s: float) -> tuple[int, deque[str]]:
    tail: deque[str] = deque(maxlen=40)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1, start_new_session=True,
                                preexec_fn=_launcher_ignores_usr1)
        # A reader thread, so the output keeps flowing into the log while we wait for a stop.
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(proc, lines), daemon=True).start()

        def consume(until: float | None) -> bool:
            """Handle output until the process ends (True) or UNTIL passes (False)."""
            while True:
                wait = None if until is None else max(0.0, until - time.monotonic())
                try:
                    chunk = lines.get(timeout=wait if wait is None else min(wait, 1.0))
                except queue.Empty:
                    if until is not None and time.monotonic() >= until:
                        return False
                    continue
                if chunk is None:
                    return True
                _handle(chunk, log, tail, echo)

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            if not consume(deadline):
                raise TimeoutError(f"{cmd[-1]} ran past {timeout_s:.0f}s")
            code = proc.wait()
        except BaseException:
            if stop_grace_s > 0 and proc.poll() is None:
                _signal_group(proc, signal.SIGUSR1)  # ranks save a checkpoint and exit 75
                consume(time.monotonic() + stop_grace_s)
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
            raise
    return code, tail


def _pump(proc: subprocess.Popen, lines: queue.Queue) -> None:
    assert proc.stdout is not None
    for chunk in proc.stdout:
        lines.put(chunk)
    lines.put(None)


def _handle(chunk: str, log: Any, tail: deque[str], echo: Callable[[str], None] | None) -> None:
    log.write(chunk)
    log.flush()  # `tail -f` on the log shows the run as it goes
    # tqdm redraws with \r; the last redraw of a line is the state worth keeping
    line = _strip_rank_prefix(chunk.rstrip("\n").split("\r")[-1])
    if line.strip():
        tail.append(line)
    if echo is not None and PROGRESS.match(line):
        echo(line)


def _strip_rank_prefix(line: str) -> str:
    # DeepSpeed's launcher prefixes nothing by default; `[rank0]:` comes from torch elastic logs.
    return re.sub(r"^\[rank\d+\]:\s?", "", line)


def _launcher_ignores_usr1() -> None:
    # Inherited by the launcher processes; the ranks install their own USR1 handler (save, exit 75).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
