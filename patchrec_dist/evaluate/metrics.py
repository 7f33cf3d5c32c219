"""Scoring ranked title generations for next-item recommendation (HR@K, NDCG@K, invalid rate).

The model generates item *titles* (beam search constrained to catalog titles), best first. Titles
are not unique (several catalog items can share one), so a generated title stands for the *set* of
items with exactly that title. See the project reference (../shared/docs/reference.md,
"Evaluation as released").

Two scoring rules give each example a 0-based rank (or ``None`` for a miss):

``"strict"`` (default, `rank_strict`)
    A generated title is a hit when the target item is among the catalog items whose title is
    *exactly* that string (``==``, no normalisation: callers pass decoded text already stripped,
    as the generator does). The first hit counts. An empty string is never a hit. If the target
    shares its title with other items, generating that title is a hit (the title cannot tell them
    apart); a title whose item set does not contain the target is a miss.

``"patchrec-compat"`` (`rank_patchrec_compat`)
    The released PatchRec rule (``calculate_rank`` in its eval.py), kept to reproduce published
    numbers: both the target's catalog title and each generated title are ``str.strip()``-ed
    (the released loader stripped catalog titles, the released generator stripped decoded text),
    and a generated title is a hit when ``generated.strip().startswith(target.strip())`` (so the
    target "Heat" is hit by "Heathers"). Every hit overwrites the rank, so the LAST hit counts.
    Validity is not checked (a non-catalog text can hit), and an empty target title is hit by
    everything. Ranks run over all returned titles; the released code returned exactly 20 and
    reported K = 20, so this mode is faithful when the number of returned titles equals max(K).

Metrics (one relevant item per example; the same in both modes):

- ``HR@K`` = mean over examples of [rank < K];
- ``NDCG@K`` = mean of 1/log2(rank + 2) if rank < K else 0 (what the released sklearn call gives);
- ``invalid_rate`` = invalid generated titles / all returned positions (summed over examples;
  0.0 when nothing was returned). A title is invalid when it is empty or not *exactly* a catalog
  title; the same definition in both modes, so the rate is comparable between them;
- ``valid_examples_rate`` = share of examples that returned at least one title and whose returned
  titles are all valid;
- ``examples`` (count), ``positions`` (returned titles, all examples), ``scoring``.
  With no examples every rate is 0.0 (not NaN, so the dict stays strict JSON); check ``examples``.

Multi-rank evaluation: each rank calls `score_sums` on its own examples, the partials are gathered
(they are plain JSON-able dicts of integers), combined with `merge_metric_sums` and turned into
metrics with `finalize`. A partial holds only integer counts (examples, positions, invalid, valid
examples, and a histogram of hit ranks below max(K)); merging adds integers, and `finalize`
derives every float from the merged counts in a fixed order, so any split of the examples over
any number of ranks gives bit-identical results to `score` on all of them. (Examples duplicated
by a padding sampler must be dropped by the caller before `score_sums`.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

Scoring = Literal["strict", "patchrec-compat"]
SCORINGS: tuple[str, ...] = get_args(Scoring)
KS: tuple[int, ...] = (1, 5, 10, 20)
SUMS_KIND = "patchrec_metric_sums"
SUMS_VERSION = 1


@dataclass
class Prediction:
    """One evaluated example: the true next item and the generated titles, best first."""

    user: str
    target: int  # catalog index of the true next item
    titles: list[str]  # generated titles, best first; may hold "" or non-catalog text
    scores: list[float] | None = None  # beam scores aligned with `titles` (not used for ranking)

    def __post_init__(self) -> None:
        if self.scores is not None and len(self.scores) != len(self.titles):
            raise ValueError(f"Prediction for user {self.user!r}: {len(self.scores)} scores for "
                             f"{len(self.titles)} titles")


class TitleIndex:
    """Exact title -> frozenset of catalog items with that title, built once from the catalog.

    ``titles[i]`` is the title of catalog item i. Lookups are exact string matches; the empty
    string maps to no item and is never valid, even if some catalog title is empty.
    """

    def __init__(self, titles: Sequence[str]):
        self.titles: tuple[str, ...] = tuple(titles)
        groups: dict[str, list[int]] = {}
        for item, title in enumerate(self.titles):
            if title:
                groups.setdefault(title, []).append(item)
        self._items: dict[str, frozenset[int]] = {t: frozenset(v) for t, v in groups.items()}

    def __len__(self) -> int:
        """Number of catalog items."""
        return len(self.titles)

    def items_for(self, title: str) -> frozenset[int]:
        """The catalog items whose title is exactly `title` (empty for unknown or "")."""
        return self._items.get(title, frozenset())

    def is_valid(self, title: str) -> bool:
        """Whether `title` is non-empty and exactly some catalog item's title."""
        return bool(title) and title in self._items

    def duplicated(self) -> dict[str, frozenset[int]]:
        """Titles shared by more than one catalog item, with their items."""
        return {t: s for t, s in self._items.items() if len(s) > 1}


