"""tools/shard_histories.py in bounded memory (patchrec_dist/data/bucketed.py): the same bytes as the
in-memory path whatever the number of buckets and workers, refusals by --memory-limit, no staging
files left behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from patchrec_dist.data.manifest import MANIFEST_NAME
from patchrec_dist.data.synthetic import NeedleSpec, SyntheticSpec, generate_log, write_log, write_needle_log
from tests.test_sharding import _patchrec_folder
from tools.shard_histories import main as shard_main

TABLE_COLS = ["--user-col", "user", "--item-col", "item", "--time-col", "timestamp", "--rating-col", "rating"]


def _files(root: Path) -> dict[str, bytes]:
    """A data set's bytes, the run's generation id taken out of names and the manifest, and the
    fields that are the run's own (time of creation, seconds taken, worker count, output path)."""
    m = json.loads((root / MANIFEST_NAME).read_text())
    gen = m.pop("generation")
    m.pop("created")
    m.pop("root", None)
    m["source"]["filters"].pop("seconds_prepare")
    for k in ("workers", "output"):
        m["source"]["options"].pop(k)
    out = {"manifest": json.dumps(m, sort_keys=True).replace(gen, "G").encode()}
    for p in root.rglob("*"):
        if p.is_file() and p.name != MANIFEST_NAME:
            out[str(p.relative_to(root)).replace(gen, "G")] = p.read_bytes()
    return out


def _run(args: list[str], out: Path, *extra: str) -> dict[str, bytes]:
    assert shard_main([*args, "--output", str(out), "--no-progress", *extra]) == 0
    return _files(out)


def _mixed_id_log(tmp_path: Path) -> list[str]:
    """CSV with text user ids ('u12', '007' beside '7') and heavy time ties (days, not seconds)."""
    inter, items = generate_log(SyntheticSpec(users=150, items=90, mean_history=30, max_history=300, seed=11))
    inter = inter.with_columns(
        user=pl.when(pl.col("user") % 3 == 0).then(pl.format("u{}", pl.col("user")))
        .when(pl.col("user") == 7).then(pl.lit("007")).otherwise(pl.col("user").cast(pl.Utf8)),
        timestamp=pl.col("timestamp") // 86400 * 86400,
    )
    paths = write_log(inter, items, tmp_path / "raw", "csv")
    return ["--format", "table", "--input", paths["interactions"], "--items", paths["items"], *TABLE_COLS]


def _parquet_log(tmp_path: Path) -> list[str]:
    paths = write_log(*generate_log(SyntheticSpec(users=200, items=100, mean_history=30, max_history=400, seed=5)),
                      tmp_path / "raw", "parquet")
    return ["--format", "table", "--input", paths["interactions"], "--items", paths["items"], *TABLE_COLS]


