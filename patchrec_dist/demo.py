"""`make demo`: the main job on embedded defaults.

Until training and evaluation land, the demo shards MovieLens-100K (from the recbole wheel) and
prints what the history stream would feed a run: counts, history lengths, batches per rank.
"""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console
from rich.table import Table

from patchrec_dist.data.manifest import SPLITS, load_manifest
from patchrec_dist.data.readers import read_log
from patchrec_dist.data.sharding import ShardOptions, options_summary, shard_log
from patchrec_dist.data.stream import StreamConfig, StreamLoader, stream_statistics
from patchrec_dist.fetch import movielens_100k_recbole


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make demo ARGS=...", description=__doc__)
    p.add_argument("--output", default="demo_out", help="where the demo writes its data set and runs")
    p.add_argument("--world", type=int, default=2, help="ranks to plan the stream for")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--micro-batch", type=int, default=16)
    args = p.parse_args(argv)
    console = Console()

    t0 = time.perf_counter()
    folder = movielens_100k_recbole()
    console.print(f"MovieLens-100K (RecBole atomic files from the recbole wheel): {folder}")
    data = f"{args.output}/data/ml-100k"
    opts = ShardOptions(output=data, overwrite=True, shard_size="100", progress=False)
    log = read_log("recbole", str(folder))
    manifest = shard_log(log, opts, {"format": "recbole", "input": str(folder), "options": options_summary(opts)})
    console.print(f"sharded into {len(manifest.shards)} shards at {data} ({time.perf_counter() - t0:.1f}s)")

    manifest = load_manifest(data)
    stats = stream_statistics(manifest, "train")
    table = Table(title="MovieLens-100K history stream")
    table.add_column("what")
    table.add_column("value", justify="right")
    c = manifest.counts
    for k in ("users", "items", "interactions"):
        table.add_row(k, f"{c[k]:,}")
    for s in SPLITS:
        table.add_row(f"{s} examples", f"{c['examples'][s]:,}")
    h = stats["history_length"]
    table.add_row("history length mean / median / max", f"{h['mean']:.1f} / {h['median']:.0f} / {h['max']}")
    cfg = StreamConfig(split="train", batch_size=args.micro_batch, num_workers=args.workers)
    t1 = time.perf_counter()
    loader = StreamLoader(manifest, cfg, rank=0, world=args.world)
    n = sum(len(b) for b in loader)
    rate = n / (time.perf_counter() - t1)
    table.add_row(f"batches per rank ({args.world} ranks x {args.workers} workers, micro-batch {args.micro_batch})",
                  f"{len(StreamLoader(manifest, cfg, rank=0, world=args.world)):,}")
    table.add_row("rank 0 stream rate (examples/s)", f"{rate:,.0f}")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
