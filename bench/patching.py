"""Patching benchmark: worker throughput, model-side patch embedding vs the released per-item loop,
and positions fed per example on the paper's data sets.

    python bench/patching.py [--quick]

Writes bench/results/patching.json. Targets: >= 5,000 pft-s examples/s per worker core at 100
items, >= 500 at 10,000 items (budget layout); patch embedding >= 20x the per-item loop; the
positions-fed table reproduces reference.md (needs ../shared; skipped without it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from patchrec_dist.data.catalog import catalog_titles
from patchrec_dist.data.manifest import load_manifest
from patchrec_dist.data.readers import read_log
from patchrec_dist.data.sharding import ShardOptions, shard_log
from patchrec_dist.data.stream import HistoryStream, StreamConfig, plan_epoch
from patchrec_dist.model.patch_embed import embed_with_patches, per_item_loop_reference
from patchrec_dist.patching.collate import Collator
from patchrec_dist.patching.features import Patcher
from patchrec_dist.patching.layouts import LayoutSpec
from patchrec_dist.patching.patch_index import PatchIndex
from patchrec_dist.patching.prompt import PromptTemplate, build_prompt_tokens

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LLAMA = SHARED / "tokenizers" / "llama-3.2"
PAPER = SHARED / "data" / "patchrec"
WORDS = ("the night river silent king lost city moon star dark love war story man woman last return "
         "blue house road summer winter secret world girl boy time game heart").split()


def synthetic_dataset(root: Path, users: int, length: int, items: int = 5000, seed: int = 0) -> str:
    """USERS histories of LENGTH items each, titles of ~4 words; one test target per user."""
    rng = np.random.default_rng(seed)
    n = users * length
    inter = pl.DataFrame({"user": np.repeat(np.arange(users), length), "item": rng.integers(0, items, n),
                          "timestamp": np.tile(np.arange(length) * 60, users) + 1_000_000})
    titles = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 6)))).title() + f" {i}" for i in range(items)]
    pl.DataFrame({"item": np.arange(items), "title": titles}).write_parquet(root / "items.parquet")
    inter.write_parquet(root / "inter.parquet")
    log = read_log("table", str(root / "inter.parquet"), items=str(root / "items.parquet"), user_col="user",
                   item_col="item", time_col="timestamp")
    out = str(root / f"ds-{length}")
    opts = ShardOptions(output=out, split="leave-one-out", shard_size="500", workers=1, progress=False)
    shard_log(log, opts, {"format": "bench"})
    return out


def tokenizer_for(titles: list[str]):
    if LLAMA.exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(LLAMA)), "llama-3.2"
    from patchrec_dist.model.tiny import train_title_tokenizer

    t = PromptTemplate.for_domain("movie")
    return train_title_tokenizer([*titles, t.system, t.instruction], vocab_size=2000), "tiny-bpe"


def worker_rate(data: str, spec: LayoutSpec, seconds: float, max_history: int | None = None) -> dict:
    """Examples/s of one worker in this process: shard read + expand + layout + assemble + collate."""
    manifest = load_manifest(data)
    titles = catalog_titles(manifest)
    tok, tok_name = tokenizer_for(titles)
    tokens = build_prompt_tokens(tok, PromptTemplate.for_domain("movie"), titles)
    cfg = StreamConfig(split="train", batch_size=16, num_workers=0, max_history=max_history)
    plan = plan_epoch(manifest, cfg, 0, 1, 1)
    collate = Collator(tokens)
    stream = HistoryStream(manifest, cfg, plan, 0, 1, transform=Patcher(tokens, spec))
    n, batch, t0 = 0, [], time.perf_counter()
    positions = text = 0
    for feats in stream:
        batch.append(feats)
        n += 1
        if len(batch) == 16:
            b = collate(batch)
            positions += b.history_positions
            text += b.text_positions
            batch = []
            if time.perf_counter() - t0 > seconds:
                break
    dt = time.perf_counter() - t0
    return {"examples_per_s": round(n / dt, 1), "examples": n, "seconds": round(dt, 2), "tokenizer": tok_name,
            "positions_fed_per_example": round(positions / max(1, n), 1),
            "all_text_positions_per_example": round(text / max(1, n), 1)}


def patch_embed_speedup(quick: bool) -> dict:
    """One embedding call per micro-batch vs the released loop (one call and mean per item)."""
    torch.manual_seed(0)
    vocab, dim = 49_152, 576  # SmolLM2-135M's embedding table
    emb = torch.nn.Embedding(vocab, dim)
    rng = np.random.default_rng(0)
    batch, hist, g, seq = 16, 100, 5, 160
    patches, positions = [], []
    for r in range(batch):  # pft-s(5) over 100 items: 18 sessions of 5, 5 item patches
        titles = [rng.integers(0, vocab, size=int(rng.integers(2, 7))).tolist() for _ in range(hist)]
        groups = [titles[i : i + g] for i in range(0, hist - 2 * g, g)] + [[t] for t in titles[hist - 2 * g : hist - g]]
        for k, grp in enumerate(groups):
            patches.append(grp)
            positions.append(r * seq + 10 + 2 * k)
    index = PatchIndex.from_patches(patches, positions)
    ids = torch.randint(0, vocab, (batch, seq))

    def run(fn):
        emb.zero_grad()
        out = fn(emb, ids, index)
        out.float().pow(2).sum().backward()
        return out.detach(), emb.weight.grad.clone()

    fast_out, fast_grad = run(embed_with_patches)
    t0 = time.perf_counter()  # the slow path is timed once: it is seconds, noise does not matter
    slow_out, slow_grad = run(per_item_loop_reference)
    slow = time.perf_counter() - t0
    torch.testing.assert_close(fast_out, slow_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_grad, slow_grad, atol=1e-4, rtol=1e-4)
    fast = float("inf")
    for _ in range(5 if quick else 20):
        t0 = time.perf_counter()
        run(embed_with_patches)
        fast = min(fast, time.perf_counter() - t0)
    return {"batch": batch, "history_items": hist, "layout": "pft-s(5)", "patches": index.num_patches,
            "embedding": f"{vocab} x {dim} fp32", "what": "forward + backward, best of runs",
            "one_call_s": round(fast, 5), "per_item_loop_s": round(slow, 5),
            "speedup": round(slow / fast, 1), "outputs_and_grads_equal": True}


def positions_table(quick: bool) -> dict:
    """Positions fed per test example (100-item window) on the paper's data sets, Llama-3.2 tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(LLAMA))
    specs = {"text": LayoutSpec("text"), "pft-i(5)": LayoutSpec("pft-i", item_len=5),
             "pft-s(5)": LayoutSpec("pft-s", group_size=5), "pft-s(20)": LayoutSpec("pft-s", group_size=20)}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("ml-100k", "ml-1m", "goodreads"):
            if quick and name != "ml-100k":
                continue
            log = read_log("patchrec", str(PAPER / name), trust_pickle=True)
            data = f"{tmp}/{name}"
            shard_log(log, ShardOptions(output=data, split="keep", workers=1, progress=False), {"format": "patchrec"})
            manifest = load_manifest(data)
            tokens = build_prompt_tokens(tok, PromptTemplate(**manifest.prompt), catalog_titles(manifest))
            cfg = StreamConfig(split="test", batch_size=1, num_workers=0, shuffle=False, max_history=100,
                               remainder="pad")
            plan = plan_epoch(manifest, cfg, 0, 1, 1)
            row = {}
            for label, spec in specs.items():
                patcher = Patcher(tokens, spec)
                fed = [patcher(e)[0].history_positions for e in HistoryStream(manifest, cfg, plan, 0, 1) if not e.pad]
                row[label] = round(float(np.mean(fed)))
            row["examples"] = len(fed)
            row["share_of_text"] = {k: round(v / row["text"], 2) for k, v in row.items() if k not in ("examples", "text")}
            out[name] = row
    reference = {"ml-100k": [388, 177, 62, 131], "ml-1m": [430, 193, 66, 138], "goodreads": [813, 191, 89, 256]}
    return {"table": out, "reference_md": {k: dict(zip(specs, v)) for k, v in reference.items()},
            "matches_reference": all([out[k][s] for s in specs] == v for k, v in reference.items() if k in out)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter runs (under 2 minutes)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "patching.json"))
    args = p.parse_args()
    torch.set_num_threads(1)  # one worker = one core
    seconds = 3.0 if args.quick else 10.0
    result: dict = {"benchmark": "patching", "command": " ".join(["python", "bench/patching.py", *sys.argv[1:]]),
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version(), "torch": torch.__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rates = {}
        t0 = time.perf_counter()
        for length, spec, label in ((101, LayoutSpec("pft-s", group_size=5), "pft-s(5) 100 items"),
                                    (1001, LayoutSpec("budget", max_positions=512), "budget(512) 1,000 items"),
                                    (10001, LayoutSpec("budget", max_positions=512), "budget(512) 10,000 items")):
            users = 400 if length < 5000 else 60
            data = synthetic_dataset(root, users, length)
            rates[label] = worker_rate(data, spec, seconds)
            print(f"{label}: {rates[label]['examples_per_s']:,.0f} examples/s ({time.perf_counter() - t0:.0f}s)",
                  file=sys.stderr)
        result["worker_examples_per_s_per_core"] = rates
    result["patch_embed_speedup_vs_per_item_loop"] = patch_embed_speedup(args.quick)
    print(f"patch embedding: {result['patch_embed_speedup_vs_per_item_loop']['speedup']}x", file=sys.stderr)
    if LLAMA.exists() and PAPER.exists():
        result["positions_fed_per_test_example"] = positions_table(args.quick)
    else:
        result["positions_fed_per_test_example"] = "skipped: ../shared is absent"
    r100 = rates["pft-s(5) 100 items"]["examples_per_s"]
    r10k = rates["budget(512) 10,000 items"]["examples_per_s"]
    result["targets"] = {"pft_s_100_items_per_s": 5000, "budget_10000_items_per_s": 500, "patch_embed_speedup": 20}
    result["meets_targets"] = bool(r100 >= 5000 and r10k >= 500
                                   and result["patch_embed_speedup_vs_per_item_loop"]["speedup"] >= 20)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"pft_s_100": r100, "budget_10k": r10k,
                      "patch_embed_speedup": result["patch_embed_speedup_vs_per_item_loop"]["speedup"],
                      "positions": result["positions_fed_per_test_example"] if args.quick else "see json",
                      "meets_targets": result["meets_targets"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
