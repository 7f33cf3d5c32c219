"""Run folders on S3 (a moto server): fine-tuning from a run URL, evaluating a run URL."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from patchrec_dist.monitor.tensorboard import read_scalars
from tests.distlaunch import REPO, launch

pytestmark = [pytest.mark.s3, pytest.mark.multiproc]

TINY = ["--micro-batch", "4", "--num-workers", "1", "--group-size", "2", "--save-every", "0",
        "--dist-timeout-s", "60"]


def s3_launch_env(endpoint: str, staging: Path) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "PATCHREC_S3_ENDPOINT": endpoint, "PATCHREC_STAGING": str(staging)}


@pytest.fixture(scope="module")
def s3_run(moto_server, learnable_dataset, tmp_path_factory) -> dict:
    """A finished 4-step pre-training run with its final/ export, written to S3 only."""
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": moto_server},
                           skip_instance_cache=True)  # module scope: s3_env has not set the variables yet
    bucket = f"runs-{time.time_ns()}"
    fs.mkdir(bucket)
    url = f"s3://{bucket}/runs/pretrain"
    env = s3_launch_env(moto_server, tmp_path_factory.mktemp("pretrain-staging"))
    run = launch("launchers/pretrain.py", ["--data", learnable_dataset, "--model", "tiny", "--output", url,
                                           "--max-steps", "4", "--lr", "5e-3", "--export", "true", *TINY],
                 env=env)
    assert run.returncode == 0, run.tail()
    return {"url": url, "fs": fs, "key": url[len("s3://"):]}


def safetensors_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def ranked(predictions_jsonl: str) -> list:
    rows = map(json.loads, predictions_jsonl.splitlines())
    return [(p["user"], [t["items"] for t in p["top"]]) for p in rows]


@pytest.mark.timeout(240)
def test_finetune_init_from_a_run_on_s3(s3_run, learnable_dataset, s3_env, tmp_path):
    out, staging = tmp_path / "ft", tmp_path / "staging"
    # lr ~ 0: the fine-tuned export must equal the weights --init pointed at
    run = launch("launchers/finetune.py", ["--data", learnable_dataset, "--init", s3_run["url"],
                                           "--output", str(out), "--max-steps", "2", "--lr", "1e-12",
                                           "--export", "true", *TINY],
                 env=s3_launch_env(s3_env["endpoint"], staging))
    assert run.returncode == 0, run.tail()
    copies = sorted(p.name for p in (staging / "downloads").iterdir())
    assert len(copies) == 1 and ".tmp-" not in copies[0], copies  # one finished copy for the node's ranks
    s3_run["fs"].get(f"{s3_run['key']}/final", str(tmp_path / "init"), recursive=True)
    init, tuned = safetensors_weights(tmp_path / "init"), safetensors_weights(out / "final")
    assert init.keys() == tuned.keys()
    for name, w in init.items():
        torch.testing.assert_close(tuned[name], w, atol=1e-6, rtol=0, msg=name)


def test_missing_remote_init_names_the_url(s3_env):
    from patchrec_dist.model.load import run_export_dir

    url = f"s3://{s3_env['bucket']}/runs/never-ran"
    with pytest.raises(FileNotFoundError, match=url):
        run_export_dir(url)


@pytest.mark.timeout(300)
def test_evaluate_a_run_on_s3_as_its_local_copy(s3_run, learnable_dataset, s3_env, tmp_path):
    fs, key = s3_run["fs"], s3_run["key"]
    flags = ["--data", learnable_dataset, "--max-examples", "8", "--top-k", "4", "--beams", "4",
             "--batch-size", "4"]
    fs.get(key, str(tmp_path / "local"), recursive=True)  # before the evaluation below adds to the run
    run = launch("launchers/evaluate.py", ["--run", s3_run["url"], *flags], nprocs=2,
                 env=s3_launch_env(s3_env["endpoint"], tmp_path / "staging"), timeout=240)
    assert run.returncode == 0, run.tail()
    fs.invalidate_cache()
    remote = json.loads(fs.cat(f"{key}/eval-test/metrics.json"))
    assert remote["ranks"] == 2 and remote["examples"] == 8 and remote["model"] == f"{s3_run['url']}/final"
    fs.get(f"{key}/tb", str(tmp_path / "tb"), recursive=True)
    scalars = read_scalars(str(tmp_path / "tb"))
    assert scalars["eval/test/HR@1"] == [(4, remote["metrics"]["HR@1"])]  # at the run's last step
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]

    proc = subprocess.run([sys.executable, "launchers/evaluate.py", "--run", str(tmp_path / "local"), *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    local = tmp_path / "local" / "eval-test"
    assert json.loads((local / "metrics.json").read_text())["metrics"] == remote["metrics"]
    # the same lists; scores differ in the last bits (2 ranks batch the examples differently)
    remote_preds = fs.cat(f"{key}/eval-test/predictions.jsonl").decode()
    assert ranked(remote_preds) == ranked((local / "predictions.jsonl").read_text())
