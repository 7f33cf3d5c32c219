"""Scoring of ranked title generations: hand-computed ranks, HR/NDCG, strict vs compat, merging."""

from __future__ import annotations

import json
import math
import random

import pytest

from patchrec_dist.evaluate.metrics import (
    KS,
    Prediction,
    TitleIndex,
    finalize,
    format_table,
    merge_metric_sums,
    rank_patchrec_compat,
    rank_strict,
    score,
    score_sums,
)

# item:       0        1           2          3         4          5         6
CATALOG = ["Heat", "Heathers", "Heat 2", "Alien", "Aliens", "Heat", "Fargo"]
# "Heat" is shared by items 0 and 5.


def filler(n: int, avoid: str = "Heat") -> list[str]:
    """n valid catalog titles, none of which is (or starts with) `avoid`."""
    pool = [t for t in CATALOG if not t.startswith(avoid)]
    return [pool[i % len(pool)] for i in range(n)]


def with_hit(rank: int, title: str, n: int = 20) -> list[str]:
    titles = filler(n, avoid=title)
    titles[rank] = title
    return titles


# --- TitleIndex -------------------------------------------------------------------------------

def test_title_index_groups_duplicates_and_validity():
    idx = TitleIndex(CATALOG)
    assert idx.items_for("Heat") == frozenset({0, 5})
    assert idx.items_for("Heathers") == frozenset({1})
    assert idx.items_for("Nope") == frozenset()
    assert idx.items_for("") == frozenset()
    assert idx.is_valid("Heat") and idx.is_valid("Fargo")
    assert not idx.is_valid("") and not idx.is_valid("Hea") and not idx.is_valid("Heat ")
    assert idx.duplicated() == {"Heat": frozenset({0, 5})}
    # an empty catalog title never makes "" valid
    assert not TitleIndex(["", "A"]).is_valid("")


# --- strict ranks and metric values -----------------------------------------------------------

@pytest.mark.parametrize("rank", [0, 3, 7, 15])
def test_strict_hit_rank_hr_ndcg_exact(rank):
    pred = Prediction("u", 3, with_hit(rank, "Alien"))  # target item 3, "Alien"
    assert rank_strict(pred, TitleIndex(CATALOG)) == rank
    m = score([pred], CATALOG)
    for k in KS:
        assert m[f"HR@{k}"] == (1.0 if rank < k else 0.0)
        assert m[f"NDCG@{k}"] == (1 / math.log2(rank + 2) if rank < k else 0.0)
    expected_at_20 = {0: 1.0, 3: 1 / math.log2(5), 7: 1 / math.log2(9), 15: 1 / math.log2(17)}[rank]
    assert m["NDCG@20"] == expected_at_20


def test_strict_miss_and_mean_over_examples():
    idx = TitleIndex(CATALOG)
    miss = Prediction("m", 6, filler(20, avoid="Fargo"))
    assert rank_strict(miss, idx) is None
    preds = [Prediction(f"u{r}", 6, with_hit(r, "Fargo")) for r in (0, 3, 7, 15)] + [miss]
    assert [rank_strict(p, idx) for p in preds] == [0, 3, 7, 15, None]
    m = score(preds, CATALOG)
    assert m["examples"] == 5
    assert [m[f"HR@{k}"] for k in KS] == [1 / 5, 2 / 5, 3 / 5, 4 / 5]
    assert m["NDCG@1"] == 1 / 5
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(5)) / 5, rel=1e-15)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(9)) / 5, rel=1e-15)
    assert m["NDCG@20"] == pytest.approx(
        (1 + 1 / math.log2(5) + 1 / math.log2(9) + 1 / math.log2(17)) / 5, rel=1e-15)


def test_strict_first_match_counts():
    pred = Prediction("u", 3, ["Fargo", "Alien", "Aliens", "Alien"])
    assert rank_strict(pred, TitleIndex(CATALOG)) == 1
    assert rank_patchrec_compat(pred, CATALOG) == 3  # "Alien" prefixes "Aliens" and the last hit wins


