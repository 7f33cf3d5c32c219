"""Data sets on S3 (a moto server on 127.0.0.1): sharding to it, streaming from it, clear failures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from patchrec_dist.data.manifest import DataSetError, load_manifest
from patchrec_dist.data.stream import StreamConfig, StreamLoader
from patchrec_dist.data.synthetic import write_log
from tools.shard_histories import main as shard_main

pytestmark = pytest.mark.s3

COLS = ["--user-col", "user", "--item-col", "item", "--time-col", "timestamp", "--rating-col", "rating"]


def _table_args(tmp_path, small_log) -> list[str]:
    paths = write_log(*small_log, tmp_path / "raw", "parquet")
    return ["--format", "table", "--input", paths["interactions"], "--items", paths["items"], *COLS,
            "--shard-size", "17", "--no-progress", "--split", "leave-one-out"]


def test_shard_to_s3_and_stream_with_worker_processes(tmp_path, small_log, small_dataset, s3_env):
    url = f"s3://{s3_env['bucket']}/ds"
    assert shard_main([*_table_args(tmp_path, small_log), "--output", url, "--workers", "2"]) == 0
    remote, local = load_manifest(url), load_manifest(small_dataset)
    assert [s.sha256 for s in remote.shards] == [s.sha256 for s in local.shards]
    assert s3_env["fs"].exists(f"{s3_env['bucket']}/ds/manifest.json")

    cfg = StreamConfig(split="train", batch_size=4, num_workers=2, remainder="pad")
    from_s3 = [[(e.user, e.position) for e in b] for b in StreamLoader(url, cfg, rank=0, world=1)]
    from_disk = [[(e.user, e.position) for e in b] for b in StreamLoader(small_dataset, cfg, rank=0, world=1)]
    assert from_s3 == from_disk and len(from_s3) > 0


def test_storage_options_flag_reaches_the_endpoint(tmp_path, small_log, s3_env, monkeypatch):
    monkeypatch.delenv("PATCHREC_S3_ENDPOINT")
    url = f"s3://{s3_env['bucket']}/flagged"
    opts = json.dumps({"client_kwargs": {"endpoint_url": s3_env["endpoint"]}})
    assert shard_main([*_table_args(tmp_path, small_log), "--output", url, "--workers", "1",
                       "--storage-options", opts]) == 0
    assert s3_env["fs"].exists(f"{s3_env['bucket']}/flagged/manifest.json")


def test_missing_bucket_and_unreachable_endpoint_fail_clearly(tmp_path, small_log, s3_env, monkeypatch, capsys):
    args = _table_args(tmp_path, small_log)
    assert shard_main([*args, "--output", "s3://no-such-bucket-here/ds", "--workers", "1"]) == 2
    assert "cannot write to s3://no-such-bucket-here/ds" in capsys.readouterr().err

    from tests.distlaunch import free_port

    monkeypatch.setenv("PATCHREC_S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody listens there
    t0 = time.time()
    assert shard_main([*args, "--output", f"s3://{s3_env['bucket']}/x", "--workers", "1"]) == 2
    assert f"cannot write to s3://{s3_env['bucket']}/x" in capsys.readouterr().err
    assert time.time() - t0 < 60


def test_s3_folder_without_manifest_is_not_a_data_set(s3_env):
    s3_env["fs"].pipe(f"{s3_env['bucket']}/half/shards/x.tar", b"partial")
    with pytest.raises(DataSetError, match="no manifest.json"):
        load_manifest(f"s3://{s3_env['bucket']}/half")


def test_cached_copy_is_atomic_reused_and_follows_changes(s3_env, tmp_path, monkeypatch):
    from patchrec_dist.data import storage

    monkeypatch.setenv("PATCHREC_STAGING", str(tmp_path))
    fs, url = s3_env["fs"], f"s3://{s3_env['bucket']}/model"
    fs.pipe(f"{url}/config.json", b"{}")
    fs.pipe(f"{url}/sub/weights.bin", b"x" * 1000)
    real = storage.download_files

    def dies_after_one_file(src, rels, local_dir, *args):
        real(src, sorted(rels)[:1], local_dir, *args)
        raise OSError("connection lost")

    monkeypatch.setattr(storage, "download_files", dies_after_one_file)
    with pytest.raises(OSError, match="connection lost"):
        storage.cached_copy(url)
    assert not (tmp_path / "downloads").exists() or not any((tmp_path / "downloads").iterdir())
    monkeypatch.setattr(storage, "download_files", real)
    first = storage.cached_copy(url)
    assert (Path(first) / "sub" / "weights.bin").read_bytes() == b"x" * 1000

    monkeypatch.setattr(storage, "download_files", lambda *a: pytest.fail("downloaded again"))
    assert storage.cached_copy(url) == first  # unchanged remote files: the same copy, no download
    monkeypatch.setattr(storage, "download_files", real)
    fs.pipe(f"{url}/sub/weights.bin", b"y" * 1000)  # same size, new content (a run exported again)
    second = storage.cached_copy(url)
    assert second != first and (Path(second) / "sub" / "weights.bin").read_bytes() == b"y" * 1000
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == sorted(Path(c).name for c in (first, second))
