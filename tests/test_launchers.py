"""Bad input at every launcher, tried as a new user would: a missing data set, a missing or
malformed --init / --run / --model, an object store that does not answer, a resume the
checkpoint refuses. Each is one line naming the flag, exit status 2, no traceback, nothing
written, and no process group started; once, not once per rank, under `deepspeed --num_gpus 2`.
A plain `python launchers/finetune.py` runs a one-process job."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.distlaunch import deepspeed_launcher, free_port

pytestmark = pytest.mark.timeout(180)


def run(script: str, *args: str, env: dict | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    full = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, script, *args], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=timeout)


def assert_refused(proc: subprocess.CompletedProcess, flag: str, *words: str) -> str:
    """Exit 2 and one error line that names FLAG (and WORDS), with no traceback."""
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(errors) == 1 and flag in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and all(w in errors[0] for w in words), proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def not_a_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("not_a_model")
    (folder / "weights.bin").write_bytes(b"nothing here")
    return folder


@pytest.fixture(scope="module")
def one_process_run(learnable_dataset, tmp_path_factory) -> Path:
    """A 2-step run from a plain `python launchers/finetune.py` (no launcher: a world of one)."""
    out = tmp_path_factory.mktemp("plain") / "run"
    proc = run("launchers/finetune.py", "--data", learnable_dataset, "--model", "tiny", "--output", str(out),
               "--max-steps", "2", "--num-workers", "0", "--micro-batch", "4", timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_plain_python_runs_a_one_process_job(one_process_run):
    assert (one_process_run / "DONE.json").exists() and (one_process_run / "final" / "config.json").exists()
    assert "mpi4py" not in (one_process_run / "DONE.json").read_text()


@pytest.mark.parametrize("script", ["pretrain", "finetune", "evaluate", "baseline", "recommend", "submit"])
def test_a_missing_data_set_is_named(script, tmp_path, one_process_run):
    out = str(tmp_path / "out")
    args = {"pretrain": ["--output", out], "finetune": ["--output", out],
            "evaluate": ["--run", str(one_process_run), "--output", out], "baseline": ["--output", out],
            "recommend": ["--run", str(one_process_run), "--output", out],
            "submit": ["--cluster", "local", "--runs", out, "--dry-run"]}[script]
    proc = run(f"launchers/{script}.py", "--data", str(tmp_path / "nowhere"), *args)
    assert_refused(proc, "--data", "manifest.json")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, words", [
    ("--init", "{tmp}/nowhere", ["no such file or folder"]),
    ("--init", "{not_a_model}", ["final/config.json", "config.json"]),
    ("--model", "{tmp}/nowhere", ["no such file or folder"]),
    ("--model", "{not_a_model}", ["no config.json"]),
    ("--model", "{tmp}/model.gguf", ["no such .gguf file"]),
    ("--ds-config", "{tmp}/zero9.json", ["no such file"]),
])
def test_training_launchers_name_a_bad_model_or_init(flag, value, words, learnable_dataset, not_a_model, tmp_path):
    value = value.format(tmp=tmp_path, not_a_model=not_a_model)
    proc = run("launchers/finetune.py", "--data", learnable_dataset, flag, value, "--output", str(tmp_path / "out"))
    assert_refused(proc, flag, *words)
    assert not (tmp_path / "out").exists()


def test_pretrain_and_submit_name_a_bad_model(learnable_dataset, not_a_model, tmp_path):
    out = str(tmp_path / "out")
    assert_refused(run("launchers/pretrain.py", "--data", learnable_dataset, "--model", str(tmp_path / "nowhere"),
                       "--output", out), "--model", "no such file or folder")
    assert_refused(run("launchers/pretrain.py", "--data", learnable_dataset, "--init", str(not_a_model),
                       "--output", out), "--init", "config.json")
    assert_refused(run("launchers/submit.py", "--cluster", "local", "--data", learnable_dataset, "--runs", out,
                       "--model", str(not_a_model), "--dry-run"), "--model", "no config.json")
    assert not (tmp_path / "out").exists()


def test_evaluate_and_recommend_name_a_bad_run_or_model(learnable_dataset, not_a_model, one_process_run, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((one_process_run / "config.json").read_text())
    out = ["--output", str(tmp_path / "out")]
    for script in ("launchers/evaluate.py", "launchers/recommend.py"):
        data = ["--data", learnable_dataset]
        assert_refused(run(script, *data, "--run", str(tmp_path / "nowhere"), *out), "--run", "no such folder")
        assert_refused(run(script, *data, "--run", str(not_a_model), *out), "--run", "config.json")
        assert_refused(run(script, *data, "--run", str(unfinished), *out), "--run", "final/ export")
    assert_refused(run("launchers/evaluate.py", "--data", learnable_dataset, "--model", str(not_a_model), *out),
                   "--model", "no config.json")
    assert_refused(run("launchers/recommend.py", "--run", str(one_process_run), "--users", str(tmp_path / "u.txt"),
                       *out), "--users", "no such file")
    assert not (tmp_path / "out").exists()


def test_an_object_store_that_does_not_answer_is_named_within_60s(one_process_run, tmp_path):
    # a loopback port nobody listens on: connections are refused, as a wrong endpoint's would be
    env = {"PATCHREC_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "y"}
    url = "s3://no-such-bucket/ds"
    cases = [("launchers/pretrain.py", ["--data", url, "--model", "tiny", "--output", str(tmp_path / "o")], "--data"),
             ("launchers/finetune.py", ["--data", url, "--model", "tiny", "--output", str(tmp_path / "o")], "--data"),
             ("launchers/submit.py", ["--cluster", "local", "--data", url, "--runs", str(tmp_path / "o"), "--dry-run"],
              "--data"),
             ("launchers/evaluate.py", ["--data", url, "--run", str(one_process_run)], "--data"),
             ("launchers/baseline.py", ["--data", url, "--output", str(tmp_path / "o")], "--data"),
             ("launchers/recommend.py", ["--run", "s3://no-such-bucket/run", "--output", str(tmp_path / "o")], "--run")]
    for script, args, flag in cases:
        t0 = time.monotonic()
        proc = run(script, *args, env=env, timeout=120)
        assert time.monotonic() - t0 < 60, script
        assert_refused(proc, flag, "cannot read it")


def test_a_refused_resume_is_one_line_before_any_process_group(one_process_run, learnable_dataset):
    base = ["--data", learnable_dataset, "--model", "tiny", "--output", str(one_process_run), "--num-workers", "0",
            "--micro-batch", "4"]
    longer = assert_refused(run("launchers/finetune.py", *base, "--max-steps", "4"), "--resume",
                            "--max-steps 2 -> 4", "--schedule-change stretch")
    assert "refused" in longer
    assert_refused(run("launchers/finetune.py", *base, "--max-steps", "2", "--lr", "0.5"), "--resume", "lr")
    assert_refused(run("launchers/finetune.py", *base, "--max-steps", "2", "--resume", "/nowhere/step_9"),
                   "--resume", "no checkpoint")


def test_under_deepspeed_two_ranks_print_the_error_once_and_the_job_exits_2(tmp_path):
    cmd = [*deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(free_port()), "launchers/finetune.py",
           "--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert out.count("finetune: error: --data") == 1 and "Traceback" not in out, out[-3000:]
