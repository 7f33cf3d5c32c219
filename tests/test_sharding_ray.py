"""tools/shard_histories.py --engine ray on a real Ray cluster of two nodes started as users start them
(`ray start --head`, then `ray start --address`), against the moto S3 server: the same bytes as
--engine local, tasks on both nodes, a task that dies once is retried, a failed run leaves no manifest
and no staging files behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray  # noqa: F401  (the suite installs the [ray] extra: a missing one fails here, it is not skipped)

from patchrec_dist.data.manifest import MANIFEST_NAME
from patchrec_dist.data.synthetic import SyntheticSpec, generate_log, write_log
from tests.distlaunch import free_port
from tests.test_sharding_bounded import TABLE_COLS, _files
from tools.shard_histories import main as shard_main

pytestmark = [pytest.mark.s3, pytest.mark.multiproc]

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# 24,000 interactions: 3 input chunks of 10,000 rows (the smallest), so stage A runs several tasks
SPEC = SyntheticSpec(users=600, items=150, mean_history=40, max_history=300, seed=21)
EXTRA = ["--buckets", "4", "--shard-size", "64KB", "--split-fractions", "0.9,0.05,0.05", "--min-user-interactions",
         "3", "--memory-limit", "16MB", "--workers", "1", "--no-progress"]


def _clean_env() -> dict[str, str]:
    """The nodes' environment: no S3 endpoint or credentials (tasks must be handed theirs)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("AWS_", "PATCHREC_", "RAY_ADDRESS"))} | {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ray_cluster():
    """A head and a second node (one CPU each) on loopback addresses; both stopped at the end by their
    process groups (`ray start` daemonises its processes into the group of the command we started).
    Not 127.0.0.1: Ray replaces that address with the machine's routable one (its
    resolve_ip_for_localhost), and these tests talk to loopback only."""
    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    common = ["--num-cpus=1", "--disable-usage-stats", f"--temp-dir={tmp}"]
    starts = [[RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", "--node-ip-address=127.0.0.2",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}", *common],
              [RAY, "start", f"--address=127.0.0.2:{port}", "--node-ip-address=127.0.0.3",
               f"--dashboard-agent-listen-port={free_port()}", *common]]
    groups = []
    try:
        for cmd in starts:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=_clean_env(), start_new_session=True)
            groups.append(proc.pid)
            out, _ = proc.communicate(timeout=90)
            assert proc.returncode == 0, out
        yield f"127.0.0.2:{port}"
    finally:
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def log_on_s3(tmp_path_factory, moto_server):
    """The input log written locally and copied to its own bucket on the moto server."""
    import s3fs

    root = tmp_path_factory.mktemp("raylog")
    paths = write_log(*generate_log(SPEC), root / "raw", "parquet")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_server}, key="testing", secret="testing",
                           skip_instance_cache=True)
    bucket = f"input-{time.time_ns()}"
    fs.mkdir(bucket)
    urls = {}
    for k, p in paths.items():
        urls[k] = f"s3://{bucket}/raw/{Path(p).name}"
        fs.put_file(p, urls[k])
    return {"local": paths, "s3": urls, "root": root}


