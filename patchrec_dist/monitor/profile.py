"""torch.profiler over a window of optimizer steps (`--profile-steps 3-4`), on rank 0.

Writes OUTPUT/profile/ops.txt (torch's table of operators by self time: device time on CUDA, CPU
time otherwise), ops.json (the same rows as data, for benchmarks) and trace.json (a Chrome trace:
chrome://tracing or https://ui.perfetto.dev). Why: a step's wall time says *that* a run is slow,
the table says *where* (kernels, host syncs, launch overhead); the first H200 run of this project
spent 0.25-0.8 s in a 135M-parameter forward, which only an operator table can explain.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from patchrec_dist.data import storage

TOP_OPS = 40


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
    """'3-4' -> (3, 4), '5' -> (5, 5), '' -> None; optimizer steps count from 1."""
    if not spec:
        return None
    first, _, last = spec.partition("-")
    try:
        window = (int(first), int(last or first))
    except ValueError:
        raise ValueError(f"--profile-steps {spec!r}: expected A-B or A (optimizer steps, from 1)") from None
    if not 1 <= window[0] <= window[1]:
        raise ValueError(f"--profile-steps {spec!r}: expected 1 <= A <= B")
    return window


class StepProfiler:
    """`begin(step)` before optimizer step STEP (1-based), `end(step)` after it; profiles the window."""

    def __init__(self, spec: str, output: str, enabled: bool) -> None:
        self.window = parse_profile_steps(spec) if enabled else None
        self.output = output
        self.prof: Any = None  # torch.profiler.profile while the window is open

    def begin(self, step: int) -> None:
        if self.window is None or step != self.window[0]:
            return
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities)
        self.prof.start()

    def end(self, step: int) -> None:
        if self.prof is None or step != self.window[1]:
            return
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the window's kernels finish inside it
        self.prof.stop()
        self.write(self.prof)
        self.prof = None

    def write(self, prof: Any) -> None:
        import torch

        events = prof.key_averages()
        on_device = torch.cuda.is_available()
        sort = "self_device_time_total" if on_device else "self_cpu_time_total"
        rows = sorted(events, key=lambda e: getattr(e, sort), reverse=True)[:TOP_OPS]
        table: dict[str, Any] = {
            "steps": list(self.window), "sorted_by": sort, "device": "cuda" if on_device else "cpu",
            "what": "per profiled window (divide by steps for one step); times in ms",
            "ops": [{"name": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
                     "cpu_total_ms": round(e.cpu_time_total / 1e3, 3),
                     "self_device_ms": round(getattr(e, "self_device_time_total", 0.0) / 1e3, 3)} for e in rows],
            "total_self_cpu_ms": round(sum(e.self_cpu_time_total for e in events) / 1e3, 3),
            "total_self_device_ms": round(sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1e3, 3),
        }
        base = storage.join(self.output, "profile")
        storage.write_bytes_atomic(f"{base}/ops.txt", events.table(sort_by=sort, row_limit=TOP_OPS).encode())
        storage.write_bytes_atomic(f"{base}/ops.json", (json.dumps(table, indent=1) + "\n").encode())
        with tempfile.TemporaryDirectory() as tmp:  # torch writes a local file; the output may be a URL
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path, "rb") as fh:
                storage.write_bytes_atomic(f"{base}/trace.json", fh.read())
