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


def test_exclude_seen_closes_every_seen_title(trained_run, learnable_dataset, tmp_path):
    """Every learnable user has walked the whole 20-item catalog before its test target: with
    --exclude-seen no title is left to generate (without it, 5 come back), and metrics.json says so."""
    out = tmp_path / "seen"
    code, log = evaluate("--run", str(trained_run), "--data", learnable_dataset, "--output", str(out),
                         "--max-examples", "6", "--top-k", "5", "--beams", "8", "--exclude-seen")
    assert code == 0, log[-3000:]
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and all(p["top"] == [] for p in preds)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["exclude_seen"] is True and metrics["metrics"]["HR@20"] == 0.0


def test_exact_decoding_ranks_the_whole_catalog(trained_run, learnable_dataset, tmp_path):
    """--decoding exact on the 20-title catalog, against 20 beams (which cover every title there, so
    beam search is exhaustive): the same titles in the same order with the same scores. A memory
    cap the catalog does not fit in is refused with exit 2 and the size it would take."""
    beam, exact = tmp_path / "beam", tmp_path / "exact"
    common = ["--run", str(trained_run), "--data", learnable_dataset, "--max-examples", "8"]
    code, log = evaluate(*common, "--output", str(beam))
    assert code == 0, log[-3000:]
    code, log = evaluate(*common, "--output", str(exact), "--decoding", "exact")
    assert code == 0, log[-3000:]
    metrics = json.loads((exact / "metrics.json").read_text())
    assert metrics["decoding"] == "exact" and metrics["beams"] is None
    assert metrics["metrics"] == json.loads((beam / "metrics.json").read_text())["metrics"]
    for a, b in zip(*(map(json.loads, (d / "predictions.jsonl").read_text().splitlines()) for d in (exact, beam))):
        assert [t["title"] for t in a["top"]] == [t["title"] for t in b["top"]]
        assert [t["score"] for t in a["top"]] == pytest.approx([t["score"] for t in b["top"]], abs=1e-4)
    code, log = evaluate(*common, "--output", str(tmp_path / "cap"), "--decoding", "exact",
                         "--exact-memory-gb", "1e-6")
    assert code == 2 and "--decoding exact: scoring all 20 titles" in log and "the limit is" in log, log[-2000:]
    assert not (tmp_path / "cap" / "metrics.json").exists()


def test_paper_decoding_runs_the_released_diverse_groups(trained_run, learnable_dataset, tmp_path):
    out = tmp_path / "paper"
    common = ["--run", str(trained_run), "--data", learnable_dataset, "--max-examples", "8"]
    code, log = evaluate(*common, "--output", str(out), "--decoding", "paper", "--scoring", "patchrec-compat")
    assert code == 0, log[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["decoding"] == "paper" and metrics["diversity_penalty"] == 0.8 and metrics["beams"] == 20
    assert metrics["metrics"]["HR@20"] >= 0.75, metrics["metrics"]  # the trained model's target is still found
    for line in (out / "predictions.jsonl").read_text().splitlines():
        titles = [t["title"] for t in json.loads(line)["top"]]
        assert 1 < len(titles) <= 20 and len(set(titles)) == len(titles)
    code, log = evaluate(*common, "--output", str(tmp_path / "masked"), "--decoding", "paper", "--exclude-seen")
    assert code == 2 and "--decoding paper reproduces the released protocol" in log, log[-2000:]


def test_bad_flags_exit_2_with_a_message(learnable_dataset, tmp_path):
    code, out = evaluate("--data", learnable_dataset)
    assert code == 2 and "--run" in out
    code, out = evaluate("--run", str(tmp_path), "--data", learnable_dataset)
    assert code == 2 and "not a training run's folder" in out
    code, out = evaluate("--model", str(tmp_path), "--data", learnable_dataset, "--top-k", "30")
    assert code == 2 and "--beams" in out


def test_recommender_api_gives_the_evaluations_titles_and_scores(trained_run, learnable_dataset, tmp_path):
    """Recommender.from_run on the first test histories (given as item ids) returns what
    launchers/evaluate.py predicted for them: the same titles, in order, with the same scores."""
    from patchrec_dist import Recommender
    from patchrec_dist.data.catalog import load_catalog
    from patchrec_dist.data.manifest import load_manifest
    from patchrec_dist.data.stream import StreamConfig, StreamLoader, collate_examples

    out = tmp_path / "eval"
    code, log = evaluate("--run", str(trained_run), "--data", learnable_dataset, "--output", str(out),
                         "--max-examples", "12", "--top-k", "5", "--beams", "8")
    assert code == 0, log[-3000:]
    want = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]

    manifest = load_manifest(learnable_dataset)
    item_ids = load_catalog(manifest)["item_id"].cast(str).to_list()
    loader = StreamLoader(manifest, StreamConfig(split="test", batch_size=4, shuffle=False, max_history=100,
                                                 num_workers=0, max_examples=12), 0, 1, collate_fn=collate_examples)
    examples = sorted((ex for batch in loader for ex in batch if not ex.pad), key=lambda ex: ex.index)
    assert [ex.user for ex in examples] == [w["user"] for w in want]

    rec = Recommender.from_run(str(trained_run), device="cpu", beams=8)
    got = rec.recommend_batch([[item_ids[i] for i in ex.history] for ex in examples], k=5, batch_size=5)
    for g, w in zip(got, want):
        assert [r.title for r in g] == [t["title"] for t in w["top"]]
        assert [r.score for r in g] == pytest.approx([t["score"] for t in w["top"]], abs=1e-4)
        assert [r.items for r in g] == [[item_ids[i] for i in t["items"]] for t in w["top"]]
    with pytest.raises(ValueError, match="not in the catalog.*no-such-item"):
        rec.recommend([item_ids[0], "no-such-item"])
    history = [item_ids[i] for i in examples[0].history[-6:]]  # 6 of the 20 items seen (a whole history sees all)
    plain = rec.recommend(history, k=5)
    assert {i for r in plain for i in r.items} & set(history)  # the model does recommend seen items
    unseen = rec.recommend(history, k=5, exclude_seen=True)
    assert len(unseen) == 5 and not {i for r in unseen for i in r.items} & set(history)
    assert len(rec.recommend([item_ids[i] for i in examples[0].history], k=5, exclude_seen=True)) == 0


