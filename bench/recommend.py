"""Batch recommendation speed: users/s per rank for every user of MovieLens-100K.

    python bench/recommend.py [--models tiny,smollm2] [--ranks 2] [--max-history 0] [--users N]

For each model, a run folder whose export is that model (untrained: speed does not depend on
the weights) with the PFT-S(5) layout, then `launchers/recommend.py` on --ranks CPU ranks
through the project's launcher (20 beams, top 20) over every user (or the first --users),
from the whole history (--max-history 0). Beside the speed: the history positions PFT-S feeds
per user against the all-text prompt of the same histories. Writes bench/results/recommend.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.train_step import default_data  # noqa: E402  (MovieLens-100K from the recbole wheel, sharded)


def make_run(folder: Path, model: str, data: str) -> Path:
    """RUN/final = the model's HF folder, RUN/config.json = a PFT-S(5) run on DATA."""
    from patchrec_dist.data.catalog import catalog_titles
    from patchrec_dist.data.manifest import load_manifest
    from patchrec_dist.model.tiny import save_tiny_model

    final = folder / "final"
    if model == "tiny":
        save_tiny_model(str(final), catalog_titles(load_manifest(data)), vocab_size=1024)
    else:
        from patchrec_dist.model.smollm2 import smollm2_model_dir

        shutil.copytree(smollm2_model_dir(), final)
    (folder / "config.json").write_text(json.dumps({"data": data, "layout": {"stage": "pft-s", "group_size": 5}}))
    return folder


def positions_per_user(run: Path, data: str, max_history: int, users: int | None) -> dict:
    """History positions fed under the run's layout, and as all text, per user (whole histories)."""
    from transformers import AutoTokenizer

    from patchrec_dist.data.catalog import catalog_titles
    from patchrec_dist.data.manifest import load_manifest
    from patchrec_dist.data.stream import read_shard
    from patchrec_dist.evaluate.recommend import history_example
    from patchrec_dist.model.load import with_patchrec_vocabulary
    from patchrec_dist.patching.features import Patcher
    from patchrec_dist.patching.layouts import LayoutSpec
    from patchrec_dist.patching.prompt import build_prompt_tokens, resolve_template

    manifest = load_manifest(data)
    tokenizer = with_patchrec_vocabulary(AutoTokenizer.from_pretrained(run / "final"))
    tokens = build_prompt_tokens(tokenizer, resolve_template(manifest.prompt), catalog_titles(manifest))
    patcher = Patcher(tokens, LayoutSpec("pft-s", group_size=5))
    records = [r for s in range(len(manifest.shards)) for r in read_shard(manifest, s) if len(r.items)]
    fed, text = [], []
    for r in records[:users]:
        history = r.items[-max_history:] if max_history else r.items
        f = patcher(history_example(history, 0))[0]
        fed.append(f.history_positions)
        text.append(f.text_positions)
    return {"users": len(fed), "fed_mean": round(statistics.mean(fed), 1), "all_text_mean": round(statistics.mean(text), 1),
            "fed_over_all_text": round(sum(fed) / sum(text), 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--max-history", type=int, default=0, help="0: the whole history")
    p.add_argument("--users", type=int, default=None, help="only the first N users (default: all)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "recommend.json"))
    args = p.parse_args()
    report = {"benchmark": "recommend", "command": " ".join(["python", "bench/recommend.py", *sys.argv[1:]]),
              "machine": {"device": "CPU", "cpus": os.cpu_count(), "platform": platform.platform()},
              "data": "MovieLens-100K (recbole wheel), leave-one-out", "layout": "pft-s(5)", "beams": 20, "top_k": 20,
              "ranks": args.ranks, "max_history": args.max_history, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = default_data(tmp)
        for model in args.models.split(","):
            run = make_run(Path(tmp, f"run-{model}"), model, data)
            out = Path(tmp, f"recs-{model}")
            cmd = [sys.executable, "-m", "patchrec_dist.launch", "--nproc", str(args.ranks), "--cpu", "--not-resumable",
                   "launchers/recommend.py", "--run", str(run), "--output", str(out), "--top-k", "20", "--beams", "20",
                   "--max-history", str(args.max_history)]
            users_file = None
            if args.users:
                from patchrec_dist.data.manifest import load_manifest
                from patchrec_dist.data.stream import read_shard

                manifest = load_manifest(data)
                ids = [r.user for s in range(len(manifest.shards)) for r in read_shard(manifest, s) if len(r.items)]
                users_file = Path(tmp, f"users-{model}.txt")
                users_file.write_text("\n".join(ids[: args.users]) + "\n")
                cmd += ["--users", str(users_file)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True,
                                  text=True, timeout=7200)
            if proc.returncode != 0:
                raise SystemExit(f"{model} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            summary = json.loads((out / "recommendations.json").read_text())
            per_rank = summary["users"] / summary["seconds"] / args.ranks
            report["models"][model] = {
                "users": summary["users"], "rows": summary["rows"], "seconds": summary["seconds"],
                "wall_s": round(time.perf_counter() - t0, 1), "users_per_s_per_rank": round(per_rank, 2),
                "positions": positions_per_user(run, data, args.max_history, args.users),
            }
            print(json.dumps({model: report["models"][model]}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
