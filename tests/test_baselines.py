"""Baselines: popularity on a hand-built log, SASRec on a learnable pattern, the LLM's subset and metrics."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from patchrec_dist.baselines.run import (
    BaselineConfig,
    counted_interactions,
    eval_examples,
    run_baseline,
    train_users,
)
from patchrec_dist.baselines.sasrec import SASRecConfig, UserSequence, fit_sasrec, training_windows
from patchrec_dist.data.manifest import load_manifest
from patchrec_dist.data.stream import StreamConfig, StreamLoader
from patchrec_dist.evaluate.metrics import KS
from patchrec_dist.evaluate.run import EvalConfig
from patchrec_dist.train.config import parse_config
from tests.conftest import REPO

TITLES = ["Alpha", "Bravo", "Charlie", "Delta", "Twin", "Twin", "Echo", "Foxtrot"]  # items 4 and 5 share a title
# leave-one-out: last item test, second-to-last val, the rest train (train targets: positions 3..n-3)
HISTORIES = {
    1: [0, 1, 0, 2, 0, 3, 4],  # counted: 0 1 0 2 0      test target 4 ("Twin")
    2: [1, 2, 1, 5, 0, 3],     # counted: 1 2 1 5        test target 3 ("Delta")
    3: [3, 3, 3, 4, 7],        # 5 items: no train target, nothing counted; test target 7 ("Foxtrot")
    4: [2, 2, 2, 2, 1, 2],     # counted: 2 2 2 2        test target 2 ("Charlie"), also in its history
}
# counts 2:6, 0:3, 1:3 (tie: smaller index first), 5:1, then 3, 4, 6, 7 with 0
EXPECTED_COUNTS = [3, 3, 6, 0, 0, 1, 0, 0]
EXPECTED_TITLES = ["Charlie", "Alpha", "Bravo", "Twin", "Delta", "Echo", "Foxtrot"]  # item 4 adds no title
EXPECTED_RANKS = {"1": 3, "2": 4, "3": 6, "4": 0}


def shard(tmp_path: Path, histories: dict[int, list[int]], titles: list[str]) -> str:
    from tools.shard_histories import main as shard_main

    rows = [(user, item, t * 60) for user, items in histories.items() for t, item in enumerate(items)]
    pl.DataFrame(rows, schema=["user", "item", "timestamp"], orient="row").write_parquet(tmp_path / "inter.parquet")
    pl.DataFrame({"item": range(len(titles)), "title": titles}).write_parquet(tmp_path / "items.parquet")
    out = str(tmp_path / "ds")
    rc = shard_main(["--format", "table", "--input", str(tmp_path / "inter.parquet"), "--items",
                     str(tmp_path / "items.parquet"), "--user-col", "user", "--item-col", "item", "--time-col",
                     "timestamp", "--output", out, "--shard-size", "2", "--workers", "1", "--no-progress",
                     "--split", "leave-one-out"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def hand_dataset(tmp_path_factory) -> str:
    return shard(tmp_path_factory.mktemp("hand"), HISTORIES, TITLES)


def read_predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.timeout(60)
def test_popularity_counts_ranking_and_metrics_by_hand(hand_dataset, tmp_path):
    counts = np.zeros(len(TITLES), dtype=int)
    for items in counted_interactions(train_users(load_manifest(hand_dataset)), max_history=100):
        np.add.at(counts, items, 1)
    assert counts.tolist() == EXPECTED_COUNTS

    result = run_baseline(BaselineConfig(data=hand_dataset, baseline="popularity", output=str(tmp_path)))
    preds = read_predictions(tmp_path)
    assert {p["user"] for p in preds} == set(EXPECTED_RANKS)
    for p in preds:
        assert [t["title"] for t in p["top"]] == EXPECTED_TITLES
        assert p["top"][3]["items"] == [4, 5]  # a title stands for every item that has it, as in the LLM's trie
        assert [t["title"] for t in p["top"]].index(TITLES[p["target"]]) == EXPECTED_RANKS[p["user"]]
    # ranks 3, 4, 6, 0 (user 4's target is in its history: nothing is excluded, as in the LLM evaluation)
    gain = {r: 1 / math.log2(r + 2) for r in EXPECTED_RANKS.values()}
    m = result["metrics"]
    assert (m["HR@1"], m["HR@5"], m["HR@10"], m["HR@20"]) == (0.25, 0.75, 1.0, 1.0)
    assert m["NDCG@1"] == 0.25
    assert m["NDCG@5"] == pytest.approx((gain[0] + gain[3] + gain[4]) / 4)
    assert m["NDCG@10"] == pytest.approx(sum(gain.values()) / 4)
    assert m["invalid_rate"] == 0.0 and m["examples"] == 4 and m["scoring"] == "strict"
    assert result["baseline"]["train_interactions"] == 13
    assert json.loads((tmp_path / "metrics.json").read_text()) == result


@pytest.mark.timeout(60)
def test_exclude_seen_ranks_only_items_outside_the_whole_history(hand_dataset, tmp_path):
    """The same popularity counts, each user's history (before its test target) masked: a title
    stays while one of its items is unseen ("Twin" for users 2 and 3); user 4's target, seen
    before, can no longer be hit."""
    result = run_baseline(BaselineConfig(data=hand_dataset, baseline="popularity", output=str(tmp_path),
                                         exclude_seen=True))
    got = {p["user"]: [t["title"] for t in p["top"]] for p in read_predictions(tmp_path)}
    assert got == {"1": ["Twin", "Echo", "Foxtrot"], "2": ["Delta", "Twin", "Echo", "Foxtrot"],
                   "3": ["Charlie", "Alpha", "Bravo", "Twin", "Echo", "Foxtrot"],
                   "4": ["Alpha", "Twin", "Delta", "Echo", "Foxtrot"]}
    m = result["metrics"]
    assert (m["HR@1"], m["HR@5"], m["HR@10"]) == (0.5, 0.5, 0.75)
    assert json.loads((tmp_path / "metrics.json").read_text())["exclude_seen"] is True


@pytest.mark.timeout(60)
def test_metrics_json_has_the_llm_evaluations_keys(hand_dataset, tmp_path):
    result = run_baseline(BaselineConfig(data=hand_dataset, baseline="popularity", output=str(tmp_path),
                                         split="val", scoring="patchrec-compat", top_k=3))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert {"metrics", "split", "examples", "scoring", "baseline"} <= set(saved)
    assert saved["split"] == "val" and saved["scoring"] == "patchrec-compat" and saved["examples"] == 4
    assert set(saved["metrics"]) == {*(f"{m}@{k}" for k in KS for m in ("HR", "NDCG")), "examples", "positions",
                                     "invalid_rate", "valid_examples_rate", "scoring"}
    assert {"name", "train_seconds", "params"} <= set(saved["baseline"]) and saved["baseline"]["name"] == "popularity"
    assert all(len(p["top"]) == 3 for p in read_predictions(tmp_path)) and result == saved


def llm_eval_examples(data: str, split: str, max_examples: int | None, world: int = 2) -> list:
    """What evaluate/run.py feeds its ranks (its own StreamConfig), pads dropped, ordered by index."""
    e = EvalConfig(data=data)
    cfg = StreamConfig(split=split, batch_size=e.batch_size, shuffle=False, remainder="pad",
                       max_history=e.max_history or None, num_workers=e.num_workers, max_examples=max_examples)
    examples = [ex for rank in range(world) for batch in StreamLoader(data, cfg, rank, world) for ex in batch
                if not ex.pad]
    return sorted(examples, key=lambda ex: ex.index)


@pytest.mark.timeout(60)
def test_max_examples_is_the_llm_evaluations_subset(small_dataset, tmp_path):
    manifest = load_manifest(small_dataset)
    for n in (7, None):
        ours = eval_examples(manifest, "test", n, max_history=100)
        theirs = llm_eval_examples(small_dataset, "test", n)
        assert [(e.user, e.position, e.target) for e in ours] == [(e.user, e.position, e.target) for e in theirs]
        assert all(np.array_equal(a.history, b.history) for a, b in zip(ours, theirs))
    assert len(ours) == manifest.num_examples("test")
    run_baseline(BaselineConfig(data=small_dataset, baseline="popularity", output=str(tmp_path), max_examples=7))
    preds = read_predictions(tmp_path)
    assert [(p["user"], p["target"]) for p in preds] == [(e.user, e.target) for e in ours[:7]]


def test_train_users_hold_every_train_example(small_dataset):
    manifest = load_manifest(small_dataset)
    users = train_users(manifest)
    assert sum(u.last_target - u.first_target + 1 for u in users) == manifest.num_examples("train")
    assert all(u.first_target >= 3 for u in users)


def test_sasrec_windows_train_each_target_once_on_its_own_prefix():
    items = np.arange(120)  # item = position, so a label names its target position
    user = UserSequence(items, first_target=5, last_target=117)
    seen = []
    for ids, labels in training_windows(user, window=50):
        assert len(ids) == len(labels) <= 50
        for j, label in enumerate(labels):
            if label >= 0:
                context = ids[: j + 1] - 1  # what the causal mask lets position j see
                assert np.array_equal(context, items[label - len(context) : label])  # a suffix of items[:t]
                seen.append(int(label))
    assert sorted(seen) == list(range(5, 118))


@pytest.mark.timeout(120)
def test_sasrec_learns_the_cyclic_pattern_deterministically(learnable_dataset, tmp_path):
    def run(out: Path, **over) -> dict:
        return run_baseline(BaselineConfig(data=learnable_dataset, baseline="sasrec", output=str(out),
                                           **{"epochs": 15, "hidden": 32, "batch_size": 8, "dropout": 0.1,
                                              "lr": 3e-3, "patience": 0, **over}))

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    # 20 items: chance is HR@1 = 0.05
    assert first["examples"] == 48 and first["metrics"]["HR@1"] >= 0.9, first["metrics"]
    assert first["baseline"]["params"]["max_len"] == 50 and first["baseline"]["parameters"] > 0
    assert first["baseline"]["epoch_losses"][-1] < first["baseline"]["epoch_losses"][0]
    assert first["baseline"]["epochs_run"] == 15 and "early_stopping" not in first["baseline"]
    assert (tmp_path / "a" / "predictions.jsonl").read_text() == (tmp_path / "b" / "predictions.jsonl").read_text()
    assert first["metrics"] == second["metrics"]

    # early stopping, validated on the val split: here its NDCG@10 reaches 1.0 within a few epochs and
    # stays there, so training ends `patience` epochs after the first epoch that reached it
    stopped = run(tmp_path / "c", patience=3)["baseline"]
    es = stopped["early_stopping"]
    assert es["split"] == "val" and es["metric"] == "NDCG@10" and es["patience"] == 3
    assert stopped["stopped"] == "early" and stopped["epochs_run"] == es["best_epoch"] + 3 < 15
    assert len(es["val_scores"]) == stopped["epochs_run"] and es["val_scores"][es["best_epoch"] - 1] == 1.0
    assert max(es["val_scores"][: es["best_epoch"] - 1]) < 1.0


def small_sasrec(**over) -> SASRecConfig:
    return SASRecConfig(**{"max_len": 10, "hidden": 8, "blocks": 1, "heads": 1, "dropout": 0.0, "epochs": 12,
                           "patience": 3, "batch_size": 4, "lr": 1e-2, **over})


CYCLE_USERS = [UserSequence(np.arange(s, s + 30) % 7, 3, 27) for s in range(4)]


def test_early_stopping_ends_after_patience_epochs_and_keeps_the_best_epochs_weights():
    # validation scores written in advance: best at epoch 2, then 3 epochs without a better one
    script = iter([0.1, 0.3, 0.2, 0.3, 0.25, 0.9, 0.9])
    states: list[dict] = []

    def validate(model) -> float:
        assert not model.training
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(script)

    model, report = fit_sasrec(CYCLE_USERS, 7, small_sasrec(), validate=validate, log=False)
    assert len(states) == len(report.epoch_losses) == 5  # 2 + patience 3 (a tie does not count as better)
    assert report.stopped == "early" and report.best_epoch == 2 and report.val_scores == [0.1, 0.3, 0.2, 0.3, 0.25]
    final = model.state_dict()
    assert all(torch.equal(final[k], states[1][k]) for k in final)
    assert not all(torch.equal(final[k], states[-1][k]) for k in final)  # training did move on after epoch 2


def test_without_patience_every_epoch_runs_and_nothing_is_validated():
    def validate(model) -> float:
        raise AssertionError("validated with --patience 0")

    _, report = fit_sasrec(CYCLE_USERS, 7, small_sasrec(patience=0, epochs=4), validate=validate, log=False)
    assert len(report.epoch_losses) == 4 and report.stopped == "cap" and report.best_epoch is None


def test_a_rising_validation_score_runs_to_the_cap_and_keeps_the_last_epoch():
    scores = iter(range(100))
    _, report = fit_sasrec(CYCLE_USERS, 7, small_sasrec(epochs=6), validate=lambda m: next(scores), log=False)
    assert report.stopped == "cap" and report.best_epoch == 6 and len(report.val_scores) == 6


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launchers/baseline.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.timeout(120)
def test_cli_runs_and_bad_flags_exit_2_naming_the_flag(hand_dataset, tmp_path):
    run = launch("--baseline", "popularity", "--data", hand_dataset, "--output", str(tmp_path / "ok"))
    assert run.returncode == 0, run.stderr
    assert "HR" in run.stdout and (tmp_path / "ok" / "metrics.json").exists()
    run = launch("--baseline", "knn", "--data", hand_dataset, "--output", str(tmp_path / "bad"))
    assert run.returncode == 2 and "--baseline" in run.stderr
    run = launch("--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "bad"))
    assert run.returncode == 2 and "manifest" in run.stderr and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("args, flag", [
    (["--epochs", "0"], "--epochs"), (["--epochs", "many"], "--epochs"), (["--max-examples", "0"], "--max-examples"),
    (["--hidden", "30", "--heads", "4"], "--hidden"), (["--split", "dev"], "--split"), ([], "--output"),
    (["--patience", "-1"], "--patience"), (["--stop-metric", "MRR@10"], "--stop-metric"),
(["--baseline", "sasrec", "--stop-metric", "HR@20", "--top-k", "10"], "--stop-metric"), (["--val-examples", "0"], "--val-examples"),
    (["--baseline", "sasrec", "--split", "val"], "--patience"),
])
def test_bad_flags_are_refused_by_the_launchers_parser(args, flag, capsys):
    # launchers/baseline.py is this parse_config call plus run_baseline (the CLI test above runs it)
    with pytest.raises(SystemExit) as exc:
        parse_config(["--data", "somewhere", *(["--output", "out"] if args else []), *args], cls=BaselineConfig)
    assert exc.value.code == 2 and flag in capsys.readouterr().err
