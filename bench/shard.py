"""Sharding throughput and memory: tools/shard_histories.py on a synthetic log (20M interactions by default).

    python bench/shard.py [--interactions 20000000] [--mean-history 100] [--format parquet|csv]
                          [--memory-limit 2GB] [--buckets N] [--in-memory]

The log is generated out of core: in parts of at most --part-interactions, each a synthetic log of its
own users (data/synthetic.py, seeded per part, in time order inside the part), appended to one
Parquet file (a row group per part) or CSV file; never the whole log in memory.

Writes bench/results/shard.json: interactions/s of the whole tool run (read, clean, sort, split,
write shards, manifest) and its peak memory (largest process, and the sampled sum over the tool
and its workers). Targets: >= 1M interactions/s on 2 cores, peak RSS < 4 GB and, for the bounded
path, not growing with the log. --in-memory measures the previous path (the whole log in memory).
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

PART_INTERACTIONS = 2_000_000

REPO = Path(__file__).resolve().parents[1]


def sample_tree_rss(proc: psutil.Process, peak: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            procs = [proc, *proc.children(recursive=True)]
            peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)


def write_log_in_parts(folder: Path, fmt: str, users: int, items: int, mean_history: float, max_history: int,
                       part_interactions: int = PART_INTERACTIONS, seed: int = 0) -> tuple[dict[str, str], int]:
    """The synthetic log in parts of about PART_INTERACTIONS rows, appended to one file; returns (paths, rows)."""
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    parts = max(1, -(-int(users * mean_history) // part_interactions))
    bounds = [users * p // parts for p in range(parts + 1)]
    inter_path = folder / f"interactions.{fmt}"
    rows, writer = 0, None
    for p in range(parts):
        n_users = bounds[p + 1] - bounds[p]
        spec = SyntheticSpec(users=n_users, items=items, mean_history=mean_history, max_history=max_history,
                             seed=seed * 100_003 + p)
        inter, item_frame = generate_log(spec)
        inter = inter.with_columns(user=inter["user"] + bounds[p])  # this part's users: bounds[p] + 1 ...
        if p == 0:
            paths = write_log(inter.head(0), item_frame, folder / "items-only", "parquet" if fmt == "parquet" else "csv")
        rows += inter.height
        if fmt == "parquet":
            table = inter.select("user", "item", "rating", "timestamp").to_arrow()
            writer = writer or pq.ParquetWriter(inter_path, table.schema)
            writer.write_table(table)
        else:
            with open(inter_path, "ab" if p else "wb") as fh:
                inter.select("user", "item", "rating", "timestamp").write_csv(fh, include_header=p == 0)
        del inter
    if writer is not None:
        writer.close()
    return {"interactions": str(inter_path), "items": paths["items"]}, rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interactions", type=int, default=None, help="log size (default: users x mean history)")
    p.add_argument("--users", type=int, default=200_000, help="used when --interactions is not given")
    p.add_argument("--part-interactions", type=int, default=PART_INTERACTIONS, help="rows generated at a time")
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--mean-history", type=float, default=100.0)
    p.add_argument("--max-history", type=int, default=20_000)
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--shard-size", default="64MB")
    p.add_argument("--memory-limit", default=None, help="passed to the tool (default: its own, half the machine)")
    p.add_argument("--buckets", type=int, default=0, help="passed to the tool (default 0: automatic)")
    p.add_argument("--in-memory", action="store_true", help="the previous path: the whole log in memory")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "shard.json"))
    args = p.parse_args()
    if args.interactions:
        args.users = max(1, round(args.interactions / args.mean_history))

    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        t0 = time.perf_counter()
        paths, n = write_log_in_parts(Path(tmp) / "raw", args.format, args.users, args.items, args.mean_history,
                                      args.max_history, args.part_interactions)
        gen_s = time.perf_counter() - t0
        cmd = [sys.executable, str(REPO / "tools" / "shard_histories.py"), "--format", "table",
               "--input", paths["interactions"], "--items", paths["items"], "--user-col", "user",
               "--item-col", "item", "--time-col", "timestamp", "--rating-col", "rating",
               "--output", str(Path(tmp) / "ds"), "--workers", str(args.workers),
               "--shard-size", args.shard_size, "--no-progress", "--staging", tmp]
        if args.memory_limit:
            cmd += ["--memory-limit", args.memory_limit]
        if args.buckets:
            cmd += ["--buckets", str(args.buckets)]
        if args.in_memory:
            cmd += ["--in-memory"]
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
        "path": "in-memory" if args.in_memory else "bucketed", "memory_limit": args.memory_limit,
        "buckets": args.buckets or "auto",
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
    print(json.dumps({k: result[k] for k in ("path", "interactions_per_s", "wall_s", "peak_rss_largest_process_gb",
                                              "peak_rss_tree_sum_gb", "meets_targets")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