def test_recommend_every_user_on_two_ranks_then_resume(trained_run, learnable_dataset, tmp_path):
    """launchers/recommend.py on 2 ranks: K rows for every user with a history, the Recommender's
    own numbers for a user; started again without the manifest and one part, it rewrites only that
    part; other settings on the same output are refused."""
    import polars as pl

    from patchrec_dist import Recommender
    from patchrec_dist.data.catalog import load_catalog
    from patchrec_dist.data.manifest import load_manifest
    from patchrec_dist.data.stream import read_shard

    out = tmp_path / "recs"
    args = ["--run", str(trained_run), "--output", str(out), "--top-k", "3", "--beams", "4", "--batch-size", "16"]
    run = launch("launchers/recommend.py", args, nprocs=2, timeout=300)
    assert run.returncode == 0, run.tail()
    manifest = load_manifest(learnable_dataset)
    users = {r.user: r for s in range(len(manifest.shards)) for r in read_shard(manifest, s) if len(r.items)}
    summary = json.loads((out / "recommendations.json").read_text())
    assert summary["users"] == len(users) and summary["rows"] == 3 * len(users) and summary["ranks"] == 2
    assert len(summary["parts"]) == len(manifest.shards)
    table = pl.concat([pl.read_parquet(out / p["path"]) for p in summary["parts"]])
    assert set(table["user"].to_list()) == set(users) and table.height == 3 * len(users)

    user = sorted(users)[0]
    item_ids = load_catalog(manifest)["item_id"].cast(str).to_list()
    want = Recommender.from_run(str(trained_run), device="cpu", beams=4).recommend(
        [item_ids[i] for i in users[user].items], k=3)
    rows = table.filter(pl.col("user") == user).sort("rank")
    assert rows["title"].to_list() == [r.title for r in want]
    assert rows["score"].to_list() == pytest.approx([r.score for r in want], abs=1e-4)

    first = out / summary["parts"][0]["path"]
    kept = out / summary["parts"][-1]["path"]
    kept_mtime = kept.stat().st_mtime_ns
    first.unlink()
    (out / "recommendations.json").unlink()
    again = launch("launchers/recommend.py", args, nprocs=2, timeout=300)
    assert again.returncode == 0, again.tail()
    assert first.exists() and kept.stat().st_mtime_ns == kept_mtime
    assert json.loads((out / "recommendations.json").read_text())["users"] == len(users)

    other = subprocess.run([sys.executable, "launchers/recommend.py", *args[:4], "--top-k", "2", "--beams", "4"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "written with other settings" in other.stderr, other.stderr[-2000:]