def _tool(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "shard_histories.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _driver_env(s3_env, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def _download(fs, url: str, dest: Path) -> Path:
    fs.invalidate_cache()
    fs.get(url.removeprefix("s3://").rstrip("/") + "/", str(dest), recursive=True)
    return dest


def _leftovers(fs, url: str) -> list[str]:
    fs.invalidate_cache()
    try:
        return sorted(fs.find(url.removeprefix("s3://")))
    except FileNotFoundError:
        return []


def test_ray_engine_writes_the_local_engines_bytes_and_retries_dead_tasks(ray_cluster, log_on_s3, s3_env, tmp_path):
    fs, bucket = s3_env["fs"], s3_env["bucket"]
    inp = log_on_s3["s3"]
    args = ["--format", "table", "--input", inp["interactions"], "--items", inp["items"], *TABLE_COLS, *EXTRA]
    # the reference: --engine local, same input (from S3), written locally
    assert shard_main([*args, "--output", str(tmp_path / "local")]) == 0
    want = _files(tmp_path / "local")
    assert sum(k.endswith(".tar") for k in want) > 2

    out = f"s3://{bucket}/ray"
    run = _tool([*args, "--engine", "ray", "--engine-address", ray_cluster, "--output", out], _driver_env(s3_env))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 node(s)" in run.stdout, run.stdout  # both nodes ran tasks
    got = _files(_download(fs, out, tmp_path / "ray"))
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], name
    assert not [p for p in _leftovers(fs, out) if "_staging-" in p]

    # every stage's first task dies (its worker process exits); Ray runs each again: same bytes
    out2 = f"s3://{bucket}/ray-retried"
    run = _tool([*args, "--engine", "ray", "--engine-address", ray_cluster, "--output", out2],
                _driver_env(s3_env, PATCHREC_TEST_FAIL_ONCE="partition,merge,clean,histogram,order,shard"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert _files(_download(fs, out2, tmp_path / "ray-retried")) == want
    assert not [p for p in _leftovers(fs, out2) if "_staging-" in p]


def test_failed_ray_runs_leave_no_manifest_and_no_staging(ray_cluster, log_on_s3, s3_env, tmp_path):
    fs, bucket = s3_env["fs"], s3_env["bucket"]
    inp = log_on_s3["s3"]
    args = ["--format", "table", "--input", inp["interactions"], "--items", inp["items"], *TABLE_COLS, *EXTRA,
            "--engine", "ray", "--engine-address", ray_cluster]

    # a task that dies on every attempt: exit 1 after Ray's retries, shards already written removed
    out = f"s3://{bucket}/dies"
    run = _tool([*args, "--output", out], _driver_env(s3_env, PATCHREC_TEST_FAIL_ALWAYS="shard"))
    assert run.returncode == 1, (run.stdout, run.stderr[-3000:])
    assert "--engine ray" in run.stderr and "_task_shard" in run.stderr and "no data set" in run.stderr, run.stderr
    assert _leftovers(fs, out) == []

    # bad input (an item missing from the items table, found in a task): exit 2, named as --engine local names it
    import polars as pl

    raw = log_on_s3["root"] / "bad.parquet"
    df = pl.read_parquet(log_on_s3["local"]["interactions"])
    df.with_columns(item=pl.when(pl.int_range(df.height) == 17_000).then(99_999).otherwise(pl.col("item"))) \
        .write_parquet(raw)
    bad = f"s3://{bucket}/in/bad.parquet"
    fs.put_file(str(raw), bad)
    out = f"s3://{bucket}/bad"
    bad_args = ["--format", "table", "--input", bad, "--items", inp["items"], *TABLE_COLS, *EXTRA]
    run = _tool([*bad_args, "--engine", "ray", "--engine-address", ray_cluster, "--output", out],
                _driver_env(s3_env))
    assert run.returncode == 2, (run.stdout, run.stderr[-3000:])
    assert "row 17001: item '99999' is not in the items table" in run.stderr, run.stderr
    assert _leftovers(fs, out) == []


def test_engine_flags_are_checked(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    base = ["--format", "table", "--input", "x.parquet", "--items", "i.parquet", "--output", str(tmp_path / "o")]
    assert shard_main([*base, "--engine", "ray"]) == 2
    assert "--engine-address" in capsys.readouterr().err
    assert shard_main([*base, "--engine", "ray", "--engine-address", "h:1", "--in-memory"]) == 2
    assert "--in-memory" in capsys.readouterr().err
    assert shard_main([*base, "--engine-address", "h:1"]) == 2
    assert "--engine ray" in capsys.readouterr().err
    assert not (tmp_path / "o" / MANIFEST_NAME).exists()
