"""How close beam search comes to the exact catalog ranking it approximates.

    python bench/exact.py                                   # tiny (trained here) and SmolLM2, CPU
    python bench/exact.py --models tiny --examples 200

On MovieLens-100K's leave-one-out test split (the demo's data set), each model is evaluated three
times on the same first N test examples with `launchers/evaluate.py`: `--decoding beam` (20 beams
over the title trie), `--decoding paper` (the released protocol's 20 diverse groups of one beam,
penalty 0.8) and `--decoding exact` (every catalog title's log-likelihood, the trie walked once
with a tree attention mask). `tiny` is the random tiny Llama fine-tuned here with PFT-S for --tiny-steps
steps; `smollm2` is SmolLM2-135M-Instruct as it comes (PatchRec tokens added, not fine-tuned:
training it on CPU takes longer than this benchmark). Writes bench/results/exact.json: per model,
how often beam search's (and the paper decoding's) top-20 equals the exact top-20 (as a set, and in
order), the mean overlap, HR@K of all three, and seconds per example of all three.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from patchrec_dist.data import storage  # noqa: E402
from patchrec_dist.demo import Demo, DemoConfig, machine_summary  # noqa: E402

KS = ("HR@1", "HR@5", "HR@10", "HR@20")
DECODINGS = ("beam", "paper", "exact")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    p.add_argument("--examples", type=int, default=64, help="first N test examples for tiny")
    p.add_argument("--smollm2-examples", type=int, default=16, help="first N test examples for smollm2")
    p.add_argument("--tiny-steps", type=int, default=300, help="PFT-S steps for the tiny model")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--work", default="bench/work/exact", help="data, runs and logs (a rerun resumes from here)")
    p.add_argument("--results", default="bench/results")
    args = p.parse_args(argv)
    unknown = set(args.models.split(",")) - {"tiny", "smollm2"}
    if unknown:
        p.error(f"--models: unknown {', '.join(sorted(unknown))}; choose from tiny, smollm2")
    return args


def predictions(folder: Path) -> list[list[str]]:
    return [[t["title"] for t in json.loads(line)["top"]] for line in (folder / "predictions.jsonl").read_text().splitlines()]


def agreement(beam: list[list[str]], exact: list[list[str]]) -> dict[str, float]:
    """Per example, beam search's top-20 against the exact top-20."""
    n = len(exact)
    assert n == len(beam) and n > 0
    return {
        "top20_same_set": round(sum(set(b) == set(e) for b, e in zip(beam, exact)) / n, 4),
        "top20_same_order": round(sum(b == e for b, e in zip(beam, exact)) / n, 4),
        "top1_same": round(sum(b[:1] == e[:1] for b, e in zip(beam, exact)) / n, 4),
        "top20_overlap": round(sum(len(set(b) & set(e)) / max(len(e), 1) for b, e in zip(beam, exact)) / n, 4),
    }


def run_exact(args: argparse.Namespace) -> dict:
    cfg = DemoConfig(output=args.work, ranks=args.ranks, baselines="", pretrain_steps=0, eval_untrained=False)
    demo = Demo(cfg)
    t0 = time.perf_counter()
    data = demo.prepare_data()
    demo.reset_runs_if_config_changed()
    rows: dict[str, dict] = {}
    for model in args.models.split(","):
        if model == "tiny":
            run = demo.train("ft-tiny", "launchers/finetune.py",
                             ["--data", data, "--model", "tiny", "--stage", "pft-s", "--max-steps", str(args.tiny_steps),
                              "--lr", "3e-3", "--grad-clip", "1.0", "--micro-batch", "16"])
            source, where, n = ["--run", run], Path(run), args.examples
            what = f"tiny Llama (hidden 64, 2 layers) fine-tuned with PFT-S(5) for {args.tiny_steps} steps"
        else:
            where = demo.runs / "smollm2"
            source, n = ["--model", demo.prepare_model(), "--stage", "pft-s"], args.smollm2_examples
            what = "SmolLM2-135M-Instruct, not fine-tuned (PatchRec tokens added), PFT-S(5) prompts"
        got = {}
        for decoding in DECODINGS:
            out = where / f"eval-{decoding}"
            if not (out / "metrics.json").exists():
                flags = ["--data", data, *source, "--output", str(out), "--decoding", decoding, "--max-examples", str(n),
                         "--batch-size", "1" if decoding == "exact" else "8"]
                demo.timings[f"{model} {decoding}"] = demo.launch(f"eval-{model}-{decoding}", "launchers/evaluate.py",
                                                                  flags, args.ranks)
            got[decoding] = json.loads((out / "metrics.json").read_text())
        exact = predictions(where / "eval-exact")
        rows[model] = {
            "model": what, "examples": got["exact"]["examples"],
            "agreement": agreement(predictions(where / "eval-beam"), exact),
            "agreement_paper": agreement(predictions(where / "eval-paper"), exact),
            **{d: {"metrics": {k: got[d]["metrics"][k] for k in KS},
                   "s_per_example": round(1 / got[d]["examples_per_s"], 3)} for d in DECODINGS},
        }
        rows[model]["exact_over_beam_time"] = round(rows[model]["exact"]["s_per_example"]
                                                    / rows[model]["beam"]["s_per_example"], 1)
    result = {"benchmark": "exact", "command": " ".join(["python bench/exact.py", *sys.argv[1:]]),
              "data": "ml-100k (leave-one-out test split)", "beams": 20, "top_k": 20, "ranks": args.ranks,
              "machine": machine_summary(True), "rows": rows,
              "timings_s": {k: round(v, 1) for k, v in demo.timings.items()},
              "total_s": round(time.perf_counter() - t0, 1)}
    storage.write_bytes_atomic(str(Path(args.results) / "exact.json"), (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps(rows, indent=2))
    return result


if __name__ == "__main__":
    run_exact(parse_args())
