"""Recommendation quality per prompt layout, at one base model and one step budget.

    python bench/quality.py                                   # MovieLens-100K, SmolLM2-135M, CPU
    python bench/quality.py --data ../shared/data/ml-1m-shards --model /models/Llama-3.2-1B \\
        --steps 2000 --eval-examples 0 --cpu false --ranks 8

Fine-tunes the same base model for the same number of steps with each layout (text with the
last 20 items, text with the last 100, PFT-I(5), PFT-S(g)), evaluates each on the same test
users, runs the baselines (popularity, SASRec, trained to early stopping) on those users, and
writes HR@K / NDCG@K with the positions each layout feeds per example to
bench/results/quality-<dataset>.json and a plot of HR@20 against positions fed
(quality-<dataset>.png). Every row is scored twice: with the user's history not masked (the
released PatchRec protocol: "metrics") and masked (--exclude-seen, RecBole's and HSTU's
protocol: "metrics_seen_masked"), so the numbers can be set beside either. Runs go through the launchers (DeepSpeed,
ZeRO-3) with the demo's machinery, so a rerun resumes where it stopped.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from patchrec_dist.data import storage  # noqa: E402
from patchrec_dist.demo import Demo, DemoConfig, machine_summary  # noqa: E402
from patchrec_dist.evaluate.metrics import seen_protocol  # noqa: E402

LAYOUTS = {
    "text(20)": ["--stage", "text", "--max-text-items", "20"],
    "text(100)": ["--stage", "text", "--max-text-items", "100"],
    "pft-i(5)": ["--stage", "pft-i", "--item-len", "5"],
    "pft-s(5)": ["--stage", "pft-s", "--group-size", "5"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="sharded data set (default: MovieLens-100K from the recbole wheel)")
    p.add_argument("--name", default=None, help="data set name in the output file names (default: from --data)")
    p.add_argument("--model", default="smollm2", help="base model: smollm2, an HF folder or a .gguf")
    p.add_argument("--steps", type=int, default=40, help="fine-tuning optimizer steps per layout")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--cpu", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--eval-examples", type=int, default=64, help="first N test examples (0: all)")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, from {', '.join(LAYOUTS)}")
    p.add_argument("--baselines", default="popularity,sasrec")
    p.add_argument("--work", default="bench/work/quality", help="runs and logs (a rerun resumes from here)")
    p.add_argument("--results", default="bench/results")
    p.add_argument("--check-args", action="store_true", help="check the arguments and exit (bench/gpu_check.sh --dry-run)")
    args = p.parse_args(argv)
    if args.data and not Path(args.data, "manifest.json").exists():
        p.error(f"--data {args.data}: no manifest.json there (tools/shard_histories.py makes one)")
    unknown = [x for x in args.layouts.split(",") if x not in LAYOUTS]
    if unknown:
        p.error(f"--layouts: unknown {', '.join(unknown)}; choose from {', '.join(LAYOUTS)}")
    return args


def run_quality(args: argparse.Namespace) -> dict:
    name = args.name or (Path(args.data.rstrip("/")).name if args.data else "ml-100k")
    cfg = DemoConfig(output=os.path.join(args.work, name), data=args.data, model=args.model, ranks=args.ranks,
                     cpu=args.cpu, micro_batch=args.micro_batch, finetune_steps=args.steps, finetune_lr=args.lr,
                     eval_examples=args.eval_examples, baselines=args.baselines, pretrain_steps=0)
    cfg.check()
    demo = Demo(cfg)
    t0 = time.perf_counter()
    data = demo.prepare_data()
    model = demo.prepare_model()
    demo.reset_runs_if_config_changed()
    rows: dict[str, dict] = {}
    for layout in args.layouts.split(","):
        label = layout.replace("(", "").replace(")", "")
        run = demo.train(f"ft-{label}", "launchers/finetune.py",
                         ["--data", data, "--model", model, *LAYOUTS[layout], "--max-steps", str(args.steps),
                          "--lr", str(args.lr)])
        source = ["--run", run]
        rows[layout] = summarize(demo.evaluate(label, data, source, Path(run) / "eval-test", exclude_seen=False),
                                 demo.evaluate(label, data, source, Path(run) / "eval-test", exclude_seen=True))
    for b in cfg.baseline_names():
        rows[b] = summarize(demo.baseline(b, data, exclude_seen=False), demo.baseline(b, data, exclude_seen=True))
    result = {
        "benchmark": "quality",
        "command": "python bench/quality.py " + " ".join(sys.argv[1:]),
        "data": name, "model": args.model, "steps": args.steps, "lr": args.lr, "micro_batch": args.micro_batch,
        "ranks": args.ranks, "examples": next(iter(rows.values()))["examples"] if rows else 0,
        "machine": machine_summary(args.cpu),
        "history": {"metrics": seen_protocol(False), "metrics_seen_masked": seen_protocol(True)},
        "rows": rows,
        "timings_s": {k: round(v, 1) for k, v in demo.timings.items()},
        "total_s": round(time.perf_counter() - t0, 1),
    }
    out = Path(args.results)
    storage.write_bytes_atomic(str(out / f"quality-{name}.json"), (json.dumps(result, indent=2) + "\n").encode())
    plot(result, out / f"quality-{name}.png")
    print_table(result)
    return result


def summarize(unmasked: dict, masked: dict) -> dict:
    """One row from the metrics.json of the same model scored without and with --exclude-seen."""
    def ranking(m: dict) -> dict:
        return {k: v for k, v in m["metrics"].items() if k.startswith(("HR@", "NDCG@"))}

    assert not unmasked["exclude_seen"] and masked["exclude_seen"] and unmasked["examples"] == masked["examples"]
    row = {"metrics": ranking(unmasked), "metrics_seen_masked": ranking(masked),
           "positions_fed_per_example": unmasked.get("positions_fed_per_example"),
           "prompt_tokens_per_example": unmasked.get("prompt_tokens_per_example"),
           "examples": unmasked["examples"]}
    if "early_stopping" in unmasked.get("baseline", {}):
        row["epochs"] = {"unmasked": unmasked["baseline"]["early_stopping"]["best_epoch"],
                         "seen_masked": masked["baseline"]["early_stopping"]["best_epoch"]}
    return row


def plot(result: dict, path: Path) -> None:
    """HR@20 against history positions fed; baselines (no prompt) as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, row in result["rows"].items():
        hr = row["metrics"].get("HR@20", 0.0)
        if row["positions_fed_per_example"] is None:
            ax.axhline(hr, linestyle="--", linewidth=1, color="gray")
            ax.annotate(name, (0.01, hr), xycoords=("axes fraction", "data"), va="bottom", fontsize=8)
        else:
            ax.scatter(row["positions_fed_per_example"], hr, s=30)
            ax.annotate(name, (row["positions_fed_per_example"], hr), xytext=(4, 4), textcoords="offset points",
                        fontsize=8)
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("history positions fed per example (log)")
    ax.set_ylabel("HR@20")
    ax.set_title(f"{result['data']}: {result['model']}, {result['steps']} steps, {result['examples']} test users",
                 fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    storage.write_bytes_atomic(str(path), png.getvalue())


def print_table(result: dict) -> None:
    cols = ("HR@1", "HR@5", "HR@10", "HR@20", "NDCG@10", "NDCG@20")
    for key, protocol in result["history"].items():
        print(protocol)
        print(f"{'':12}{'positions':>10}" + "".join(f"{c:>9}" for c in cols))
        for name, row in result["rows"].items():
            fed = row["positions_fed_per_example"]
            print(f"{name:12}{'-' if fed is None else f'{fed:.0f}':>10}" +
                  "".join(f"{row[key].get(c, float('nan')):9.4f}" for c in cols))


if __name__ == "__main__":
    args = parse_args()
    if not args.check_args:
        run_quality(args)
