"""Launch `deepspeed --num_gpus N script ...` on CPU ranks for a test, with a hard time limit.

Every launch runs in its own session so that a hang or a failed assertion kills the launcher,
its ranks and their DataLoader workers together (no orphans eating the CI's two cores).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from patchrec_dist.launch import free_port

REPO = Path(__file__).resolve().parents[1]


def deepspeed_launcher() -> list[str]:
    exe = Path(sys.executable).with_name("deepspeed")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]


@dataclass
class Launch:
    returncode: int | None  # None: killed at the time limit
    output: str
    seconds: float

    def tail(self, n: int = 4000) -> str:
        return self.output[-n:]


def launch(script: str, args: list[str], nprocs: int = 2, timeout: float = 180, env: dict | None = None,
           while_running: Callable[[subprocess.Popen], None] | None = None,
           on_line: Callable[[str], None] | None = None, launcher: str = "deepspeed") -> Launch:
    """Run SCRIPT on NPROCS CPU ranks under LAUNCHER: "deepspeed" (the `deepspeed` runner) or
    "patchrec" (`python -m patchrec_dist.launch`, the SLURM scripts' per-node launcher).
    WHILE_RUNNING(proc) may poke the job (signals) as it runs; ON_LINE(line) sees the output as it
    comes. The process group is killed at the end, on failure, and at TIMEOUT (then returncode is None)."""
    import threading

    if launcher == "patchrec":
        cmd = [sys.executable, "-m", "patchrec_dist.launch", "--nproc", str(nprocs), "--cpu", script, *args]
    else:
        cmd = [*deepspeed_launcher(), "--num_gpus", str(nprocs), "--master_port", str(free_port()), script, *args]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                try:
                    on_line(line)
                except Exception as exc:  # noqa: BLE001 - report it, never stop reading
                    lines.append(f"on_line failed: {exc!r}\n")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if while_running is not None:
            while_running(proc)
        code: int | None = proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        code = None
    finally:
        try:  # no orphans: ranks and their DataLoader workers share the launcher's process group
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        reader.join(timeout=10)
    return Launch(code, "".join(lines), time.monotonic() - t0)


def rank_processes(proc: subprocess.Popen, script_name: str) -> list:
    """The rank processes (not DataLoader workers) under a launcher, ordered by local rank."""
    import psutil

    ranks = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if any(script_name in c for c in cmd) and any(c.startswith("--local_rank=") for c in cmd):
            if child.ppid() == proc.pid or "deepspeed.launcher.launch" in " ".join(psutil.Process(child.ppid()).cmdline()):
                rank = next(int(c.split("=")[1]) for c in cmd if c.startswith("--local_rank="))
                ranks.append((rank, child))
    return [p for _, p in sorted(ranks, key=lambda x: x[0])]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"waited {timeout:.0f}s for {what}")