def _as_index(catalog: Sequence[str] | TitleIndex) -> TitleIndex:
    return catalog if isinstance(catalog, TitleIndex) else TitleIndex(catalog)


def _check_target(pred: Prediction, n_items: int) -> None:
    if not 0 <= pred.target < n_items:
        raise ValueError(f"Prediction for user {pred.user!r}: target {pred.target} is not a catalog "
                         f"index (catalog has {n_items} items)")


def rank_strict(pred: Prediction, index: TitleIndex) -> int | None:
    """0-based rank of the first generated title whose item set contains the target; None if none."""
    _check_target(pred, len(index))
    for rank, title in enumerate(pred.titles):
        if pred.target in index.items_for(title):
            return rank
    return None


def rank_patchrec_compat(pred: Prediction, catalog_titles: Sequence[str] | TitleIndex) -> int | None:
    """The released rule: last rank whose stripped title starts with the target's stripped title."""
    titles = catalog_titles.titles if isinstance(catalog_titles, TitleIndex) else catalog_titles
    _check_target(pred, len(titles))
    real = titles[pred.target].strip()
    found = None
    for rank, title in enumerate(pred.titles):
        if title.strip().startswith(real):
            found = rank  # overwritten on every match, as in the released code
    return found


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    out = tuple(ks)
    if not out or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in out):
        raise ValueError(f"ks must be positive integers, got {out!r}")
    if list(out) != sorted(set(out)):
        raise ValueError(f"ks must be strictly increasing, got {out!r}")
    return out


def _check_scoring(scoring: str) -> str:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    return scoring


def example_result(pred: Prediction, index: TitleIndex, scoring: Scoring = "strict") -> dict:
    """Per-example record: user, target, rank (None = miss), returned titles, invalid titles."""
    _check_scoring(scoring)
    rank = rank_strict(pred, index) if scoring == "strict" else rank_patchrec_compat(pred, index)
    invalid = sum(1 for t in pred.titles if not index.is_valid(t))
    return {"user": pred.user, "target": pred.target, "rank": rank, "returned": len(pred.titles),
            "invalid": invalid}


def score_sums(preds: Iterable[Prediction], catalog_titles: Sequence[str] | TitleIndex,
               scoring: Scoring = "strict", ks: Sequence[int] = KS) -> dict:
    """The mergeable partial for `preds`: integer counts only (see the module docstring)."""
    _check_scoring(scoring)
    ks = _check_ks(ks)
    index = _as_index(catalog_titles)
    hist = [0] * ks[-1]
    examples = positions = invalid = valid_examples = 0
    for pred in preds:
        r = example_result(pred, index, scoring)
        examples += 1
        positions += r["returned"]
        invalid += r["invalid"]
        valid_examples += int(r["returned"] > 0 and r["invalid"] == 0)
        if r["rank"] is not None and r["rank"] < ks[-1]:
            hist[r["rank"]] += 1
    return {"kind": SUMS_KIND, "version": SUMS_VERSION, "scoring": scoring, "ks": list(ks),
            "examples": examples, "positions": positions, "invalid": invalid,
            "valid_examples": valid_examples, "rank_hist": hist}


