"""Shared fixtures: small synthetic logs, data sets built from them, and a moto S3 server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distlaunch import free_port

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PATCHREC_DATA = SHARED / "data" / "patchrec"


@pytest.fixture(scope="session", autouse=True)
def no_leaked_shared_memory():
    """Launches killed on purpose never reach their cleanup: DeepSpeed's CPU all-reduce leaves a
    69 MB /dev/shm segment per rank behind. Remove the ones this session created."""
    import glob

    start = time.time()
    yield
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"):
        try:
            if os.path.getmtime(path) >= start - 1:
                os.unlink(path)
        except OSError:
            pass


@pytest.fixture(scope="session")
def small_log():
    from patchrec_dist.data.synthetic import SyntheticSpec, generate_log

    return generate_log(SyntheticSpec(users=120, items=80, mean_history=25, max_history=200, seed=7))


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory, small_log) -> str:
    """A local data set sharded from the small synthetic log (parquet table format)."""
    from patchrec_dist.data.synthetic import write_log
    from tools.shard_histories import main as shard_main

    root = tmp_path_factory.mktemp("small")
    paths = write_log(*small_log, root / "raw", "parquet")
    out = str(root / "ds")
    rc = shard_main([
        "--format", "table", "--input", paths["interactions"], "--items", paths["items"],
        "--user-col", "user", "--item-col", "item", "--time-col", "timestamp", "--rating-col", "rating",
        "--output", out, "--shard-size", "17", "--workers", "1", "--no-progress", "--split", "leave-one-out",
    ])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 API (moto's server) on 127.0.0.1; yields its endpoint URL."""
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server not found: install the test extra (pip install -e '.[test]')")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("moto_server did not start within 30 s")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture()
def s3_env(moto_server, monkeypatch):
    """Environment through which every process (and DataLoader worker) reaches the moto server."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("PATCHREC_S3_ENDPOINT", moto_server)
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_server}, skip_instance_cache=True)
    bucket = f"bucket-{time.time_ns()}"
    fs.mkdir(bucket)
    return {"endpoint": moto_server, "bucket": bucket, "fs": fs}


LEARNABLE_WORDS = ("Amber Birch Cedar Dune Ember Fjord Grove Harbor Iris Juniper Kestrel Lagoon Meadow Nectar "
                   "Onyx Prairie Quartz Ripple Sierra Tundra").split()


@pytest.fixture(scope="session")
def learnable_dataset(tmp_path_factory) -> str:
    """48 users whose histories walk the 20-item catalog in order: the next item is predictable."""
    import numpy as np
    import polars as pl

    from tools.shard_histories import main as shard_main

    root = tmp_path_factory.mktemp("learnable")
    rng = np.random.default_rng(0)
    users, length, items = 48, 24, len(LEARNABLE_WORDS)
    start = rng.integers(0, items, users)
    seq = (start[:, None] + np.arange(length)[None, :]) % items
    pl.DataFrame({"user": np.repeat(np.arange(users), length), "item": seq.reshape(-1),
                  "timestamp": np.tile(np.arange(length) * 3600, users)}).write_parquet(root / "inter.parquet")
    pl.DataFrame({"item": np.arange(items), "title": [f"{w} Story" for w in LEARNABLE_WORDS]}) \
        .write_parquet(root / "items.parquet")
    out = str(root / "ds")
    rc = shard_main(["--format", "table", "--input", str(root / "inter.parquet"), "--items",
                     str(root / "items.parquet"), "--user-col", "user", "--item-col", "item", "--time-col",
                     "timestamp", "--output", out, "--shard-size", "8", "--workers", "1", "--no-progress",
                     "--split", "leave-one-out"])
    assert rc == 0
    return out


def _sinfo_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The single-node SLURM cluster (never skip): slurm/local_cluster.sh starts it, or reconfigures
    one it started with other options (tests/test_multinode.py's 2 nodes); it leaves a cluster it did
    not start alone."""
    try:
        run = subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh")], capture_output=True, text=True,
                             timeout=600)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"slurm/local_cluster.sh did not finish in 600 s:\n{exc.stderr}")
    if run.returncode != 0 or not _sinfo_answers():
        pytest.fail(f"slurm/local_cluster.sh failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
