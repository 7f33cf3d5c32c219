"""HR@K of the needle task per needle distance k: an evaluation's predictions.jsonl joined with the
task's answers (users.parquet from `data.synthetic.write_needle_log`); and where a run's layout
put each user's needle (text, its own patch, a session patch of g items), which reads those HR@K.

HR@K here is the strict rule of evaluate/metrics.py for a catalog of distinct titles: the
target's title among the first K generated titles.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import polars as pl

from patchrec_dist.data import storage
from patchrec_dist.data.catalog import catalog_titles
from patchrec_dist.data.manifest import load_manifest
from patchrec_dist.data.stream import StreamConfig, StreamLoader
from patchrec_dist.patching.features import Patcher
from patchrec_dist.patching.layouts import ITEM, TEXT, LayoutArrays
from patchrec_dist.patching.prompt import resolve_template
from patchrec_dist.train.config import read_run_config


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


def needle_segments(run: str, users: pl.DataFrame, split: str = "test") -> dict[int, dict[str, int]]:
    """{k: {segment: users}}: where each SPLIT user's needle sits in the prompt RUN's layout builds
    from their history (the layout evaluation uses, through the same Patcher): "text", "item" (its
    own patch), "session/g" (one of g items in a session patch), or "dropped" (cut by max_history).
    USERS: user, k (users.parquet of `data.synthetic.write_needle_log`). Reads the run's config,
    data set and exported tokenizer; no model is loaded."""
    # imported here: they bring torch and transformers, which scoring (hits_by_distance) does not need
    from patchrec_dist.evaluate.recommend import layout_for, load_prompt_tokens
    from patchrec_dist.model.load import local_model_dir

    run_cfg = read_run_config(run)
    manifest = load_manifest(run_cfg["data"])
    template = resolve_template(manifest.prompt, run_cfg.get("prompt_file"), run_cfg.get("domain"))
    _, tokens = load_prompt_tokens(local_model_dir(storage.join(run, "final")), catalog_titles(manifest), template)
    patcher = Patcher(tokens, layout_for(run_cfg))
    k_of = {str(u): int(k) for u, k in zip(users["user"].to_list(), users["k"].to_list())}
    stream = StreamConfig(split=split, batch_size=64, shuffle=False, remainder="pad", num_workers=0,
                          max_history=run_cfg.get("max_history") or None)
    counts: dict[int, dict[str, int]] = {}
    for batch in StreamLoader(manifest, stream, rank=0, world=1, persistent_workers=False):
        for ex in (ex for ex in batch if not ex.pad):
            k = k_of[str(ex.user)]
            where = segment_of(patcher.layout(ex), len(ex.history) - k)
            row = counts.setdefault(k, {})
            row[where] = row.get(where, 0) + 1
    return {k: dict(sorted(row.items(), key=lambda kv: -kv[1])) for k, row in sorted(counts.items())}


def segment_of(layout: LayoutArrays, at: int) -> str:
    """What feeds history item AT (oldest = 0; negative: cut off before the layout) in LAYOUT:
    "text", "item", "session/g" (a session patch of g items) or "dropped"."""
    kinds, starts, ends = layout
    j = int(np.searchsorted(ends, at, side="right"))  # segments are in history order
    if at < 0 or j == len(ends) or at < starts[j]:  # text(last K) has no segment for older items
        return "dropped"
    kind = int(kinds[j])
    return "text" if kind == TEXT else "item" if kind == ITEM else f"session/{int(ends[j] - starts[j])}"