_COUNT_FIELDS = ("examples", "positions", "invalid", "valid_examples")


def _check_sums(sums: dict) -> None:
    if not isinstance(sums, dict) or sums.get("kind") != SUMS_KIND or sums.get("version") != SUMS_VERSION:
        raise ValueError("not a metric-sums dict from score_sums")
    if len(sums["rank_hist"]) != sums["ks"][-1]:
        raise ValueError("rank_hist length does not match max(ks)")


def merge_metric_sums(parts: Sequence[dict]) -> dict:
    """Combine per-rank partials from `score_sums` into one partial (integer addition: exact).

    All parts must share ``scoring`` and ``ks``. Feed the result to `finalize`.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_metric_sums needs at least one partial")
    for p in parts:
        _check_sums(p)
    first = parts[0]
    for p in parts[1:]:
        if p["scoring"] != first["scoring"] or list(p["ks"]) != list(first["ks"]):
            raise ValueError(f"cannot merge partials with different scoring/ks: "
                             f"{first['scoring']} {first['ks']} vs {p['scoring']} {p['ks']}")
    out = {"kind": SUMS_KIND, "version": SUMS_VERSION, "scoring": first["scoring"], "ks": list(first["ks"])}
    for f in _COUNT_FIELDS:
        out[f] = sum(int(p[f]) for p in parts)
    out["rank_hist"] = [sum(int(p["rank_hist"][r]) for p in parts) for r in range(len(first["rank_hist"]))]
    return out


def finalize(sums: dict) -> dict:
    """Metrics from a (merged) partial: HR@K, NDCG@K for each K, rates and counts."""
    _check_sums(sums)
    n = int(sums["examples"])
    hist = [int(c) for c in sums["rank_hist"]]
    out: dict = {}
    for k in sums["ks"]:
        hits = sum(hist[:k])
        gains = math.fsum(hist[r] * (1.0 / math.log2(r + 2)) for r in range(k) if hist[r])
        out[f"HR@{k}"] = hits / n if n else 0.0
        out[f"NDCG@{k}"] = gains / n if n else 0.0
    positions = int(sums["positions"])
    out["examples"] = n
    out["positions"] = positions
    out["invalid_rate"] = int(sums["invalid"]) / positions if positions else 0.0
    out["valid_examples_rate"] = int(sums["valid_examples"]) / n if n else 0.0
    out["scoring"] = sums["scoring"]
    return out


def score(preds: Iterable[Prediction], catalog_titles: Sequence[str] | TitleIndex,
          scoring: Scoring = "strict", ks: Sequence[int] = KS) -> dict:
    """Metrics for `preds` on one process: ``finalize(score_sums(...))``."""
    return finalize(score_sums(preds, catalog_titles, scoring, ks))


def seen_protocol(exclude_seen: bool) -> str:
    """How a table's numbers treat the user's own history, in the words every report uses."""
    if exclude_seen:
        return "history masked (--exclude-seen; RecBole's and HSTU's protocol)"
    return "history not masked (the released PatchRec protocol)"


def format_table(metrics: dict) -> str:
    """A small aligned text table: one row per K, columns HR and NDCG, then a summary line."""
    ks = sorted(int(key.split("@", 1)[1]) for key in metrics if key.startswith("HR@"))
    width = max(len("K"), *(len(str(k)) for k in ks)) if ks else 1
    lines = [f"{'K':>{width}}  {'HR':>8}  {'NDCG':>8}"]
    for k in ks:
        lines.append(f"{k:>{width}}  {metrics[f'HR@{k}']:>8.4f}  {metrics.get(f'NDCG@{k}', float('nan')):>8.4f}")
    summary = [f"scoring={metrics.get('scoring', '?')}", f"examples={metrics.get('examples', '?')}"]
    if "invalid_rate" in metrics:
        summary.append(f"invalid_rate={metrics['invalid_rate']:.4f}")
    if "valid_examples_rate" in metrics:
        summary.append(f"valid_examples_rate={metrics['valid_examples_rate']:.4f}")
    lines.append("  ".join(summary))
    return "\n".join(lines)
