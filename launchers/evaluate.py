#!/usr/bin/env python
"""Evaluate a run or an HF model folder: constrained title generation, HR@K / NDCG@K.

    python launchers/evaluate.py --run runs/pfts --data data/ml100k --split test
    deepspeed --num_gpus 8 launchers/evaluate.py --run runs/pfts --data s3://bucket/ml1m --max-examples 2000
    deepspeed --num_gpus 8 launchers/evaluate.py --run s3://bucket/runs/pfts --data s3://bucket/ml1m

The prompt layout comes from the run's saved config unless flags override it. Writes
OUTPUT/metrics.json and OUTPUT/predictions.jsonl (OUTPUT defaults to RUN/eval-SPLIT) and, for
a run, eval/ scalars in its TensorBoard.
"""

from patchrec_dist.evaluate.run import EvalConfig, evaluate
from patchrec_dist.train.config import parse_config
from patchrec_dist.train.preflight import check_evaluate
from patchrec_dist.train.signals import run_job

if __name__ == "__main__":
    run_job("evaluate", lambda: parse_config(cls=EvalConfig, description=__doc__), evaluate, check_evaluate)
