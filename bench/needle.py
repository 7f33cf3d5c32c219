"""A needle in a long history: what each prompt layout keeps of an item k positions back.

    python bench/needle.py                                  # tiny model on CPU, under 15 min here
    python bench/needle.py --layouts "pft-s(2),pft-s(5),pft-s(10)" --name needle-g   # session size g
    python bench/needle.py --steps 2000 --layouts "budget(160),budget(512)" --name needle-budget
    python bench/needle.py --pretrain-steps 1000 --layouts "budget(512)" --name needle-ppt  # PPT first
    python bench/needle.py --model smollm2 --cpu false --lr 2e-4 --needles 32 --micro-batch 32  # a GPU

Every user's one target is set by a single "needle" item k positions before it (a fixed random
needle -> target map); the rest of the history is Zipf filler (data/synthetic.py,
`generate_needle_log`). The log goes through the sharding tool like any other (a table with
its own split column), then the same model is fine-tuned for the same steps on the same
examples under each layout (text with the last 20 items, PFT-I(5), PFT-S(g), a 512-position
budget; text with the whole history where it fits) and evaluated with the normal constrained
evaluation (10 beams, top 10: HR@1 and HR@10 are what the task reads). A layout that drops item k scores chance (1 / needles) at that k; one that keeps
it can learn the map. Writes bench/results/needle.json (`results[layout][k]`: HR@1, HR@10,
examples, the layout's mean positions fed, and where the layout put the needle: `needle_in`,
users per "text", "item", "session/g" or "dropped") and needle.png (HR@1 against k). With
--pretrain-steps, one patch pre-training run on the task comes first and every layout fine-tunes
from it (the method's two stages); without, every layout starts from the base model. Runs go
through the launchers with the demo's machinery, so a rerun resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import polars as pl  # noqa: E402

from patchrec_dist.data import storage  # noqa: E402
from patchrec_dist.data.synthetic import NeedleSpec, write_needle_log  # noqa: E402
from patchrec_dist.demo import Demo, DemoConfig, machine_summary  # noqa: E402
from patchrec_dist.evaluate.needle import hits_by_distance, needle_segments  # noqa: E402

LAYOUTS = {
    "text(20)": ["--stage", "text", "--max-text-items", "20"],
    "text(all)": ["--stage", "text"],
    "pft-i(5)": ["--stage", "pft-i", "--item-len", "5"],
    "pft-s(2)": ["--stage", "pft-s", "--group-size", "2"],
    "pft-s(5)": ["--stage", "pft-s", "--group-size", "5"],
    "pft-s(10)": ["--stage", "pft-s", "--group-size", "10"],
    "budget(160)": ["--stage", "budget", "--max-positions", "160"],
    "budget(512)": ["--stage", "budget", "--max-positions", "512"],
}
DEFAULT_LAYOUTS = "text(20),pft-i(5),pft-s(5),budget(512)"  # the g sweep: --layouts "pft-s(2),pft-s(5),pft-s(10)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (random, trained from scratch), smollm2, or an HF folder")
    p.add_argument("--steps", type=int, default=1000, help="fine-tuning optimizer steps per layout")
    # 1.5e-3 for the tiny model: at 3e-3 its loss sat at the "which of the needles" plateau (about
    # log(needles) per title) for most of the 1,000 steps and PFT-S(2) never left it; at 1.5e-3 it left
    # it by step 400 (PFT-S(2) and text(20) on the same data, 6e-3 was worse still)
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (1.5e-3 for tiny; about 1e-4 for a "
                                                            "pre-trained model)")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="patch pre-training (PPT: items patched with a probability rising to 1, each example also "
                        "all text) on the task first, at --lr and --micro-batch; every layout then fine-tunes from "
                        "it (0: every layout starts from the base model)")
    p.add_argument("--tiny-hidden", type=int, default=64, help="the tiny model's hidden size")
    # ZeRO-2 by default: on one rank nothing is worth partitioning, and ZeRO-3's per-parameter
    # gathers, fills and partition copies were half of the tiny model's step (0.131 s against
    # 0.066 s with ZeRO-2, pft-s(5), micro-batch 16, --profile-steps on 2 CPU cores)
    p.add_argument("--ds-config", default="ds_configs/zero2.json", help="DeepSpeed config of every layout's run")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--cpu", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--layouts", default=DEFAULT_LAYOUTS, help=f"comma-separated, from {', '.join(LAYOUTS)}")
    task = p.add_argument_group("the task (data/synthetic.py NeedleSpec)")
    d = NeedleSpec()
    task.add_argument("--users", type=int, default=20_000)
    task.add_argument("--min-history", type=int, default=20)
    task.add_argument("--max-history", type=int, default=400, help="longest history (the spec allows 2,000 and more)")
    task.add_argument("--distances", default=",".join(map(str, d.distances)), help="needle distances k")
    task.add_argument("--needles", type=int, default=8, help="needle items (chance HR@1 is 1 / needles)")
    task.add_argument("--fillers", type=int, default=d.fillers)
    task.add_argument("--test-users", type=float, default=0.03)
    task.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="bench/work/needle", help="data, runs and logs (a rerun resumes from here)")
    p.add_argument("--results", default="bench/results")
    p.add_argument("--name", default="needle", help="writes RESULTS/NAME.json and NAME.png")
    p.add_argument("--check-args", action="store_true", help="check the arguments and exit (bench/gpu_check.sh --dry-run)")
    args = p.parse_args(argv)
    unknown = [x for x in args.layouts.split(",") if x not in LAYOUTS]
    if unknown:
        p.error(f"--layouts: unknown {', '.join(unknown)}; choose from {', '.join(LAYOUTS)}")
    if args.pretrain_steps < 0:
        p.error(f"--pretrain-steps must be >= 0; got {args.pretrain_steps}")
    try:
        args.spec = NeedleSpec(users=args.users, min_history=args.min_history, max_history=args.max_history,
                               distances=tuple(int(x) for x in args.distances.split(",")), needles=args.needles,
                               fillers=args.fillers, val_users=0.01, test_users=args.test_users, seed=args.seed)
        args.spec.check()
    except ValueError as exc:
        p.error(f"the task: {exc}")
    return args


def make_task(spec: NeedleSpec, folder: Path) -> tuple[str, pl.DataFrame]:
    """The needle log sharded under FOLDER (made once per spec); returns (data set, users)."""
    from tools.shard_histories import main as shard_main

    data = folder / "data"
    raw = write_needle_log(spec, folder / "raw") if not (data / "manifest.json").exists() else None
    if raw is not None:
        rc = shard_main(["--format", "table", "--input", raw["interactions"], "--items", raw["items"],
                         "--user-col", "user", "--item-col", "item", "--time-col", "timestamp",
                         "--split-col", "split", "--output", str(data), "--shard-size", "2000",
                         "--overwrite", "--no-progress"])
        if rc != 0:
            raise SystemExit(f"sharding the needle log failed ({rc})")
    return str(data), pl.read_parquet(folder / "raw" / "users.parquet")


def run_needle(args: argparse.Namespace) -> dict:
    spec_blob = json.dumps(dataclasses.asdict(args.spec), sort_keys=True)
    folder = Path(args.work) / f"task-{hashlib.sha256(spec_blob.encode()).hexdigest()[:10]}"
    cfg = DemoConfig(output=str(folder), model=args.model, ranks=args.ranks, cpu=args.cpu, micro_batch=args.micro_batch,
                     max_history=0, finetune_steps=args.steps, finetune_lr=args.lr, eval_examples=0,
                     eval_batch=64, beams=10, top_k=10, baselines="", pretrain_steps=args.pretrain_steps,  # HR@10: 10 beams
                     ds_config=args.ds_config)
    cfg.check()
    demo = Demo(cfg)
    t0 = time.perf_counter()
    data, users = make_task(args.spec, folder)
    cfg.data = data
    model = demo.prepare_model()
    demo.reset_runs_if_config_changed()
    results: dict[str, dict] = {}
    overall: dict[str, dict] = {}
    result = {
        "benchmark": "needle",
        "command": " ".join(["python bench/needle.py", *sys.argv[1:]]),
        "task": dataclasses.asdict(args.spec),
        "chance": {"HR@1": round(1 / args.spec.needles, 4), "HR@10": round(min(1.0, 10 / args.spec.needles), 4)},
        "model": args.model, "pretrain_steps": args.pretrain_steps, "steps": args.steps, "lr": args.lr,
        "micro_batch": args.micro_batch, "ranks": args.ranks, "ds_config": args.ds_config,
        "train_examples": int((users["split"] == "train").sum()), "machine": machine_summary(args.cpu),
        "results": results, "overall": overall, "complete": False,
    }
    common = ["--data", data, "--model", model, "--lr", str(args.lr), "--warmup-ratio", "0.05", "--grad-clip", "1.0",
              *(["--tiny-hidden", str(args.tiny_hidden)] if args.model == "tiny" else [])]
    init = []
    if args.pretrain_steps:
        pretrain = demo.train("pretrain", "launchers/pretrain.py", [*common, "--max-steps", str(args.pretrain_steps)])
        init = ["--init", pretrain]
    for layout in args.layouts.split(","):
        label = layout.replace("(", "").replace(")", "")
        run = demo.train(f"ft-{label}", "launchers/finetune.py",
                         [*common, *init, *LAYOUTS[layout], "--max-steps", str(args.steps)])
        metrics = demo.evaluate(label, data, ["--run", run], Path(run) / "eval-test", exclude_seen=False)
        fed = metrics["positions_fed_per_example"]
        per_k = hits_by_distance(str(Path(run) / "eval-test" / "predictions.jsonl"), users, ks=(1, 10))
        where = needle_segments(run, users)
        results[layout] = {str(k): {**v, "positions_fed": fed, "needle_in": where[k]} for k, v in per_k.items()}
        overall[layout] = {"HR@1": metrics["metrics"]["HR@1"], "HR@10": metrics["metrics"]["HR@10"],
                           "positions_fed_per_example": fed,
                           "text_positions_per_example": metrics["text_positions_per_example"]}
        result["complete"] = layout == args.layouts.split(",")[-1]
        save(result, demo, t0, Path(args.results) / args.name)  # after every layout: a run cut short keeps them
    print_table(result)
    return result


def save(result: dict, demo: Demo, t0: float, stem: Path) -> None:
    """STEM.json and STEM.png, each replaced atomically."""
    result["timings_s"] = {k: round(v, 1) for k, v in demo.timings.items()}
    result["total_s"] = round(time.perf_counter() - t0, 1)
    storage.write_bytes_atomic(f"{stem}.json", (json.dumps(result, indent=2) + "\n").encode())
    plot(result, Path(f"{stem}.png"))


def plot(result: dict, path: Path) -> None:
    """HR@1 against the needle's distance, one line per layout; chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=120)
    for layout, per_k in result["results"].items():
        ks = sorted(per_k, key=int)
        fed = result["overall"][layout]["positions_fed_per_example"]
        ax.plot([int(k) for k in ks], [per_k[k]["HR@1"] for k in ks], marker="o", label=f"{layout}: {fed:.0f} positions")
    ax.axhline(result["chance"]["HR@1"], linestyle="--", linewidth=1, color="gray", label="chance")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("needle distance k (items before the target, log)")
    ax.set_ylabel("HR@1")
    ax.set_title(f"needle task: {result['model']}, {result['steps']} steps, {result['train_examples']} train users",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    storage.write_bytes_atomic(str(path), png.getvalue())


def print_table(result: dict) -> None:
    ks = sorted({k for per_k in result["results"].values() for k in per_k}, key=int)
    print(f"HR@1 by needle distance k (chance {result['chance']['HR@1']:.3f})")
    print(f"{'':13}{'positions':>10}" + "".join(f"{'k=' + k:>8}" for k in ks))
    for layout, per_k in result["results"].items():
        fed = result["overall"][layout]["positions_fed_per_example"]
        print(f"{layout:13}{fed:10.0f}" + "".join(f"{per_k[k]['HR@1']:8.3f}" if k in per_k else f"{'-':>8}"
                                              for k in ks))


if __name__ == "__main__":
    args = parse_args()
    if not args.check_args:
        run_needle(args)
