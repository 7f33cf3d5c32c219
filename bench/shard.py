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

    python bench/shard.py --scaling [--sizes 20M,60M,200M] [--work bench/work/shard_scaling] [--keep]
                          [--out-dir bench/results]

--scaling runs each size in turn, the tool's --memory-limit its default unless given (the log generated
under --work, removed after its run unless --keep; the data set always) and writes shard_scaling.json (per size:
generation time, wall time, interactions/s, peak RSS of the tool + workers and of the largest process,
sampled every 0.1 s) and shard_scaling.png. Goals: peak RSS < 4 GB at every size, >= 1M interactions/s
at the largest (200M).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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


def sample_tree_rss(proc: psutil.Process, peak: list[int], stop: threading.Event, disk: str | None = None) -> None:
    """peak[0]: the largest sum of RSS over PROC and its descendants; peak[1]: the largest single process;
    peak[2]: the most disk used on DISK's file system above the start (statvfs: the whole machine's writes)."""
    disk0 = shutil.disk_usage(disk).used if disk else 0
    while not stop.is_set():
        try:
            rss = [p.memory_info().rss for p in [proc, *proc.children(recursive=True)] if p.is_running()]
            peak[0], peak[1] = max(peak[0], sum(rss)), max([peak[1], *rss])
        except psutil.Error:
            pass
        if disk:
            peak[2] = max(peak[2], shutil.disk_usage(disk).used - disk0)
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
                             seed=seed * 100_003 + p, popularity_seed=seed)  # one Zipf order for the whole log
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


def run_tool(args: argparse.Namespace, paths: dict[str, str], work: Path) -> dict:
    """tools/shard_histories.py on PATHS, its data set and staging under WORK; wall time and sampled memory."""
    cmd = [sys.executable, str(REPO / "tools" / "shard_histories.py"), "--format", "table",
           "--input", paths["interactions"], "--items", paths["items"], "--user-col", "user",
           "--item-col", "item", "--time-col", "timestamp", "--rating-col", "rating",
           "--output", str(work / "ds"), "--workers", str(args.workers),
           "--shard-size", args.shard_size, "--no-progress", "--staging", str(work)]
    if args.memory_limit:
        cmd += ["--memory-limit", args.memory_limit]
    if args.buckets:
        cmd += ["--buckets", str(args.buckets)]
    if args.in_memory:
        cmd += ["--in-memory"]
    t1 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, stop = [0, 0, 0], threading.Event()
    sampler = threading.Thread(target=sample_tree_rss, args=(psutil.Process(proc.pid), peak, stop, str(work)),
                               daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t1
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"shard_histories.py failed ({proc.returncode}):\n{err}")
    manifest = json.loads((work / "ds" / "manifest.json").read_text())
    return {"wall_s": wall, "tree_sum": peak[0], "largest": peak[1], "disk": peak[2], "out": out.strip(),
            "shards": len(manifest["shards"]), "dataset_bytes": sum(s["bytes"] for s in manifest["shards"])}


def machine() -> dict:
    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version()}


def parse_sizes(text: str) -> list[int]:
    return [int(float(x[:-1]) * 1e6) if x.upper().endswith("M") else int(x) for x in text.split(",")]