def test_duplicate_titles_strict():
    idx = TitleIndex(CATALOG)
    # target item 5 is titled "Heat" like item 0: generating "Heat" is a hit for either
    assert rank_strict(Prediction("u", 5, ["Fargo", "Heat"]), idx) == 1
    assert rank_strict(Prediction("u", 0, ["Fargo", "Heat"]), idx) == 1
    # "Heathers" / "Heat 2" map to item sets without item 5: misses
    assert rank_strict(Prediction("u", 5, ["Heathers", "Heat 2", "Fargo"]), idx) is None
    m = score([Prediction("u", 5, ["Heat 2", "Heat"])], CATALOG)
    assert m["HR@1"] == 0.0 and m["HR@5"] == 1.0 and m["NDCG@5"] == 1 / math.log2(3)


# --- strict vs released (compat) rule ---------------------------------------------------------

def test_strict_vs_compat_constructed():
    idx = TitleIndex(CATALOG)
    heathers_heat = Prediction("a", 0, ["Heathers", "Heat"])
    assert rank_strict(heathers_heat, idx) == 1
    assert rank_patchrec_compat(heathers_heat, CATALOG) == 1  # both prefix-hit, last wins

    heat_heat2 = Prediction("b", 0, ["Heat", "Heat 2"])
    assert rank_strict(heat_heat2, idx) == 0
    assert rank_patchrec_compat(heat_heat2, CATALOG) == 1

    only_heathers = Prediction("c", 0, ["Fargo", "Heathers", "Alien"])
    assert rank_strict(only_heathers, idx) is None
    assert rank_patchrec_compat(only_heathers, CATALOG) == 1

    # the prefix goes one way only: target "Heathers" is not hit by "Heat"
    assert rank_patchrec_compat(Prediction("d", 1, ["Heat"]), CATALOG) is None

    ms = score([heat_heat2, only_heathers], CATALOG, scoring="strict")
    mc = score([heat_heat2, only_heathers], CATALOG, scoring="patchrec-compat")
    assert (ms["HR@1"], ms["HR@5"], ms["NDCG@5"]) == (0.5, 0.5, 0.5)
    assert (mc["HR@1"], mc["HR@5"]) == (0.0, 1.0)
    assert mc["NDCG@5"] == 1 / math.log2(3)
    assert ms["scoring"] == "strict" and mc["scoring"] == "patchrec-compat"


def test_compat_strips_both_sides_and_ignores_validity():
    cat = ["  Heat ", "Fargo"]
    pred = Prediction("u", 0, ["Fargo", " Heat\n", "Heat: the remake"])
    assert rank_patchrec_compat(pred, cat) == 2  # non-catalog text still hits in the released rule
    assert rank_patchrec_compat(Prediction("u", 0, ["Fargo", " Heat\n"]), cat) == 1
    assert rank_strict(Prediction("u", 0, [" Heat\n", "Heat"]), TitleIndex(cat)) is None  # exact only
    assert rank_strict(Prediction("u", 0, [" Heat", "Heat\n", "Heat"]), TitleIndex(CATALOG)) == 2
    assert rank_patchrec_compat(Prediction("u", 0, ["He", "Fargo"]), cat) is None


# --- invalid generations ----------------------------------------------------------------------

def test_invalid_generations_counted():
    preds = [
        Prediction("a", 6, ["Fargo", "", "Heat "]),     # "" and "Heat " invalid -> 2/3
        Prediction("b", 6, ["Alien", "Heat"]),          # all valid
        Prediction("c", 6, ["zzz"]),                    # 1 invalid
        Prediction("d", 6, []),                         # nothing returned: not a valid example
    ]
    for scoring in ("strict", "patchrec-compat"):
        m = score(preds, CATALOG, scoring=scoring)
        assert m["positions"] == 6
        assert m["invalid_rate"] == 3 / 6
        assert m["valid_examples_rate"] == 1 / 4
    assert score(preds, CATALOG)["HR@1"] == 1 / 4
    # an empty generation never hits in strict mode, even when some catalog title is empty
    assert rank_strict(Prediction("u", 0, [""]), TitleIndex(["", "A"])) is None


# --- K beyond the returned list, empty input, errors ------------------------------------------

def test_k_larger_than_returned_titles():
    preds = [Prediction("a", 6, ["Alien", "Fargo"]), Prediction("b", 3, ["Fargo", "Heat"])]
    m = score(preds, CATALOG, ks=(1, 2, 50))
    assert (m["HR@1"], m["HR@2"], m["HR@50"]) == (0.0, 0.5, 0.5)
    assert m["NDCG@50"] == m["NDCG@2"] == (1 / math.log2(3)) / 2
    assert set(m) >= {"HR@1", "NDCG@1", "HR@2", "NDCG@2", "HR@50", "NDCG@50"}


