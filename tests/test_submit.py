"""launchers/submit.py: the pipeline through submitit, as local processes and on the SLURM cluster."""

from __future__ import annotations

import json
import subprocess
import sys
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

