"""launchers/evaluate.py end to end: a trained tiny model, 1 vs 2 ranks, subsets, outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from patchrec_dist.monitor.tensorboard import read_scalars
from tests.distlaunch import REPO, launch

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def trained_run(learnable_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    args = ["--data", learnable_dataset, "--output", str(out), "--max-steps", "500", "--micro-batch", "4",
            "--lr", "5e-3", "--grad-clip", "1.0", "--num-workers", "1", "--group-size", "2", "--log-every", "100"]
    run = launch("launchers/finetune.py", args, timeout=600)
    assert run.returncode == 0, run.tail()
    return out


def evaluate(*args: str, nprocs: int = 1):
    if nprocs == 1:
        proc = subprocess.run([sys.executable, "launchers/evaluate.py", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr
    run = launch("launchers/evaluate.py", list(args), nprocs=nprocs, timeout=300)
    return run.returncode, run.output


def test_trained_model_finds_the_next_item_and_ranks_agree(trained_run, learnable_dataset, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    code, out = evaluate("--run", str(trained_run), "--data", learnable_dataset, "--output", str(one))
    assert code == 0, out
    metrics = json.loads((one / "metrics.json").read_text())
    assert metrics["examples"] == 48 and metrics["layout"]["stage"] == "pft-s"
    assert metrics["layout"]["group_size"] == 2  # the run's own layout
    # 20 items: chance is HR@1 = 0.05. (The memorisation to HR@1 = 1.0 is in tests/test_generate.py.)
    assert metrics["metrics"]["HR@1"] >= 0.75 and metrics["metrics"]["HR@10"] == 1.0, metrics["metrics"]
    assert metrics["metrics"]["invalid_rate"] == 0.0
    assert "HR" in out and "NDCG" in out  # the summary table
    code, out = evaluate("--run", str(trained_run), "--data", learnable_dataset, "--output", str(two), nprocs=2)
    assert code == 0, out
    both = json.loads((two / "metrics.json").read_text())
    assert both["ranks"] == 2 and both["metrics"] == metrics["metrics"]
    assert (two / "predictions.jsonl").read_text() == (one / "predictions.jsonl").read_text()
    preds = [json.loads(line) for line in (one / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 48 and all(len(p["top"]) == 20 for p in preds)
    hits = sum(p["top"][0]["items"] == [p["target"]] for p in preds)
    assert hits == round(48 * metrics["metrics"]["HR@1"])


def test_subsets_compat_scoring_and_tensorboard(trained_run, learnable_dataset, tmp_path):
    out = tmp_path / "sub"
    code, log = evaluate("--run", str(trained_run), "--data", learnable_dataset, "--output", str(out),
                         "--max-examples", "10", "--scoring", "patchrec-compat", "--top-k", "5", "--beams", "5")
    assert code == 0, log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["examples"] == 10 and metrics["scoring"] == "patchrec-compat"
    assert all(len(json.loads(line)["top"]) == 5 for line in (out / "predictions.jsonl").read_text().splitlines())
    code, log = evaluate("--run", str(trained_run), "--data", learnable_dataset, "--split", "val")
    assert code == 0, log
    scalars = read_scalars(str(trained_run / "tb"))
    assert "eval/val/HR@20" in scalars and (trained_run / "eval-val" / "metrics.json").exists()


def test_bad_flags_exit_2_with_a_message(learnable_dataset, tmp_path):
    code, out = evaluate("--data", learnable_dataset)
    assert code == 2 and "--run" in out
    code, out = evaluate("--run", str(tmp_path), "--data", learnable_dataset)
    assert code == 2 and "not a model folder" in out
    code, out = evaluate("--model", str(tmp_path), "--data", learnable_dataset, "--top-k", "30")
    assert code == 2 and "--beams" in out
