"""tools/shard_histories.py: round trips for every format, splits, filters, and every bad input."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest

from patchrec_dist.data.manifest import MANIFEST_NAME, DataSetError, examples_in_range, load_manifest
from patchrec_dist.data.stream import read_shard
from patchrec_dist.data.synthetic import write_log
from tests.conftest import PATCHREC_DATA, REPO
from tools.shard_histories import main as shard_main

TABLE_COLS = ["--user-col", "user", "--item-col", "item", "--time-col", "timestamp", "--rating-col", "rating"]


def shard(args: list[str]) -> int:
    return shard_main([*args, "--no-progress", "--workers", "1"])


def read_all(root: str) -> tuple[dict, dict[str, dict]]:
    """(manifest, user -> {items (original ids), times, splits}) of a data set."""
    m = load_manifest(root)
    catalog = pl.read_parquet(m.catalog_url)
    key_of = dict(zip(catalog["item"].to_list(), catalog["item_id"].to_list()))
    users = {}
    for i in range(len(m.shards)):
        for r in read_shard(m, i):
            users[r.user] = {"items": [key_of[int(x)] for x in r.items],
                             "times": None if r.times is None else r.times.tolist(), "splits": r.splits}
    return m, users


def expected_histories(inter: pl.DataFrame) -> dict[str, dict]:
    """Per-user histories in a stable time order (ties keep input order), as the sharder must give."""
    df = inter.with_row_index("row").sort(["user", "timestamp", "row"])
    out = {}
    for (user,), g in df.group_by(["user"], maintain_order=True):
        out[str(user)] = {"items": [str(x) for x in g["item"]], "times": g["timestamp"].to_list()}
    return out


def dedupe_exact(inter: pl.DataFrame) -> pl.DataFrame:
    return inter.unique(subset=["user", "item", "timestamp"], keep="first", maintain_order=True)


@pytest.mark.parametrize("fmt", ["recbole", "movielens-100k", "movielens-1m", "csv", "tsv", "parquet", "jsonl"])
def test_round_trip_every_format(tmp_path, small_log, fmt):
    inter, items = small_log
    paths = write_log(inter, items, tmp_path / "raw", fmt)
    out = str(tmp_path / "ds")
    if fmt == "recbole":
        args = ["--format", "recbole", "--input", str(tmp_path / "raw")]
    elif fmt.startswith("movielens"):
        args = ["--format", "movielens", "--input", str(tmp_path / "raw")]
    else:
        args = ["--format", "table", "--input", paths["interactions"], "--items", paths["items"], *TABLE_COLS]
    assert shard([*args, "--output", out, "--shard-size", "13", "--split", "leave-one-out"]) == 0

    m, users = read_all(out)
    want = expected_histories(dedupe_exact(inter))
    assert set(users) == set(want)
    for u, h in want.items():
        assert users[u]["items"] == h["items"], u
        assert users[u]["times"] == h["times"], u
    assert m.counts["users"] == len(want)
    assert m.counts["interactions"] == sum(len(h["items"]) for h in want.values())
    assert m.counts["items"] == items.height
    catalog = pl.read_parquet(m.catalog_url)
    assert dict(zip(catalog["item_id"], catalog["title"])) == {str(k): t.strip() for k, t in zip(items["item"], items["title"])}
    assert sum(s.samples for s in m.shards) == len(want)
    assert all(s.samples <= 13 for s in m.shards)
    # leave-one-out: last item test, second-to-last val
    n_test = sum(examples_in_range(len(h["items"]), len(h["items"]) - 1, len(h["items"]) - 1) for h in want.values())
    assert m.counts["examples"]["test"] == n_test > 0


def test_same_input_gives_identical_shards(tmp_path, small_log):
    paths = write_log(*small_log, tmp_path / "raw", "parquet")
    base = ["--format", "table", "--input", paths["interactions"], "--items", paths["items"], *TABLE_COLS]
    assert shard([*base, "--output", str(tmp_path / "a")]) == 0
    assert shard_main([*base, "--output", str(tmp_path / "b"), "--no-progress", "--workers", "2"]) == 0
    a, b = load_manifest(str(tmp_path / "a")), load_manifest(str(tmp_path / "b"))
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_global_time_split_follows_global_quantiles(tmp_path, small_log):
    inter, items = small_log
    paths = write_log(inter, items, tmp_path / "raw", "parquet")
    out = str(tmp_path / "ds")
    assert shard(["--format", "table", "--input", paths["interactions"], "--items", paths["items"], *TABLE_COLS,
                  "--output", out, "--split", "global-time", "--split-fractions", "0.8,0.1,0.1"]) == 0
    m, users = read_all(out)
    n = m.counts["interactions"]
    # every interaction is a target of exactly one split; each split's share is its fraction
    per_split = {"train": 0, "val": 0, "test": 0}
    cut_val = None
    for h in users.values():
        covered = []
        for split, rng in h["splits"].items():
            if rng:
                per_split[split] += rng[1] - rng[0] + 1
                covered += list(range(rng[0], rng[1] + 1))
        assert sorted(covered) == list(range(len(h["items"])))
        if h["splits"]["val"]:
            t = h["times"][h["splits"]["val"][0]]
            cut_val = t if cut_val is None else min(cut_val, t)
        if h["splits"]["train"]:
            assert h["splits"]["val"] is None or h["splits"]["train"][1] < h["splits"]["val"][0]
    assert per_split["train"] == int(np.floor(0.8 * n))
    assert per_split["val"] == int(np.floor(0.9 * n)) - int(np.floor(0.8 * n))
    # no train target is later than the earliest val target
    latest_train = max(h["times"][h["splits"]["train"][1]] for h in users.values() if h["splits"]["train"])
    assert latest_train <= cut_val


def test_filters_min_rating_kcore_dedupe(tmp_path, small_log):
    inter, items = small_log
    doubled = pl.concat([inter, inter.head(50)])  # 50 exact duplicate rows
    paths = write_log(doubled, items, tmp_path / "raw", "parquet")
    base = ["--format", "table", "--input", paths["interactions"], "--items", paths["items"], *TABLE_COLS]
    out = str(tmp_path / "dedup")
    assert shard([*base, "--output", out]) == 0
    assert load_manifest(out).counts["interactions"] == dedupe_exact(inter).height
    assert load_manifest(out).source["filters"]["dropped_duplicates"] >= 50

    out = str(tmp_path / "kcore")
    assert shard([*base, "--output", out, "--min-rating", "3", "--min-user-interactions", "5",
                  "--min-item-interactions", "5"]) == 0
    m, users = read_all(out)
    kept = dedupe_exact(inter).filter(pl.col("rating") >= 3)
    want = k_core_fixed_point(list(zip(kept["user"].cast(str), kept["item"].cast(str), kept["timestamp"])), 5, 5)
    assert 0 < len(want) < kept.height  # the filter removed something and kept something
    got = sorted((user, item, t) for user, h in users.items() for item, t in zip(h["items"], h["times"]))
    assert got == sorted(want)
    assert m.counts["items"] == len({item for _, item, _ in want}) and m.counts["interactions"] == len(want)


def k_core_fixed_point(rows: list[tuple], min_user: int, min_item: int) -> list[tuple]:
    """The k-core, one interaction at a time: drop every row whose user or item has too few rows,
    until nothing changes (an independent restatement of the sharder's columnar loop)."""
    from collections import Counter

    while True:
        users, items = Counter(r[0] for r in rows), Counter(r[1] for r in rows)
        kept = [r for r in rows if users[r[0]] >= min_user and items[r[1]] >= min_item]
        if len(kept) == len(rows):
            return kept
        rows = kept


def _patchrec_folder(tmp_path: Path, small_log) -> Path:
    inter, items = small_log
    folder = tmp_path / "patchrec"
    folder.mkdir()
    hist = expected_histories(dedupe_exact(inter))
    seqs = [[int(x) for x in h["items"]] for h in hist.values()]
    rows = []
    for s in seqs:
        n = len(s)
        rows.append({"seq": s, "len_seq": n, "train_idx": [0, max(0, n - 3)] if n >= 3 else [None, None],
                     "val_idx": [n - 2, n - 2] if n >= 2 else [None, None], "test_idx": [n - 1, n - 1]})
    pd.DataFrame(rows).to_pickle(folder / "seq.df")
    (folder / "id2title.txt").write_text("".join(f"{k}||{t}\n" for k, t in zip(items["item"], items["title"])))
    return folder


def test_patchrec_format_keeps_ranges(tmp_path, small_log):
    folder = _patchrec_folder(tmp_path, small_log)
    out = str(tmp_path / "ds")
    assert shard(["--format", "patchrec", "--trust-pickle", "--input", str(folder), "--output", out]) == 0
    m, users = read_all(out)
    frame = pd.read_pickle(folder / "seq.df")
    assert m.split["protocol"] == "keep" and not m.has_timestamps
    for i, row in frame.iterrows():
        u = users[str(i)]
        assert [int(x) for x in u["items"]] == list(row["seq"])
        for split in ("train", "val", "test"):
            want = row[f"{split}_idx"]
            assert u["splits"][split] == (None if want[0] is None else [int(want[0]), int(want[1])])


# ---------------------------------------------------------------------------------------------
# bad input: a message naming file/row/column (or flag), exit 2, and no manifest


def _csv_log(tmp_path: Path, inter_text: str, items_text: str = "item,title\n1,Heat\n2,Heathers\n3,Alien\n") -> list[str]:
    (tmp_path / "inter.csv").write_bytes(inter_text.encode() if isinstance(inter_text, str) else inter_text)
    (tmp_path / "items.csv").write_bytes(items_text.encode() if isinstance(items_text, str) else items_text)
    return ["--format", "table", "--input", str(tmp_path / "inter.csv"), "--items", str(tmp_path / "items.csv"),
            "--user-col", "user", "--item-col", "item", "--time-col", "timestamp"]


GOOD = "user,item,timestamp\nu1,1,100\nu1,2,200\nu1,3,300\nu1,1,400\nu1,2,500\n"

BAD_INPUTS = {
    "missing column": (GOOD.replace("timestamp", "ts"), None, ["inter.csv", "missing column", "timestamp"]),
    "unparseable timestamp": (GOOD.replace("300", "yesterday"), None, ["inter.csv", "row 3", "'timestamp'", "yesterday"]),
    "missing id": (GOOD.replace("u1,3", ",3"), None, ["inter.csv", "row 3", "'user'", "missing or empty id"]),
    "bad encoding": (GOOD.encode() + b"u1,2,600\n", b"item,title\n1,Heat\n2,Caf\xe9\n3,Alien\n",
                     ["items.csv", "line 3", "utf-8"]),
    "unknown item": (GOOD.replace("u1,3,300", "u1,9,300"), None, ["inter.csv", "row 3", "'9'", "--drop-unknown-items"]),
    "empty title": (GOOD, "item,title\n1,Heat\n2,\n3,Alien\n", ["items.csv", "row 2", "'title'", "empty title"]),
    "duplicate item id": (GOOD, "item,title\n1,Heat\n1,Heathers\n3,Alien\n", ["items.csv", "row 2", "more than once"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_file_row_column_and_writes_nothing(tmp_path, capsys, case):
    inter, items, expected = BAD_INPUTS[case]
    args = _csv_log(tmp_path, inter, items) if items else _csv_log(tmp_path, inter)
    out = tmp_path / "ds"
    assert shard([*args, "--output", str(out), "--split", "leave-one-out"]) == 2
    err = capsys.readouterr().err
    for part in expected:
        assert part in err, (part, err)
    assert not (out / MANIFEST_NAME).exists()
    assert not list(out.rglob("*.tar")) and not list(out.rglob("*.parquet"))


def test_drop_unknown_items_reports_count(tmp_path):
    args = _csv_log(tmp_path, GOOD.replace("u1,3,300", "u1,9,300"))
    out = str(tmp_path / "ds")
    assert shard([*args, "--output", out, "--drop-unknown-items", "--split", "leave-one-out"]) == 0
    m = load_manifest(out)
    assert m.source["filters"]["dropped_unknown_items"] == 1 and m.counts["interactions"] == 4


def test_refusals_for_flags_and_files(tmp_path, capsys, small_log):
    args = _csv_log(tmp_path, GOOD)
    out = tmp_path / "ds"
    assert shard([*args, "--output", str(out), "--min-rating", "3"]) == 2
    assert "--min-rating" in capsys.readouterr().err  # no rating column
    assert shard([*args, "--output", str(out), "--min-user-interactions", "10", "--split", "leave-one-out"]) == 2
    assert "no interactions left after filtering" in capsys.readouterr().err
    assert shard([*args, "--output", str(out), "--shard-size", "lots"]) == 2
    assert "--shard-size" in capsys.readouterr().err
    assert shard(["--format", "movielens", "--input", str(tmp_path / "nope"), "--output", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
    folder = _patchrec_folder(tmp_path, small_log)
    assert shard(["--format", "patchrec", "--input", str(folder), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "seq.df" in err and "pickle" in err and "--trust-pickle" in err
    assert not (out / MANIFEST_NAME).exists()


def test_existing_output_needs_overwrite_and_refused_run_keeps_it(tmp_path, capsys):
    args = _csv_log(tmp_path, GOOD)
    out = tmp_path / "ds"
    assert shard([*args, "--output", str(out), "--split", "leave-one-out"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert shard([*args, "--output", str(out), "--split", "leave-one-out"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # an --overwrite run that fails on bad input leaves the old data set as it was
    bad = _csv_log(tmp_path, GOOD.replace("300", "later"))
    assert shard([*bad, "--output", str(out), "--overwrite", "--split", "leave-one-out"]) == 2
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # a successful --overwrite replaces it and removes the old generation's files, and the shards and
    # temporary files of a run killed before it cleaned up; a user's files beside the data set and a
    # second data set in a subfolder stay
    old = load_manifest(str(out))
    (out / "NOTES.md").write_text("mine")
    (out / "shards" / "README").write_text("mine too")
    args = _csv_log(tmp_path, GOOD)  # the bad log above was written over the same files
    assert shard([*args, "--output", str(out / "sub"), "--split", "leave-one-out"]) == 0
    sub_before = {p: p.read_bytes() for p in (out / "sub").rglob("*") if p.is_file()}
    killed = [out / "shards" / "20260101T000000-abcdef-00003.tar", out / "manifest.json.tmp-4242",
              out / "catalog-20260101T000000-abcdef.parquet"]
    for path in killed:
        path.write_bytes(b"left by a killed run")
    assert shard([*args, "--output", str(out), "--overwrite", "--split", "global-time"]) == 0
    new = load_manifest(str(out))
    assert new.generation != old.generation
    assert not (out / old.shards[0].path).exists() and (out / new.shards[0].path).exists()
    assert not any(path.exists() for path in killed) and not (out / old.catalog["path"]).exists()
    assert (out / "NOTES.md").read_text() == "mine" and (out / "shards" / "README").read_text() == "mine too"
    assert {p: p.read_bytes() for p in (out / "sub").rglob("*") if p.is_file()} == sub_before
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "sub" not in p.parts) == \
        sorted(["NOTES.md", "shards/README", "manifest.json", new.catalog["path"], *(s.path for s in new.shards)])


def test_reader_refuses_missing_manifest_and_altered_shards(tmp_path, small_dataset):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small_dataset, copy)
    m = load_manifest(str(copy))
    with pytest.raises(DataSetError, match="no manifest.json"):
        load_manifest(str(tmp_path))
    shard_path = copy / m.shards[0].path
    data = shard_path.read_bytes()
    shard_path.write_bytes(data[:-1024])
    with pytest.raises(DataSetError, match="truncated"):
        read_shard(m, 0)
    shard_path.write_bytes(data[:600] + bytes([data[600] ^ 1]) + data[601:])
    with pytest.raises(DataSetError, match="sha256"):
        read_shard(m, 0)
    os.remove(shard_path)
    with pytest.raises(DataSetError, match="missing"):
        read_shard(m, 0)


def test_cli_exit_code_and_message_from_a_shell(tmp_path):
    proc = subprocess.run([sys.executable, "tools/shard_histories.py", "--format", "movielens", "--input",
                           str(tmp_path / "absent"), "--output", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "shard_histories: error:" in proc.stderr and "absent" in proc.stderr


def test_movielens_100k_from_the_recbole_wheel(tmp_path):
    from patchrec_dist.fetch import movielens_100k_recbole

    folder = movielens_100k_recbole()
    out = str(tmp_path / "ds")
    assert shard(["--format", "recbole", "--input", str(folder), "--output", out]) == 0
    m = load_manifest(out)
    assert (m.counts["users"], m.counts["items"], m.counts["interactions"]) == (943, 1682, 100000)
    assert m.has_timestamps and sum(m.counts["examples"].values()) > 90000


@pytest.mark.skipif(not PATCHREC_DATA.exists(), reason="../shared (the paper's processed data) is absent")
def test_paper_ml100k_counts_match_the_released_code(tmp_path):
    out = str(tmp_path / "ds")
    assert shard(["--format", "patchrec", "--trust-pickle", "--input", str(PATCHREC_DATA / "ml-100k"),
                  "--output", out]) == 0
    m = load_manifest(out)
    assert (m.counts["users"], m.counts["items"], m.counts["interactions"]) == (682, 1682, 51824)
    assert m.counts["examples"] == {"train": 47749, "val": 1005, "test": 1024}
    assert json.loads((Path(out) / MANIFEST_NAME).read_text())["split"]["protocol"] == "keep"
    assert m.prompt["system"] == "You are a helpful assistant in movie recommendations."
    with open(PATCHREC_DATA / "ml-100k" / "seq.df", "rb") as f:
        frame = pickle.load(f)
    _, users = read_all(out)
    assert [int(x) for x in users["0"]["items"]] == list(frame["seq"].iloc[0])
