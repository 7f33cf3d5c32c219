"""What a run shows: TensorBoard scalars and a progress line, written by rank 0 only.

A resumed run opens the same log folder with purge_step at its first new step, so curves continue
without duplicated points. That purge also hides, in an older event file, the points a crashed
run logged after its last checkpoint: TensorBoard reads a folder's event files in name (= creation
time) order, and the resumed run's file comes later.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil

from patchrec_dist.data import storage


class Monitor:
    def __init__(self, logdir: str | None, enabled: bool, start_step: int, total_steps: int,
                 log_every: int = 1) -> None:
        self.enabled, self.total, self.log_every = enabled, total_steps, max(1, log_every)
        self.writer = None
        if enabled and logdir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(logdir, purge_step=start_step + 1 if start_step else None)
        self._t0, self._s0 = time.perf_counter(), start_step

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def step(self, step: int, values: dict[str, float]) -> None:
        """One optimizer step: scalars, memory, and every log_every steps a progress line."""
        if not self.enabled:
            return
        values = {**values, "sys/mem_gb": psutil.Process().memory_info().rss / 2**30}
        try:
            import torch

            if torch.cuda.is_available():
                values["sys/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        except Exception:  # noqa: BLE001 - monitoring never fails a run
            pass
        self.scalars(step, values)
        if step % self.log_every == 0 or step == self.total:
            done = step - self._s0
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / done * (self.total - step) if done else float("nan")
            print(f"step {step}/{self.total} loss {values.get('train/loss', float('nan')):.4f} "
                  f"lr {values.get('train/lr', 0):.2e} {values.get('train/examples_per_s', 0):.1f} ex/s "
                  f"compression {values.get('train/compression', 1):.2f} eta {eta:.0f}s", flush=True)

    def text(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def upload_logdir(logdir: str, url: str) -> None:
    """Copy every file under the local LOGDIR to URL (same relative paths). Event files only grow
    and have unique names, so copying them again replaces each with a longer version of itself,
    and files of earlier runs already at URL stay."""
    for dirpath, _, names in os.walk(logdir):
        for name in names:
            src = os.path.join(dirpath, name)
            rel = os.path.relpath(src, logdir).replace(os.sep, "/")
            storage.write_bytes_atomic(storage.join(url, rel), Path(src).read_bytes())


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """All scalar series under LOGDIR (for tests, reports and the demo)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def summary(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