CASES = {
    "parquet global-time, byte-sized shards": (_parquet_log, ["--shard-size", "24KB"]),
    "csv text ids, time ties, quantiles at 0.5/0.3": (_mixed_id_log, ["--split-fractions", "0.5,0.3,0.2",
                                                                       "--shard-size", "11"]),
    "filters: min-rating, k-core, dedupe first": (_parquet_log, ["--min-rating", "3", "--min-user-interactions", "6",
                                                                 "--min-item-interactions", "25", "--dedupe", "first",
                                                                 "--split", "leave-one-out", "--shard-size", "13"]),
    "table split column (needle)": (
        lambda tmp: ["--format", "table", "--input",
                     write_needle_log(NeedleSpec(users=60, min_history=10, max_history=40, distances=(3, 5),
                                                 fillers=50, seed=3), tmp / "needle")["interactions"],
                     "--items", str(tmp / "needle" / "items.parquet"), "--user-col", "user", "--item-col", "item",
                     "--split-col", "split"], ["--shard-size", "9"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_bytes_as_in_memory_for_any_buckets_and_workers(tmp_path, case):
    make, extra = CASES[case]
    args = make(tmp_path)
    want = _run(args, tmp_path / "ref", "--in-memory", "--workers", "1", *extra)
    assert sum(k.endswith(".tar") for k in want) > 1  # several shards: boundaries are compared too
    for buckets, workers in ((1, 1), (3, 1), (7, 2)):
        got = _run(args, tmp_path / f"b{buckets}", "--buckets", str(buckets), "--workers", str(workers), *extra)
        assert got.keys() == want.keys(), (buckets, workers)
        for name in want:
            assert got[name] == want[name], (case, buckets, workers, name)


def test_in_memory_reader_formats_go_through_buckets_too(tmp_path, small_log):
    folder = _patchrec_folder(tmp_path, small_log)
    args = ["--format", "patchrec", "--trust-pickle", "--input", str(folder), "--shard-size", "17"]
    want = _run(args, tmp_path / "ref", "--in-memory", "--workers", "1")
    assert _run(args, tmp_path / "b", "--buckets", "4", "--workers", "1") == want
    paths = write_log(*small_log, tmp_path / "ml", "movielens-1m")
    args = ["--format", "movielens", "--input", str(Path(paths["interactions"]).parent)]
    assert _run(args, tmp_path / "ml-b", "--buckets", "5", "--workers", "1") == \
        _run(args, tmp_path / "ml-ref", "--in-memory", "--workers", "1")


def test_buckets_over_the_memory_limit_are_split_and_the_output_is_unchanged(tmp_path):
    args = _parquet_log(tmp_path)  # 6,000 interactions
    want = _run(args, tmp_path / "ref", "--in-memory", "--workers", "1")
    # 600KB for 1 worker + the main process: 300KB each, under 2,000 rows a bucket at 160 bytes a row
    staging = tmp_path / "staging"
    staging.mkdir()
    got = _run(args, tmp_path / "small", "--buckets", "1", "--workers", "1", "--memory-limit", "600KB",
               "--staging", str(staging))
    assert got == want
    assert not any(staging.iterdir())


def _one_heavy_user_log(tmp_path: Path) -> list[str]:
    rng = np.random.default_rng(0)
    users = np.concatenate([np.full(30_000, 4242), rng.integers(1, 100, 3_000)])
    n = len(users)
    inter = pl.DataFrame({"user": users, "item": rng.integers(1, 50, n), "rating": np.full(n, 4),
                          "timestamp": np.arange(n) + 1_000_000})
    items = pl.DataFrame({"item": np.arange(1, 50), "title": [f"Film {i}" for i in range(1, 50)],
                          "genre": ["Drama"] * 49})
    paths = write_log(inter, items, tmp_path / "raw", "csv")
    return ["--format", "table", "--input", paths["interactions"], "--items", paths["items"], *TABLE_COLS]


def test_a_user_too_large_for_the_memory_limit_is_refused_by_name(tmp_path, capsys):
    args = _one_heavy_user_log(tmp_path)
    out, staging = tmp_path / "ds", tmp_path / "staging"
    staging.mkdir()
    rc = shard_main([*args, "--output", str(out), "--no-progress", "--workers", "1", "--memory-limit", "4MB",
                     "--staging", str(staging)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'4242'" in err and "30,000 interactions" in err and "--memory-limit" in err, err
    assert not (out / MANIFEST_NAME).exists() and not list(out.rglob("*.tar")) and not list(out.rglob("*.parquet"))
    assert not any(staging.iterdir())
    # the same log within a limit that holds that user is sharded
    assert shard_main([*args, "--output", str(out), "--no-progress", "--workers", "1", "--memory-limit", "64MB",
                       "--staging", str(staging)]) == 0
    assert not any(staging.iterdir())


def test_bad_rows_in_later_chunks_are_named_by_their_row_in_the_file(tmp_path, capsys):
    """Chunks are at least 10,000 rows: errors past the first chunk must name the file's row/line."""
    n = 25_000
    pad = "x" * 40  # long lines: several CSV blocks, not just several chunks
    lines = ["user,item,timestamp,note"] + [f"u{i % 97},{1 + i % 3},{1000 + i},{pad}" for i in range(n)]
    (tmp_path / "items.csv").write_text("item,title\n1,Heat\n2,Heathers\n3,Alien\n")
    base = ["--format", "table", "--input", str(tmp_path / "inter.csv"), "--items", str(tmp_path / "items.csv"),
            "--user-col", "user", "--item-col", "item", "--time-col", "timestamp", "--no-progress",
            "--workers", "1", "--memory-limit", "8MB", "--split", "leave-one-out"]
    staging = tmp_path / "staging"
    staging.mkdir()
    for row, line, expect in ((17_001, "u5,2,yesterday", ["row 17001", "'timestamp'", "yesterday"]),
                              (21_500, "u5,9,1", ["row 21500", "'9'", "--drop-unknown-items"])):
        bad = list(lines)
        bad[row] = line + "," + pad
        (tmp_path / "inter.csv").write_text("\n".join(bad) + "\n")
        assert shard_main([*base, "--output", str(tmp_path / "ds"), "--staging", str(staging)]) == 2
        err = capsys.readouterr().err
        assert all(e in err for e in expect), (expect, err)
    data = ("\n".join(lines) + "\n").encode()
    at = len("\n".join(lines[:23_000])) + 1  # start of line 23001
    (tmp_path / "inter.csv").write_bytes(data[:at] + b"\xff" + data[at:])
    assert shard_main([*base, "--output", str(tmp_path / "ds"), "--staging", str(staging)]) == 2
    err = capsys.readouterr().err
    assert "inter.csv: line 23001" in err, err
    assert not (tmp_path / "ds" / MANIFEST_NAME).exists() and not any(staging.iterdir())


def test_memory_and_bucket_flags_are_checked(tmp_path, capsys):
    args = _parquet_log(tmp_path)
    assert shard_main([*args, "--output", str(tmp_path / "ds"), "--memory-limit", "lots"]) == 2
    assert "--memory-limit" in capsys.readouterr().err
    assert shard_main([*args, "--output", str(tmp_path / "ds"), "--buckets", "-1"]) == 2
    assert "--buckets" in capsys.readouterr().err
    assert shard_main([*args, "--output", str(tmp_path / "ds"), "--staging", str(tmp_path / "absent")]) == 2
    assert "--staging" in capsys.readouterr().err


def test_split_column_gaps_are_refused_as_in_memory(tmp_path, capsys):
    def label(u: int, i: int) -> str:  # train targets at 2..4; u4's at 2, 3 and 5: not one run
        return "train" if (i in (2, 3, 5) if u == 4 else 2 <= i <= 4) else ""

    rows = ["user,item,timestamp,split"] + [f"u{u},{1 + i % 3},{100 * i},{label(u, i)}"
                                            for u in range(1, 6) for i in range(8)]
    (tmp_path / "inter.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "items.csv").write_text("item,title\n1,Heat\n2,Heathers\n3,Alien\n")
    args = ["--format", "table", "--input", str(tmp_path / "inter.csv"), "--items", str(tmp_path / "items.csv"),
            "--user-col", "user", "--item-col", "item", "--time-col", "timestamp", "--split-col", "split",
            "--no-progress", "--workers", "1"]
    errs = []
    for extra in (["--in-memory"], ["--buckets", "3"]):
        assert shard_main([*args, *extra, "--output", str(tmp_path / "ds")]) == 2
        errs.append(capsys.readouterr().err)
    assert errs[0] == errs[1] and "user 'u4'" in errs[0] and "not consecutive" in errs[0], errs
