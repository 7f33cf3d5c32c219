"""Sharding throughput and memory: tools/shard_histories.py on a synthetic 20M-interaction log.

    python bench/shard.py [--users 200000 --mean-history 100] [--format parquet|csv]

Writes bench/results/shard.json: interactions/s of the whole tool run (read, clean, sort, split,
write shards, manifest) and its peak memory (largest process, and the sampled sum over the tool
and its shard-writing workers). Targets: >= 1M interactions/s on 2 cores, peak RSS < 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from patchrec_dist.data.synthetic import SyntheticSpec, generate_log, write_log

REPO = Path(__file__).resolve().parents[1]


def sample_tree_rss(proc: psutil.Process, peak: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            procs = [proc, *proc.children(recursive=True)]
            peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--mean-history", type=float, default=100.0)
    p.add_argument("--max-history", type=int, default=20_000)
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--shard-size", default="64MB")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "shard.json"))
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        t0 = time.perf_counter()
        spec = SyntheticSpec(users=args.users, items=args.items, mean_history=args.mean_history,
                             max_history=args.max_history, seed=0)
        inter, items = generate_log(spec)
        paths = write_log(inter, items, Path(tmp) / "raw", args.format)
        n = inter.height
        gen_s = time.perf_counter() - t0
        del inter, items
        cmd = [sys.executable, str(REPO / "tools" / "shard_histories.py"), "--format", "table",
               "--input", paths["interactions"], "--items", paths["items"], "--user-col", "user",
               "--item-col", "item", "--time-col", "timestamp", "--rating-col", "rating",
               "--output", str(Path(tmp) / "ds"), "--workers", str(args.workers),
               "--shard-size", args.shard_size, "--no-progress"]
        t1 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak, stop = [0], threading.Event()
        sampler = threading.Thread(target=sample_tree_rss, args=(psutil.Process(proc.pid), peak, stop), daemon=True)
        sampler.start()
        out, err = proc.communicate()
        wall = time.perf_counter() - t1
        stop.set()
        sampler.join()
        if proc.returncode != 0:
            print(err, file=sys.stderr)
            return 1
        import resource

        largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        manifest = json.loads((Path(tmp) / "ds" / "manifest.json").read_text())
        ds_bytes = sum(s["bytes"] for s in manifest["shards"])

    result = {
        "benchmark": "shard_histories",
        "command": " ".join(["python", "bench/shard.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "platform": platform.platform(), "python": platform.python_version()},
        "input": {"format": args.format, "interactions": n, "users": args.users, "items": args.items,
                  "max_history": args.max_history, "generate_s": round(gen_s, 2)},
        "shards": len(manifest["shards"]), "dataset_bytes": ds_bytes, "workers": args.workers,
        "wall_s": round(wall, 2),
        "interactions_per_s": round(n / wall),
        "peak_rss_largest_process_gb": round(largest / 2**30, 3),
        "peak_rss_tree_sum_gb": round(peak[0] / 2**30, 3),
        "targets": {"interactions_per_s": 1_000_000, "peak_rss_gb": 4.0},
        "tool_output": out.strip(),
    }
    result["meets_targets"] = bool(result["interactions_per_s"] >= 1_000_000 and result["peak_rss_tree_sum_gb"] < 4.0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("interactions_per_s", "wall_s", "peak_rss_largest_process_gb",
                                              "peak_rss_tree_sum_gb", "meets_targets")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
