#!/usr/bin/env python
"""pretrain -> finetune -> evaluate through submitit, on SLURM or as local processes.

    python launchers/submit.py --cluster slurm --data s3://bucket/ml1m --runs s3://bucket/runs/ml1m --nproc 8 \\
        --slurm nodes=4,partition=gpu,gpus_per_node=8,cpus_per_task=64 --pretrain-args "--max-steps 2000"
    python launchers/submit.py --cluster local --cpu --nproc 2 --data data/ml100k --runs runs/demo
    python launchers/submit.py ... --dry-run        # show what would be submitted

Each stage is one job over `nodes` nodes (one task per node running the per-node launcher,
patchrec_dist/launch.py). Stages that already finished are skipped. On SLURM each stage depends
on the previous one (afterok) and is submitted with --requeue. Before the time limit SLURM sends submitit's signal
(USR2, `signal_delay_s` = 90 s ahead; raise it above your checkpoint's save time with
`--slurm signal_delay_s=300`); on a preemption SLURM sends SIGTERM. Either way the ranks save a
checkpoint and exit, and only then does submitit requeue the job, which resumes from that
checkpoint (patchrec_dist/pipeline.py, docs/cluster.md).
"""

import argparse
import shlex
import sys

from patchrec_dist.pipeline import pipeline_jobs, submit
from patchrec_dist.train.preflight import FlagError, check_data, check_model


def parse_slurm(text: str) -> dict:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"submit: error: --slurm {item!r}: expected key=value")
        generic = key in ("timeout_min", "nodes", "tasks_per_node", "cpus_per_task", "gpus_per_node", "name", "mem_gb")
        out[key if generic else f"slurm_{key}"] = int(value) if value.isdigit() else value
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster", choices=("slurm", "local"), default="slurm")
    p.add_argument("--data", required=True)
    p.add_argument("--runs", default="runs", help="folder for the three stages")
    p.add_argument("--model", default=None, help="pretrain's --model (finetune starts from pretrain)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per node (--slurm nodes=N for N nodes)")
    p.add_argument("--cpu", action="store_true", help="CPU ranks (DS_ACCELERATOR=cpu)")
    p.add_argument("--pretrain-args", default="", help="extra pretrain flags (one string)")
    p.add_argument("--finetune-args", default="", help="extra finetune flags")
    p.add_argument("--eval-args", default="", help="extra evaluate flags")
    p.add_argument("--slurm", default="", help="submitit parameters: key=value,... (partition=gpu,gpus_per_node=8)")
    p.add_argument("--logs", default="logs/submitit", help="submitit's folder (job logs, pickles)")
    p.add_argument("--wait", action="store_true", help="wait until the last stage finished")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    try:  # before anything is submitted: a job that fails on its flags minutes later helps nobody
        check_data(args.data)
        if args.model:
            check_model(args.model)
    except FlagError as exc:
        print(f"submit: error: {exc}", file=sys.stderr)
        return 2
    stages = pipeline_jobs(args.data, args.runs, args.nproc, args.cpu, shlex.split(args.pretrain_args),
                             shlex.split(args.finetune_args), shlex.split(args.eval_args), args.model)
    if not stages:
        print("every stage finished already")
        return 0
    if args.dry_run:
        for s in stages:
            print(f"{s.name}: {shlex.join(s.command())}")
        return 0
    jobs = submit(stages, args.cluster, args.logs, parse_slurm(args.slurm), wait=args.wait)
    for s, j in zip(stages, jobs):
        print(f"{s.name}: job {j.job_id}")
    print(f"curves: tensorboard --logdir {args.runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
