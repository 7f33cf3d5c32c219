"""HR@K of the needle task per needle distance k: an evaluation's predictions.jsonl joined with the
task's answers (users.parquet from `data.synthetic.write_needle_log`).

HR@K here is the strict rule of evaluate/metrics.py for a catalog of distinct titles: the
target's title among the first K generated titles.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import polars as pl

from patchrec_dist.data import storage


def hits_by_distance(predictions: str, users: pl.DataFrame, ks: Iterable[int] = (1, 10)) -> dict[int, dict]:
    """{k: {"HR@K": ..., "examples": n}} over the predictions of PREDICTIONS (a predictions.jsonl
    path or URL), grouped by each user's needle distance k (USERS: user, k)."""
    ks = tuple(ks)
    k_of = {str(u): int(k) for u, k in zip(users["user"].to_list(), users["k"].to_list())}
    counts: dict[int, list[int]] = {}
    text = storage.read_bytes(predictions).decode()
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if str(rec["user"]) not in k_of:
            raise ValueError(f"{predictions}: line {line_no}: user {rec['user']!r} is not in the task's users")
        titles = [t["title"] for t in rec["top"]]
        row = counts.setdefault(k_of[str(rec["user"])], [0] * (len(ks) + 1))
        for i, cut in enumerate(ks):
            row[i] += rec["target_title"] in titles[:cut]
        row[-1] += 1
    return {k: {**{f"HR@{cut}": round(row[i] / row[-1], 4) for i, cut in enumerate(ks)}, "examples": row[-1]}
            for k, row in sorted(counts.items())}