def scaling(args: argparse.Namespace) -> int:
    """Each size of --sizes: generate the log under --work, shard it, delete it; JSON and PNG under --out-dir."""
    rows = []
    for n in parse_sizes(args.sizes):
        work = Path(args.work) / f"{n}"
        shutil.rmtree(work, ignore_errors=True)
        users = max(1, round(n / args.mean_history))
        t0 = time.perf_counter()
        paths, rows_n = write_log_in_parts(work / "raw", args.format, users, args.items, args.mean_history,
                                           args.max_history, args.part_interactions)
        gen_s = time.perf_counter() - t0
        log_bytes = os.path.getsize(paths["interactions"])
        r = run_tool(args, paths, work)
        shutil.rmtree(work / "ds", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        rows.append({"interactions": rows_n, "users": users, "generate_s": round(gen_s, 2), "log_bytes": log_bytes,
                     "wall_s": round(r["wall_s"], 2), "interactions_per_s": round(rows_n / r["wall_s"]),
                     "peak_rss_tree_sum_gb": round(r["tree_sum"] / 2**30, 3),
                     "peak_rss_largest_process_gb": round(r["largest"] / 2**30, 3),
                     "disk_peak_gb_approx": round((log_bytes + r["disk"]) / 2**30, 2), "shards": r["shards"],
                     "dataset_bytes": r["dataset_bytes"], "tool_output": r["out"]})
        print(json.dumps({k: rows[-1][k] for k in ("interactions", "generate_s", "wall_s", "interactions_per_s",
                                                   "peak_rss_tree_sum_gb", "peak_rss_largest_process_gb")}), flush=True)
    top = max(rows, key=lambda x: x["interactions"])
    result = {
        "benchmark": "shard_histories_scaling",
        "command": " ".join(["python", "bench/shard.py", *sys.argv[1:]]),
        "machine": machine(),
        "note": "the machine may be shared with other jobs: wall times include their load, and disk_peak_gb_approx "
                "(the log plus the file system's most used bytes above the tool's start, statvfs) their writes",
        "input": {"format": args.format, "items": args.items, "mean_history": args.mean_history,
                  "max_history": args.max_history, "part_interactions": args.part_interactions,
                  "distribution": "per part of --part-interactions rows (its own users and seed): power-law (Lomax, "
                                  "alpha 1.5) history lengths clipped to max_history, Zipf(1.1) items in one popularity "
                                  "order for the whole log, session-like timestamps; the file is in time order inside "
                                  "each part"},
        "tool": {"memory_limit": args.memory_limit or "default (half the machine)", "buckets": args.buckets or "auto",
                 "workers": args.workers, "shard_size": args.shard_size,
                 "path": "in-memory" if args.in_memory else "bucketed"},
        "rss_sampling": "every 0.1 s: sum over the tool and its workers, and the largest single process",
        "rows": rows,
        "goals": {
            "peak_rss_tree_sum_gb_below": {"goal": 4.0, "at": "every size",
                                           "met": all(x["peak_rss_tree_sum_gb"] < 4.0 for x in rows)},
            "interactions_per_s_at_least": {"goal": 1_000_000, "at": top["interactions"],
                                            "met": top["interactions_per_s"] >= 1_000_000},
        },
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shard_scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_scaling(result, out / "shard_scaling.png")
    print(json.dumps({k: v["met"] for k, v in result["goals"].items()}))
    return 0


def plot_scaling(result: dict, path: Path) -> None:
    """Peak RSS and throughput against the log's size, log-x; goals dashed."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from patchrec_dist.data import storage

    n = [r["interactions"] for r in result["rows"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    a.plot(n, [r["peak_rss_tree_sum_gb"] for r in result["rows"]], marker="o", label="tool + workers (sum)")
    a.plot(n, [r["peak_rss_largest_process_gb"] for r in result["rows"]], marker="s", label="largest process")
    a.axhline(4.0, linestyle="--", linewidth=1, color="gray", label="goal < 4 GB")
    a.set_ylim(0, max(4.5, *(r["peak_rss_tree_sum_gb"] * 1.1 for r in result["rows"])))
    a.set_ylabel("peak RSS (GB)")
    b.plot(n, [r["interactions_per_s"] / 1e6 for r in result["rows"]], marker="o", label="whole tool run")
    b.axhline(1.0, linestyle="--", linewidth=1, color="gray", label="goal >= 1M/s")
    b.set_ylim(0, max(1.2, *(r["interactions_per_s"] / 1e6 * 1.1 for r in result["rows"])))
    b.set_ylabel("M interactions/s")
    for ax in (a, b):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(n, [f"{x / 1e6:g}M" for x in n])
        ax.set_xlabel("interactions (log)")
        ax.legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"tools/shard_histories.py scaling, {m['cpus']} cores, {m['memory_gb']} GB, memory limit "
                 f"{result['tool']['memory_limit']}", fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    storage.write_bytes_atomic(str(path), png.getvalue())


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
    s = p.add_argument_group("--scaling: one run per size, shard_scaling.json and .png")
    s.add_argument("--scaling", action="store_true")
    s.add_argument("--sizes", default="20M,60M,200M", help="interactions, comma-separated (20M or 20000000)")
    s.add_argument("--work", default=str(REPO / "bench" / "work" / "shard_scaling"),
                   help="generated logs, staging and data sets (each size's removed after its run)")
    s.add_argument("--keep", action="store_true", help="keep each generated log under --work")
    s.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    if args.scaling:
        return scaling(args)
    if args.interactions:
        args.users = max(1, round(args.interactions / args.mean_history))

    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        t0 = time.perf_counter()
        paths, n = write_log_in_parts(Path(tmp) / "raw", args.format, args.users, args.items, args.mean_history,
                                      args.max_history, args.part_interactions)
        gen_s = time.perf_counter() - t0
        try:
            r = run_tool(args, paths, Path(tmp))
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        import resource

        largest = max(r["largest"], resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
        wall = r["wall_s"]

    result = {
        "benchmark": "shard_histories",
        "command": " ".join(["python", "bench/shard.py", *sys.argv[1:]]),
        "machine": machine(),
        "input": {"format": args.format, "interactions": n, "users": args.users, "items": args.items,
                  "max_history": args.max_history, "generate_s": round(gen_s, 2)},
        "path": "in-memory" if args.in_memory else "bucketed", "memory_limit": args.memory_limit,
        "buckets": args.buckets or "auto",
        "shards": r["shards"], "dataset_bytes": r["dataset_bytes"], "workers": args.workers,
        "wall_s": round(wall, 2),
        "interactions_per_s": round(n / wall),
        "peak_rss_largest_process_gb": round(largest / 2**30, 3),
        "peak_rss_tree_sum_gb": round(r["tree_sum"] / 2**30, 3),
        "targets": {"interactions_per_s": 1_000_000, "peak_rss_gb": 4.0},
        "tool_output": r["out"],
    }
    result["meets_targets"] = bool(result["interactions_per_s"] >= 1_000_000 and result["peak_rss_tree_sum_gb"] < 4.0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("path", "interactions_per_s", "wall_s", "peak_rss_largest_process_gb",
                                              "peak_rss_tree_sum_gb", "meets_targets")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