def test_empty_prediction_list():
    m = score([], CATALOG)
    assert m["examples"] == 0 and m["positions"] == 0
    assert all(m[f"HR@{k}"] == 0.0 and m[f"NDCG@{k}"] == 0.0 for k in KS)
    assert m["invalid_rate"] == 0.0 and m["valid_examples_rate"] == 0.0
    json.dumps(m, allow_nan=False)
    assert "examples=0" in format_table(m)


def test_bad_arguments_rejected():
    with pytest.raises(ValueError):
        score([], CATALOG, scoring="fuzzy")
    with pytest.raises(ValueError):
        score([], CATALOG, ks=(5, 1))
    with pytest.raises(ValueError):
        score([Prediction("u", 99, ["Heat"])], CATALOG)
    with pytest.raises(ValueError):
        Prediction("u", 0, ["Heat"], scores=[0.1, 0.2])
    with pytest.raises(ValueError):
        merge_metric_sums([score_sums([], CATALOG), score_sums([], CATALOG, scoring="patchrec-compat")])
    with pytest.raises(ValueError):
        merge_metric_sums([])


# --- merging per-rank sums --------------------------------------------------------------------

def random_case(seed: int, n: int = 300):
    rng = random.Random(seed)
    words = ["Heat", "Alien", "Fargo", "Up", "Ran", "Big"]
    catalog = [rng.choice(words) + rng.choice(["", "s", " 2", " Returns", "athers"]) for _ in range(60)]
    preds = []
    for u in range(n):
        titles = [rng.choice(catalog) if rng.random() < 0.85 else rng.choice(["", "not a title", "Heat "])
                  for _ in range(rng.randint(0, 25))]
        preds.append(Prediction(f"user{u}", rng.randrange(len(catalog)), titles))
    return rng, catalog, preds


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scoring", ["strict", "patchrec-compat"])
def test_merge_random_splits_bit_identical(seed, scoring):
    rng, catalog, preds = random_case(seed)
    whole = score(preds, catalog, scoring=scoring)
    assert whole["HR@20"] > 0 and whole["NDCG@20"] not in (0.0, whole["HR@20"])  # a non-trivial case
    idx = TitleIndex(catalog)
    for _ in range(6):
        world = rng.randint(1, 5)
        order = preds[:]
        rng.shuffle(order)
        shards = [[] for _ in range(world)]
        for p in order:
            shards[rng.randrange(world)].append(p)
        shards.append([])  # a rank with no examples
        parts = [score_sums(s, idx, scoring=scoring) for s in shards]
        parts = [json.loads(json.dumps(p)) for p in parts]  # as gathered between processes
        rng.shuffle(parts)
        merged = finalize(merge_metric_sums(parts))
        assert merged == whole  # exact, not approx
    assert finalize(merge_metric_sums([score_sums(preds, catalog, scoring=scoring)])) == whole


def test_ndcg_is_mean_of_per_example_gains():
    """Guards finalize's histogram arithmetic against a direct per-example computation."""
    _, catalog, preds = random_case(5)
    idx = TitleIndex(catalog)
    m = score(preds, idx)
    ranks = [rank_strict(p, idx) for p in preds]
    for k in KS:
        assert m[f"HR@{k}"] == sum(r is not None and r < k for r in ranks) / len(preds)
        gains = [1 / math.log2(r + 2) if r is not None and r < k else 0.0 for r in ranks]
        assert m[f"NDCG@{k}"] == pytest.approx(math.fsum(gains) / len(preds), rel=1e-14)


# --- table ------------------------------------------------------------------------------------

def test_format_table():
    m = score([Prediction("a", 3, ["Fargo", "Alien"]), Prediction("b", 6, ["Fargo"])], CATALOG)
    text = format_table(m)
    lines = text.splitlines()
    assert lines[0].split() == ["K", "HR", "NDCG"]
    assert [ln.split()[0] for ln in lines[1:5]] == ["1", "5", "10", "20"]
    assert lines[1].split() == ["1", "0.5000", "0.5000"]
    assert lines[2].split() == ["5", "1.0000", f"{(1 + 1 / math.log2(3)) / 2:.4f}"]
    assert len({len(ln) for ln in lines[:5]}) == 1  # aligned
    assert "scoring=strict" in lines[-1] and "examples=2" in lines[-1]
