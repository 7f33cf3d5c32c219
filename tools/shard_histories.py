#!/usr/bin/env python
"""Turn interaction logs into a sharded WebDataset data set (local path or any fsspec URL).

    python tools/shard_histories.py --format movielens --input ml-1m/ --output s3://bucket/ml1m
    python tools/shard_histories.py --format patchrec --trust-pickle --input ../shared/data/patchrec/ml-100k --output data/ml100k

docs/data_format.md describes the output. Exit status: 0 on success, 2 on bad input or flags.

Memory: the log is streamed once into hash buckets of the user on local disk (--staging), and every
later step holds one bucket or one shard window per process, within --memory-limit (default: half of
the machine); only one small row per user and per item is held whole. A Parquet, CSV or TSV table is
read in chunks; the other formats are read whole first, as before. --in-memory is the old path (the
whole log in memory); both write the same bytes.

Beyond one machine: --engine ray --engine-address HOST:PORT runs the same passes as tasks of an
existing Ray cluster (docs/sharding_at_scale.md), the buckets under --output (S3), the same bytes as
--engine local. Exit status 1: the engine failed (a task still failing after its retries); no
manifest is written and the staging files are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from patchrec_dist.data import storage
from patchrec_dist.data.bucketed import (
    BucketOptions,
    parse_size,
    shard_log_bucketed,
    source_from_rawlog,
    source_from_table,
    streams_table,
)
from patchrec_dist.data.engines import ENGINES, EngineError
from patchrec_dist.data.manifest import DataSetError
from patchrec_dist.data.readers import FORMATS, InputError, read_log
from patchrec_dist.data.sharding import (
    ShardOptions,
    check_output,
    default_workers,
    options_summary,
    shard_log,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="input folder (recbole, movielens, patchrec) or interactions file (table)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, help="output folder or URL (s3://bucket/prefix)")
    p.add_argument("--storage-options", default=None,
                   help="fsspec storage options as JSON, e.g. '{\"client_kwargs\": {\"endpoint_url\": ...}}'; "
                        "credentials are better left to the environment (AWS_ACCESS_KEY_ID, ...)")
    p.add_argument("--encoding", default=None, help="text encoding of the input (default utf-8; latin-1 for movielens)")
    g = p.add_argument_group("format-specific")
    g.add_argument("--title-field", default=None, help="recbole: title column of NAME.item (default: first *title* column)")
    g.add_argument("--trust-pickle", action="store_true", help="patchrec: allow unpickling seq.df (runs code from the file)")
    g.add_argument("--items", default=None, help="table: items table (csv/tsv/parquet/jsonl)")
    g.add_argument("--user-col", default="user_id")
    g.add_argument("--item-col", default="item_id")
    g.add_argument("--time-col", default="timestamp")
    g.add_argument("--rating-col", default=None)
    g.add_argument("--items-item-col", default=None, help="table: item id column of the items table (default: --item-col)")
    g.add_argument("--title-col", default="title")
    g.add_argument("--split-col", default=None,
                   help="table: a column marking each target row train, val or test (empty: history only); "
                        "implies --split keep")
    f = p.add_argument_group("filters and split")
    f.add_argument("--min-rating", type=float, default=None)
    f.add_argument("--min-user-interactions", type=int, default=0, help="k-core: users need at least this many")
    f.add_argument("--min-item-interactions", type=int, default=0, help="k-core: items need at least this many")
    f.add_argument("--dedupe", choices=("none", "exact", "first"), default="exact",
                   help="exact: drop repeated (user, item, time) rows; first: keep only a user's first interaction with an item")
    f.add_argument("--drop-unknown-items", action="store_true", help="drop (and count) interactions with items missing from the items table")
    f.add_argument("--split", choices=("global-time", "leave-one-out", "keep"), default=None,
                   help="default: keep for patchrec and with --split-col, global-time otherwise")
    f.add_argument("--split-fractions", default="0.96,0.02,0.02", help="global-time: train,val,test fractions of all interactions")
    o = p.add_argument_group("output")
    o.add_argument("--shard-size", default="2000", help="users per shard (2000) or a byte size (64MB)")
    o.add_argument("--workers", type=int, default=default_workers(), help="processes for the buckets and the shards")
    o.add_argument("--overwrite", action="store_true", help="replace an existing data set at --output")
    o.add_argument("--no-progress", action="store_true")
    m = p.add_argument_group("memory")
    m.add_argument("--memory-limit", default=None,
                   help="working set of the whole run (main process and workers), e.g. 8GB; default: half of "
                        "the machine's memory (or of its cgroup limit). A user whose history alone does not fit a "
                        "worker's share (limit / (workers + 1)) is refused, by name")
    m.add_argument("--buckets", type=int, default=0, help="hash buckets of the user (default 0: from the log's size "
                                                         "and --memory-limit); the output does not depend on it")
    m.add_argument("--staging", default=None, help="folder for the bucket files (default: the system's temp "
                                                  "folder; with --engine ray, under --output); removed at the end, "
                                                  "success or not")
    e = p.add_argument_group("engine")
    e.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: this machine's processes (--workers); ray: the tasks of an existing Ray cluster")
    e.add_argument("--engine-address", default=None,
                   help="ray: the cluster's address, HOST:PORT of `ray start --head` (default: $RAY_ADDRESS)")
    m.add_argument("--in-memory", action="store_true", help="the previous path: the whole log in memory (same output)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        storage_options = json.loads(args.storage_options) if args.storage_options else {}
    except json.JSONDecodeError as exc:
        print(f"shard_histories: error: --storage-options is not JSON: {exc}", file=sys.stderr)
        return 2
    try:
        fractions = tuple(float(x) for x in args.split_fractions.split(","))
        if len(fractions) != 3:
            raise ValueError
    except ValueError:
        print(f"shard_histories: error: --split-fractions {args.split_fractions!r}: three numbers, e.g. 0.96,0.02,0.02", file=sys.stderr)
        return 2
    if args.split_col and args.split not in (None, "keep"):
        print(f"shard_histories: error: --split-col {args.split_col} is the log's own split; it needs --split keep, "
              f"not --split {args.split}", file=sys.stderr)
        return 2
    for flag in ("min_user_interactions", "min_item_interactions", "workers", "buckets"):
        if getattr(args, flag) < 0:
            print(f"shard_histories: error: --{flag.replace('_', '-')} must be >= 0", file=sys.stderr)
            return 2
    opts = ShardOptions(
        output=args.output, storage_options=storage_options, min_rating=args.min_rating,
        min_user_interactions=args.min_user_interactions, min_item_interactions=args.min_item_interactions,
        dedupe=args.dedupe, split=args.split or ("keep" if args.format == "patchrec" or args.split_col else "global-time"),
        split_fractions=fractions, shard_size=args.shard_size, workers=max(1, args.workers),
        overwrite=args.overwrite, drop_unknown_items=args.drop_unknown_items, progress=not args.no_progress,
    )
    address = args.engine_address or os.environ.get("RAY_ADDRESS") or None
    if args.engine == "ray":
        problem = None
        if not address:
            problem = ("--engine ray needs the cluster's address: --engine-address HOST:PORT (as `ray start --head` "
                       "printed it) or RAY_ADDRESS")
        elif args.in_memory:
            problem = "--in-memory runs on this machine only; it cannot be combined with --engine ray"
        if problem:
            print(f"shard_histories: error: {problem}", file=sys.stderr)
            return 2
    elif args.engine_address:
        print("shard_histories: error: --engine-address is for --engine ray", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        bopts = BucketOptions(memory_limit=parse_size(args.memory_limit) if args.memory_limit else None,
                              buckets=args.buckets, staging=args.staging, engine=args.engine, engine_address=address)
        if args.staging and storage.is_local(args.staging) and not os.path.isdir(args.staging):
            raise InputError(f"--staging {args.staging}: not a folder")
        check_output(opts)  # before reading a possibly huge log
        source = {"format": args.format, "input": args.input, "options": options_summary(opts)}
        if args.format == "table" and streams_table(args.input) and not args.in_memory:
            log_source = source_from_table(args.input, args.items, args.user_col, args.item_col, args.time_col,
                                           args.rating_col, args.items_item_col, args.title_col,
                                           args.encoding or "utf-8", storage_options, args.split_col)
            manifest = shard_log_bucketed(log_source, opts, source, bopts)
        else:
            log = read_log(args.format, args.input, encoding=args.encoding, title_field=args.title_field,
                           trust_pickle=args.trust_pickle, items=args.items, user_col=args.user_col,
                           item_col=args.item_col, time_col=args.time_col, rating_col=args.rating_col,
                           items_item_col=args.items_item_col, title_col=args.title_col, split_col=args.split_col,
                           storage_options=storage_options)
            if args.in_memory:
                manifest = shard_log(log, opts, source)
            else:
                manifest = shard_log_bucketed(source_from_rawlog(log), opts, source, bopts)
    except (InputError, DataSetError, storage.StorageError) as exc:
        print(f"shard_histories: error: {exc}", file=sys.stderr)
        return 2
    except EngineError as exc:
        print(f"shard_histories: error: --engine {args.engine}: {exc}; no data set was written", file=sys.stderr)
        return 1
    c = manifest.counts
    print(f"wrote {len(manifest.shards)} shards to {args.output} in {time.perf_counter() - t0:.1f}s: "
          f"{c['users']:,} users, {c['items']:,} items, {c['interactions']:,} interactions, examples "
          + ", ".join(f"{k} {v:,}" for k, v in c["examples"].items())
          + (f" ({bopts.ran_on})" if args.engine != "local" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
