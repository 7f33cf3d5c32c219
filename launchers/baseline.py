#!/usr/bin/env python
"""Train and evaluate a baseline (popularity or SASRec) on the LLM's splits, with the LLM's metrics.

    python launchers/baseline.py --baseline popularity --data data/ml100k --output runs/pop
    python launchers/baseline.py --baseline sasrec --data data/ml100k --output runs/sasrec --max-examples 200

Trains on the train split, evaluates the first --max-examples examples of --split (the subset
launchers/evaluate.py evaluates) and writes OUTPUT/metrics.json and OUTPUT/predictions.jsonl.
Exit status: 0 on success, 2 on bad flags or data.
"""

from patchrec_dist.baselines.run import BaselineConfig, run_baseline
from patchrec_dist.train.config import parse_config
from patchrec_dist.train.preflight import check_data
from patchrec_dist.train.signals import run_job

if __name__ == "__main__":
    run_job("baseline", lambda: parse_config(cls=BaselineConfig, description=__doc__), run_baseline,
            lambda cfg: check_data(cfg.data))
