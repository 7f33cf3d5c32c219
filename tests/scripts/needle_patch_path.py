"""Evaluate a PFT-S run on a needle data set three ways in this one process (one start-up instead
of three): as trained, with the prompt cut to the last 20 items as text, and with a scrambled
patch index (a test-only fault: every patch pools another item's title). Prints one JSON line:
{"pft-s": {k: {...}}, "text(20)": ..., "scrambled": ...}.

    python tests/scripts/needle_patch_path.py DATA USERS_PARQUET RUN
"""

from __future__ import annotations

import json
import os
import sys

import polars as pl

from patchrec_dist.evaluate import generate
from patchrec_dist.evaluate.needle import hits_by_distance
from patchrec_dist.evaluate.run import EvalConfig, evaluate


def scramble_patches(batch):
    """Each patch pools the next distinct item of the batch instead of its own."""
    index = batch.patches
    distinct = index.title_offsets.numel() - 1
    if distinct > 1:
        index.patch_items = (index.patch_items + 1) % distinct
    return batch


def main() -> None:
    data, users_path, run = sys.argv[1:4]
    users = pl.read_parquet(users_path)
    out = {}
    plain = generate.GenerationCollator.__call__
    for name, layout, fault in (("pft-s", {}, False), ("text(20)", {"stage": "text", "max_text_items": 20}, False),
                                ("scrambled", {}, True)):
        generate.GenerationCollator.__call__ = (lambda self, items: scramble_patches(plain(self, items))) if fault \
            else plain
        eval_dir = os.path.join(run, f"eval-{name}")
        evaluate(EvalConfig(data=data, run=run, output=eval_dir, max_history=0, num_workers=0, batch_size=64,
                            beams=5, top_k=5,  # HR@1 is what the test reads
                            layout=layout))
        out[name] = hits_by_distance(os.path.join(eval_dir, "predictions.jsonl"), users, ks=(1, 5))
    print("NEEDLE " + json.dumps(out))


if __name__ == "__main__":
    main()
