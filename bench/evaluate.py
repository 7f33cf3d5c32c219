"""Evaluation speed: this toolkit's constrained beam search (KV cache, trie masking as tensor ops)
against a re-implementation of the released protocol (no KV cache, a Python prefix-allowed-tokens
callback over the whole input), on the same model, prompts and catalog; the top-K is asserted equal.

    python bench/evaluate.py [--examples 32] [--batch 8] [--stage pft-s]

Writes bench/results/evaluate.json. Target: >= 5x examples/s.
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

import torch

from patchrec_dist.data.catalog import catalog_titles
from patchrec_dist.data.manifest import load_manifest
from patchrec_dist.data.readers import read_log
from patchrec_dist.data.sharding import ShardOptions, shard_log
from patchrec_dist.data.stream import StreamConfig, StreamLoader
from patchrec_dist.evaluate.generate import GenerationCollator, generate_topk
from patchrec_dist.evaluate.trie import TitleTrie
from patchrec_dist.fetch import movielens_100k_recbole
from patchrec_dist.model.tiny import tiny_llama_config, train_title_tokenizer
from patchrec_dist.patching.features import Patcher
from patchrec_dist.patching.layouts import LayoutSpec
from patchrec_dist.patching.prompt import PromptTemplate, build_prompt_tokens

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--beams", type=int, default=20)
    p.add_argument("--stage", default="pft-s", choices=("text", "pft-s"))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "evaluate.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "ml-100k")
        shard_log(read_log("recbole", str(movielens_100k_recbole())),
                  ShardOptions(output=data, shard_size="200", workers=1, progress=False), {"format": "recbole"})
        manifest = load_manifest(data)
        titles = catalog_titles(manifest)
        template = PromptTemplate.for_domain("movie")
        tokenizer = train_title_tokenizer([*titles, template.system, template.instruction], vocab_size=4000)
        tokens = build_prompt_tokens(tokenizer, template, titles)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer), hidden_size=128, layers=2)).eval()
        trie = TitleTrie.from_prompt_tokens(tokens)
        spec = LayoutSpec(args.stage, group_size=5)
        cfg = StreamConfig(split="test", batch_size=args.batch, shuffle=False, remainder="pad", max_history=100,
                           num_workers=0, max_examples=args.examples)
        batches = list(StreamLoader(manifest, cfg, 0, 1, transform=Patcher(tokens, spec),
                                    collate_fn=GenerationCollator(tokens)))
    timings, results = {}, {}
    with torch.no_grad():
        for method in ("kv-cache", "released-reference"):
            t0 = time.perf_counter()
            out = []
            for b in batches:
                out += generate_topk(model, model.get_input_embeddings(), b, trie, num_beams=args.beams,
                                     top_k=args.beams, method=method)
            timings[method] = time.perf_counter() - t0
            results[method] = out
            print(f"{method}: {len(out) / timings[method]:.2f} examples/s", file=sys.stderr)
    same = all([sorted(h.items) for h in a] == [sorted(h.items) for h in b]
               for a, b in zip(results["kv-cache"], results["released-reference"]))
    max_score_diff = max(abs(x.score - y.score) for a, b in zip(results["kv-cache"], results["released-reference"])
                         for x, y in zip(a, b))
    n = len(results["kv-cache"])
    result = {
        "benchmark": "evaluate", "command": " ".join(["python", "bench/evaluate.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "threads": 1},
        "setup": {"data": "MovieLens-100K test split (recbole wheel)", "catalog_titles": len(titles),
                  "trie_leaves": trie.num_leaves, "model": "tiny Llama (hidden 128, 2 layers, random)",
                  "layout": args.stage, "examples": n, "batch": args.batch, "beams": args.beams, "top_k": args.beams},
        "examples_per_s": {k: round(n / v, 2) for k, v in timings.items()},
        "speedup": round(timings["released-reference"] / timings["kv-cache"], 1),
        "same_top_k": same, "max_score_diff": max_score_diff, "target_speedup": 5,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("examples_per_s", "speedup", "same_top_k")}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
