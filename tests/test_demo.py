"""`make demo`'s job end to end at smoke size: MovieLens-100K from the recbole wheel, a tiny HF
model folder in place of SmolLM2 (same code path: `--model FOLDER`), PPT -> PFT-S on 2 DeepSpeed
CPU ranks, evaluation of the base and the fine-tuned model on the same users, the baselines, the
report; then a rerun that skips what is finished."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from patchrec_dist.monitor.tensorboard import read_scalars
from tests.distlaunch import REPO

pytestmark = pytest.mark.multiproc


def run_demo(*args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "patchrec_dist.demo", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory) -> str:
    from patchrec_dist.model.tiny import save_tiny_model

    folder = tmp_path_factory.mktemp("tiny-model") / "model"
    titles = [f"Movie number {i} ({1950 + i % 50})" for i in range(400)]
    return save_tiny_model(str(folder), titles, vocab_size=512)


def test_demo_runs_the_whole_pipeline_and_resumes(tiny_model_folder, tmp_path):
    out = tmp_path / "demo"
    args = ["--output", str(out), "--model", tiny_model_folder, "--pretrain-steps", "3", "--finetune-steps", "4",
            "--eval-examples", "16", "--baselines", "popularity,sasrec", "--sasrec-epochs", "1"]
    proc = run_demo(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    assert list(report["metrics"]) == ["untrained LLM (pft-s)", "PatchRec: PPT + PFT-S", "popularity", "sasrec"]
    assert report["examples"] == 16
    for name, m in report["metrics"].items():
        assert 0.0 <= m["HR@1"] <= m["HR@5"] <= m["HR@10"] <= m["HR@20"] <= 1.0, (name, m)
    pos = report["positions"]
    assert pos["layout"]["stage"] == "pft-s" and pos["layout"]["group_size"] == 5
    assert 0 < pos["history_positions_fed_per_example"] < pos["history_positions_all_text_per_example"]
    # the printed report: the table rows, the positions line, the tensorboard command
    for text in ("PatchRec: PPT + PFT-S", "popularity", "history positions fed per example",
                 f"tensorboard --logdir {out / 'runs'}"):
        assert text in proc.stdout, text

    # fine-tuning started from pre-training; both wrote their curves; same users everywhere
    ft_config = json.loads((out / "runs" / "finetune" / "config.json").read_text())
    assert ft_config["init"] == str(out / "runs" / "pretrain") and ft_config["layout"]["stage"] == "pft-s"
    assert len(read_scalars(str(out / "runs" / "pretrain" / "tb"))["train/loss"]) == 3
    assert len(read_scalars(str(out / "runs" / "finetune" / "tb"))["train/loss"]) == 4
    users = [[json.loads(line)["user"] for line in (folder / "predictions.jsonl").read_text().splitlines()]
             for folder in (out / "runs" / "eval-untrained", out / "runs" / "finetune" / "eval-test",
                            out / "runs" / "baseline-popularity")]
    assert len(set(users[0])) == 16 and users[0] == users[1] == users[2]  # leave-one-out: 16 users

    # a second run skips what is finished and reports the same numbers
    t0 = time.perf_counter()
    again = run_demo(*args, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "pretrain: finished earlier" in again.stdout and "finetune: finished earlier" in again.stdout
    assert json.loads((out / "report.json").read_text())["metrics"] == report["metrics"]
    assert time.perf_counter() - t0 < 60


def test_demo_refuses_bad_flags_naming_them(tmp_path):
    proc = run_demo("--output", str(tmp_path / "x"), "--beams", "5", timeout=60)
    assert proc.returncode == 2 and "--beams" in proc.stderr
    proc = run_demo("--output", str(tmp_path / "x"), "--baselines", "popularity,bpr", timeout=60)
    assert proc.returncode == 2 and "--baselines" in proc.stderr and "bpr" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_interrupted_demo_saves_and_the_next_run_resumes(tiny_model_folder, tmp_path):
    """Ctrl-C (SIGINT) during fine-tuning: the ranks save; `make demo` again continues from there."""
    out = tmp_path / "demo"
    args = [sys.executable, "-m", "patchrec_dist.demo", "--output", str(out), "--model", tiny_model_folder,
            "--pretrain-steps", "0", "--finetune-steps", "60", "--eval-examples", "8", "--baselines", "",
            "--eval-untrained", "false"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.strip().startswith("step 5/60"):
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 130, "".join(lines) + rest
    assert "stop requested" in rest and "run it again to continue" in rest
    assert (out / "runs" / "finetune" / "checkpoints" / "latest").exists()
    assert not (out / "runs" / "finetune" / "DONE.json").exists()

    again = run_demo(*args[3:], timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed at step" in again.stdout
    assert json.loads((out / "runs" / "finetune" / "DONE.json").read_text())["step"] == 60


def test_quality_bench_writes_json_and_plot(tiny_model_folder, tmp_path):
    results = tmp_path / "results"
    cmd = [sys.executable, "bench/quality.py", "--model", tiny_model_folder, "--layouts", "text(20),pft-s(5)",
           "--baselines", "popularity", "--steps", "2", "--eval-examples", "8", "--work", str(tmp_path / "work"),
           "--results", str(results)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    q = json.loads((results / "quality-ml-100k.json").read_text())
    assert list(q["rows"]) == ["text(20)", "pft-s(5)", "popularity"] and q["examples"] == 8
    text, pfts = q["rows"]["text(20)"], q["rows"]["pft-s(5)"]
    assert 0 < pfts["positions_fed_per_example"] < text["positions_fed_per_example"]
    assert q["rows"]["popularity"]["positions_fed_per_example"] is None
    # every row scored both ways, from runs with and without --exclude-seen (summarize checks which is which)
    assert set(q["history"]) == {"metrics", "metrics_seen_masked"} and "not masked" in q["history"]["metrics"]
    assert all(set(r["metrics"]) == set(r["metrics_seen_masked"]) for r in q["rows"].values())
    assert (tmp_path / "work" / "ml-100k" / "runs" / "baseline-popularity-seen-masked" / "metrics.json").exists()
    assert "history masked (--exclude-seen" in proc.stdout
    assert (results / "quality-ml-100k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([*cmd[:2], "--layouts", "text(7)"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--layouts" in bad.stderr


def test_needle_bench_writes_hr_per_distance_and_plot(tmp_path):
    results = tmp_path / "results"
    cmd = [sys.executable, "bench/needle.py", "--users", "200", "--min-history", "20", "--max-history", "40",
           "--distances", "3,30", "--steps", "3", "--layouts", "text(20),pft-s(5)", "--test-users", "0.1",
           "--pretrain-steps", "2", "--work", str(tmp_path / "work"), "--results", str(results)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    n = json.loads((results / "needle.json").read_text())
    assert list(n["results"]) == ["text(20)", "pft-s(5)"] and n["chance"]["HR@1"] == 0.125 and n["complete"]
    for per_k in n["results"].values():
        assert set(per_k) == {"3", "30"}
        assert sum(v["examples"] for v in per_k.values()) == 20  # every test user, once
        assert all(set(v) == {"HR@1", "HR@10", "examples", "positions_fed", "needle_in"} for v in per_k.values())
        assert all(sum(v["needle_in"].values()) == v["examples"] for v in per_k.values())
    # where each layout put the needle: text(20) feeds k = 3 as text and drops k = 30; PFT-S(5)
    # feeds k = 3 as text (its last 5 items) and k = 30 inside a session patch
    assert n["results"]["text(20)"]["3"]["needle_in"] == {"text": n["results"]["text(20)"]["3"]["examples"]}
    assert list(n["results"]["text(20)"]["30"]["needle_in"]) == ["dropped"]
    assert list(n["results"]["pft-s(5)"]["3"]["needle_in"]) == ["text"]
    assert all(w.startswith("session/") for w in n["results"]["pft-s(5)"]["30"]["needle_in"])
    assert n["overall"]["pft-s(5)"]["positions_fed_per_example"] < n["overall"]["text(20)"]["positions_fed_per_example"]
    assert (results / "needle.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "HR@1 by needle distance k" in proc.stdout
    assert n["pretrain_steps"] == 2  # every layout fine-tunes from the one PPT run
    pretrain, = (tmp_path / "work").glob("task-*/runs/pretrain")
    assert json.loads((pretrain / "DONE.json").read_text())["step"] == 2
    for run in ("ft-text20", "ft-pft-s5"):
        config = json.loads((pretrain.parent / run / "config.json").read_text())
        assert config["init"] == str(pretrain)
    bad = subprocess.run([*cmd[:2], "--distances", "3,500", "--max-history", "100"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "largest distance" in bad.stderr
    bad = subprocess.run([*cmd[:2], "--pretrain-steps", "-1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--pretrain-steps must be >= 0" in bad.stderr


def test_exact_bench_compares_three_decodings(tmp_path):
    results = tmp_path / "results"
    cmd = [sys.executable, "bench/exact.py", "--models", "tiny", "--examples", "3", "--tiny-steps", "2",
           "--work", str(tmp_path / "work"), "--results", str(results)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads((results / "exact.json").read_text())["rows"]["tiny"]
    assert row["examples"] == 3 and set(row["agreement"]) == set(row["agreement_paper"])
    assert all(0 <= v <= 1 for v in row["agreement"].values())
    assert all(row[d]["s_per_example"] > 0 and "HR@20" in row[d]["metrics"] for d in ("beam", "paper", "exact"))
    for decoding in ("beam", "paper", "exact"):
        m = json.loads((tmp_path / "work" / "runs" / "ft-tiny" / f"eval-{decoding}" / "metrics.json").read_text())
        assert m["decoding"] == decoding and m["examples"] == 3
