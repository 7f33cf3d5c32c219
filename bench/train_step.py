"""Train-step time of text (100 items) vs PFT-S (g=5) on the same examples: PatchRec's efficiency
claim as this toolkit delivers it.

    python bench/train_step.py [--models tiny,smollm2] [--steps 12] [--data DATA]

Each (model, stage) runs the real trainer (DeepSpeed ZeRO-3, 1 rank, CPU unless a GPU is there)
for --steps optimizer steps on the same data set, seed and micro-batch; the step time is split
into data wait, patch embedding, forward, backward and optimizer (medians over the steps after
the first two). Writes bench/results/train_step.json. Target: pft-s / text step time <= 0.25.
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


def default_data(tmp: str) -> str:
    """MovieLens-100K from the recbole wheel, sharded once into TMP."""
    from patchrec_dist.data.readers import read_log
    from patchrec_dist.data.sharding import ShardOptions, shard_log
    from patchrec_dist.fetch import movielens_100k_recbole

    out = os.path.join(tmp, "ml-100k")
    shard_log(read_log("recbole", str(movielens_100k_recbole())),
              ShardOptions(output=out, shard_size="100", workers=1, progress=False), {"format": "recbole"})
    return out


def run_one(data: str, model: str, stage: str, steps: int, micro: int, out: str) -> dict:
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "1", "--master_port", str(29500 + os.getpid() % 1000),
           "launchers/finetune.py", "--data", data, "--model", model, "--stage", stage, "--group-size", "5",
           "--output", out, "--max-steps", str(steps), "--micro-batch", str(micro), "--num-workers", "1",
           "--max-history", "100", "--export", "false", "--lr", "1e-5", "--seed", "0", "--resume", "never"]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{model}/{stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    from patchrec_dist.monitor.tensorboard import read_scalars

    s = read_scalars(os.path.join(out, "tb"))
    skip = 2  # the first steps include DataLoader start-up and allocator warm-up
    med = {p: statistics.median(v for step, v in s[f"time/{p}"] if step > skip) for p in PARTS}
    positions = statistics.median(v for step, v in s["train/positions_per_s"] if step > skip)
    compression = statistics.median(v for _, v in s["train/compression"])
    return {"median_s": {k: round(v, 4) for k, v in med.items()}, "positions_per_s": round(positions, 1),
            "compression": round(compression, 3), "steps": steps, "micro_batch": micro}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--data", default=None, help="data set (default: MovieLens-100K from the recbole wheel)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train_step.json"))
    args = p.parse_args()
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    result = {"benchmark": "train_step", "command": " ".join(["python", "bench/train_step.py", *sys.argv[1:]]),
              "machine": {"device": device, "platform": platform.platform(), "torch": torch.__version__},
              "what": "median seconds per optimizer step (1 rank, ZeRO-3), steps after the first two", "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or default_data(tmp)
        result["data"] = args.data or "MovieLens-100K (recbole wheel), train split, 100-item window"
        for model in args.models.split(","):
            row = {}
            for stage in ("text", "pft-s"):
                row[stage] = run_one(data, model, stage, args.steps, args.micro_batch, os.path.join(tmp, f"{model}-{stage}"))
                print(f"{model} {stage}: {row[stage]['median_s']['step_s']:.3f} s/step", file=sys.stderr)
            row["pft_s_over_text_step_time"] = round(row["pft-s"]["median_s"]["step_s"] / row["text"]["median_s"]["step_s"], 3)
            result["runs"][model] = row
    result["target"] = {"pft_s_over_text_step_time": 0.25}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({m: r["pft_s_over_text_step_time"] for m, r in result["runs"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
