"""Train-step time of text (100 items) vs PFT-S (g=5) on the same examples, against the limit the
method allows (the ratio of positions fed): PatchRec's efficiency claim as this toolkit delivers it.

    python bench/train_step.py [--models tiny,smollm2,llama1b] [--micro-batches 2,8]
                               [--packing on,off] [--steps 6] [--data DATA] [--compare-precision] [--out FILE]

Each (model, micro-batch, packing, stage) runs the real trainer (DeepSpeed ZeRO-3, 1 rank, CPU
unless a GPU is there, bf16 on a GPU: the trainer's default) through the project's launcher for
--steps optimizer steps on the same data set, seed and examples; the step time is split into data
wait, patch embedding, forward, backward and optimizer (medians over the steps after the first
two), with tokens/s and, on a GPU with a known peak, the model FLOPs utilisation (6 x parameters x
tokens/s over the chip's dense bf16 peak; attention's own FLOPs left out). Per (model, micro-batch)
the summary sets the step-time ratio pft-s / text, packed and padded, beside the ratio of input
positions fed (prompt, history and answer: what the LLM must compute, the limit) and of history
positions alone, and names what keeps the step ratio above the limit with its measured share.
`llama1b` is a random Llama with Llama-3.2-1B's shape (--llama-layers deep) and SmolLM2's
tokenizer. --compare-precision also trains the first model one step in fp32 and one in bf16 on the
same batch and records both losses. Writes bench/results/train_step.json.
Goal (CPU): pft-s / text step time <= 0.20 for SmolLM2 at micro-batch 8, packed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("data_wait_s", "embed_s", "forward_s", "backward_s", "optimizer_s", "step_s")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16, SXM (NVIDIA's datasheets)


def model_source(model: str, tmp: str, layers: int) -> str:
    """--model for the trainer: tiny and smollm2 as they are; llama1b a random HF folder made once."""
    if model != "llama1b":
        return model
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from patchrec_dist.model.smollm2 import smollm2_model_dir
    from patchrec_dist.model.tiny import llama_1b_config

    out = os.path.join(tmp, f"llama1b-{layers}")
    if not os.path.exists(os.path.join(out, "config.json")):
        tok = AutoTokenizer.from_pretrained(smollm2_model_dir())  # its 49k ids fit the 128k vocabulary
        config = llama_1b_config(layers=layers)
        config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
        tok.save_pretrained(out)
    return out


def parameters(source: str) -> int:
    """Parameters of the model at SOURCE, counted on the meta device (nothing allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from patchrec_dist.model.smollm2 import smollm2_model_dir

    if source == "tiny":
        return 0
    folder = str(smollm2_model_dir()) if source == "smollm2" else source
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return sum(p.numel() for p in model.parameters())


def default_data(tmp: str) -> str:
    """MovieLens-100K from the recbole wheel, sharded once into TMP."""
    from patchrec_dist.data.readers import read_log
    from patchrec_dist.data.sharding import ShardOptions, shard_log
    from patchrec_dist.fetch import movielens_100k_recbole

    out = os.path.join(tmp, "ml-100k")
    shard_log(read_log("recbole", str(movielens_100k_recbole())),
              ShardOptions(output=out, shard_size="100", workers=1, progress=False), {"format": "recbole"})
    return out


def run_one(data: str, model: str, stage: str, steps: int, micro: int, out: str, extra: tuple[str, ...] = (),
            first_loss_only: bool = False, packing: bool = True, profile: bool = False,
            ds_config: str = "ds_configs/zero3.json") -> dict:
    import torch

    cmd = [sys.executable, "-m", "patchrec_dist.launch", "--nproc", "1", *([] if torch.cuda.is_available() else ["--cpu"]),
           "launchers/finetune.py", "--data", data, "--model", model, "--stage", stage, "--group-size", "5",
           "--output", out, "--max-steps", str(steps), "--micro-batch", str(micro), "--num-workers", "1",
           "--max-history", "100", "--export", "false", "--lr", "1e-5", "--seed", "0", "--resume", "never",
           "--packing", str(packing).lower(), *(["--profile-steps", str(steps)] if profile else []),
           "--ds-config", ds_config, *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{model}/{stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    from patchrec_dist.monitor.tensorboard import read_scalars

    s = read_scalars(os.path.join(out, "tb"))
    if first_loss_only:  # the precision comparison
        return {"loss": s["train/loss"][0][1]}
    skip = 2  # the first steps include DataLoader start-up and allocator warm-up
    last = steps - 1 if profile else steps  # the profiled last step runs slower: not timed

    def timed(values):
        return statistics.median(v for step, v in values if skip < step <= last)

    med = {p: timed(s[f"time/{p}"]) for p in PARTS}
    tokens = timed(s["train/tokens_per_s"])
    positions = timed(s["train/positions_per_s"])
    compression = statistics.median(v for _, v in s["train/compression"])
    # the same examples in both stages (same seed and data): per-run totals over all steps compare exactly
    return {"median_s": {k: round(v, 4) for k, v in med.items()}, "positions_per_s": round(positions, 1),
            "tokens_per_s": round(tokens, 1), "compression": round(compression, 3), "steps": steps,
            "micro_batch": micro, "packing": packing,
            "input_positions": int(sum(v for _, v in s["train/input_positions"])),
            "padding_frac": round(statistics.median(v for _, v in s["train/padding_frac"]), 4),
            **({"profile": top_ops(os.path.join(out, "profile", "ops.json"))} if profile else {})}


def top_ops(path: str, n: int = 12) -> dict:
    """The profiled step's N operators with the most self time (the trainer's --profile-steps)."""
    table = json.loads(Path(path).read_text())
    return {"step": table["steps"][0], "sorted_by": table["sorted_by"], "total_self_cpu_ms": table["total_self_cpu_ms"],
            "total_self_device_ms": table["total_self_device_ms"], "ops": table["ops"][:n]}


def summarise(runs: dict[str, dict]) -> dict:
    """One (model, micro-batch): step-time ratios against the positions ratio, and where the rest goes."""
    out: dict = {}
    for packing, pair in runs.items():
        text, pfts = pair["text"], pair["pft-s"]
        out.setdefault("step_time_ratio", {})[packing] = round(pfts["median_s"]["step_s"] / text["median_s"]["step_s"], 3)
        fb = {k: r["median_s"]["forward_s"] + r["median_s"]["backward_s"] for k, r in pair.items()}
        out.setdefault("forward_backward_ratio", {})[packing] = round(fb["pft-s"] / fb["text"], 3)
        out.setdefault("padding_frac", {})[packing] = {k: r["padding_frac"] for k, r in pair.items()}
    any_pair = next(iter(runs.values()))
    out["input_positions_ratio"] = round(any_pair["pft-s"]["input_positions"] / any_pair["text"]["input_positions"], 3)
    out["history_positions_ratio"] = any_pair["pft-s"]["compression"]
    best = runs.get("packed", any_pair)["pft-s"]["median_s"]
    step = best["step_s"]
    # the pft-s step's parts that do not shrink with positions: the optimizer (fixed per step), the
    # patch embedding, data wait and whatever the engine spends outside forward/backward
    other = step - sum(best[k] for k in ("data_wait_s", "embed_s", "forward_s", "backward_s", "optimizer_s"))
    out["pft_s_step_shares"] = {k.removesuffix("_s"): round(best[k] / step, 3)
                                for k in ("optimizer_s", "forward_s", "backward_s", "embed_s", "data_wait_s")}
    out["pft_s_step_shares"]["other"] = round(max(0.0, other) / step, 3)
    # forward+backward as fixed + per-position cost, fitted through the two stages' points (same
    # examples, packed): the fixed part is what every micro-step pays whatever it feeds (ZeRO-3's
    # parameter gathers and gradient partitioning, module hooks, the embedding's dense gradient)
    pair = runs.get("packed", any_pair)
    (p1, t1), (p2, t2) = ((pair[k]["input_positions"] / pair[k]["steps"],
                           pair[k]["median_s"]["forward_s"] + pair[k]["median_s"]["backward_s"]) for k in ("pft-s", "text"))
    per_position = (t2 - t1) / max(1e-9, p2 - p1)
    fixed = max(0.0, t1 - per_position * p1)
    out["forward_backward_fit"] = {"fixed_s": round(fixed, 4), "per_1k_positions_s": round(per_position * 1e3, 4),
                                   "fixed_share_of_pft_s_step": round(fixed / step, 3)}
    return out


def mfu(tokens_per_s: float, params: int, device: str) -> float | None:
    peak = next((f for name, f in PEAK_BF16_FLOPS.items() if name in device), None)
    return round(6 * params * tokens_per_s / peak, 4) if peak and params else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro-batches", default="2,8", help="comma-separated micro-batch sizes")
    p.add_argument("--packing", default="on,off", help="on, off or on,off: packed and/or padded micro-batches")
    p.add_argument("--data", default=None, help="data set (default: MovieLens-100K from the recbole wheel)")
    p.add_argument("--llama-layers", type=int, default=16, help="llama1b: depth (16 in Llama-3.2-1B)")
    p.add_argument("--compare-precision", action="store_true", help="the first model: one step fp32, one bf16")
    p.add_argument("--ds-config", default="ds_configs/zero3.json", help="DeepSpeed config of every run (ZeRO-3: "
                                                                          "what 1B-8B models need)")
    p.add_argument("--profile", action="store_true", help="profile each run's last step (torch.profiler; "
                                                              "not timed): its top operators go into the JSON")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train_step.json"))
    p.add_argument("--check-args", action="store_true", help="check the arguments and exit (bench/gpu_check.sh --dry-run)")
    args = p.parse_args()
    if args.data and not Path(args.data, "manifest.json").exists():
        p.error(f"--data {args.data}: no manifest.json there")
    unknown = sorted(set(args.models.split(",")) - {"tiny", "smollm2", "llama1b"})
    if unknown:
        p.error(f"--models: unknown {', '.join(unknown)}; choose from tiny, smollm2, llama1b")
    if not set(args.packing.split(",")) <= {"on", "off"}:
        p.error(f"--packing {args.packing}: expected on, off or on,off")
    if not all(m.isdigit() and int(m) > 0 for m in args.micro_batches.split(",")):
        p.error(f"--micro-batches {args.micro_batches}: expected positive integers, comma-separated")
    if args.steps < 3 + args.profile:
        p.error(f"--steps must be >= {3 + args.profile} (the first two are warm-up{', the last profiled' if args.profile else ''})")
    if args.check_args:
        return 0
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    result = {"benchmark": "train_step", "command": " ".join(["python", "bench/train_step.py", *sys.argv[1:]]),
              "machine": {"device": device, "platform": platform.platform(), "torch": torch.__version__},
              "ds_config": args.ds_config,
              "what": "median seconds per optimizer step (1 rank, --ds-config), steps after the first two; "
                      "runs[model][micro_batch_N][packed|padded][stage]", "runs": {}, "summary": {}}
    packings = [p == "on" for p in args.packing.split(",")]
    result["target"] = {"smollm2_micro_batch_8_packed_step_time_ratio": 0.20}
    result["complete"] = False

    def save() -> None:
        """Rewrite --out after every run: a run cut short (a lent GPU's time limit) keeps what finished."""
        from patchrec_dist.data import storage

        storage.write_bytes_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or default_data(tmp)
        result["data"] = args.data or "MovieLens-100K (recbole wheel), train split, 100-item window"
        for model in args.models.split(","):
            source = model_source(model, tmp, args.llama_layers)
            row = {"parameters": parameters(source), **({"layers": args.llama_layers} if model == "llama1b" else {})}
            for micro in (int(m) for m in args.micro_batches.split(",")):
                cell = row[f"micro_batch_{micro}"] = {}
                for packing in packings:
                    pair = cell["packed" if packing else "padded"] = {}
                    for stage in ("text", "pft-s"):
                        name = f"{model}-mb{micro}-{'packed' if packing else 'padded'}-{stage}"
                        pair[stage] = run_one(data, source, stage, args.steps, micro, os.path.join(tmp, name),
                                              packing=packing, profile=args.profile, ds_config=args.ds_config)
                        pair[stage]["mfu"] = mfu(pair[stage]["tokens_per_s"], row["parameters"], device)
                        print(f"{name}: {pair[stage]['median_s']['step_s']:.3f} s/step", file=sys.stderr)
                        result["runs"][model] = row
                        save()
                result["summary"].setdefault(model, {})[f"micro_batch_{micro}"] = summarise(cell)
            if args.compare_precision and model == args.models.split(",")[0]:  # before a larger model's runs
                micro = int(args.micro_batches.split(",")[0])
                losses = {name: run_one(data, source, "pft-s", 1, micro, os.path.join(tmp, f"precision-{name}"),
                                        ("--bf16", flag), first_loss_only=True, ds_config=args.ds_config)["loss"]
                          for name, flag in (("fp32", "false"), ("bf16", "true"))}
                result["precision"] = {"model": model, "stage": "pft-s", "first_step_loss": losses,
                                       "relative_difference": round(abs(losses["bf16"] - losses["fp32"]) / losses["fp32"], 5)}
                save()
    result["complete"] = True
    save()
    print(json.dumps({m: {mb: c["step_time_ratio"] for mb, c in r.items()} for m, r in result["summary"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
