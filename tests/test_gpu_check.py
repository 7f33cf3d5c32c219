"""bench/gpu_check.sh --dry-run: every command it would run on a GPU machine, printed and with its
arguments checked, on this CPU machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ML_1M = REPO.parent / "shared" / "data" / "patchrec" / "ml-1m"


@pytest.mark.skipif(not ML_1M.exists(), reason="needs ../shared/data/patchrec/ml-1m")
def test_dry_run_prints_and_checks_every_command():
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    steps = [line.split("]")[0] for line in proc.stdout.splitlines() if line.startswith("+ [")]
    assert [s.split(",")[0][3:] for s in steps] == ["shard", "gpu-tests", "train-step-zero2", "train-step", "needle"]
    assert "only the sharding ran" in proc.stdout


def test_unknown_option_is_refused():
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--gpus", "8"], cwd=REPO, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "unknown option --gpus" in proc.stderr


def test_a_bench_refuses_a_data_set_without_a_manifest(tmp_path):
    proc = subprocess.run([sys.executable, "bench/quality.py", "--data", str(tmp_path),
                           "--check-args"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no manifest.json there" in proc.stderr
