#!/usr/bin/env python
"""Train and evaluate a baseline (popularity or SASRec) on the LLM's splits, with the LLM's metrics.

    python launchers/baseline.py --baseline popularity --data data/ml100k --output runs/pop
    python launchers/baseline.py --baseline sasrec --data data/ml100k --output runs/sasrec --max-examples 200

Trains on the train split, evaluates the first --max-examples examples of --split (the subset
launchers/evaluate.py evaluates) and writes OUTPUT/metrics.json and OUTPUT/predictions.jsonl.
Exit status: 0 on success, 2 on bad flags or data.
"""

import sys

from patchrec_dist.baselines.run import BaselineConfig, run_baseline
from patchrec_dist.data.manifest import DataSetError
from patchrec_dist.train.config import parse_config

if __name__ == "__main__":
    try:
        run_baseline(parse_config(cls=BaselineConfig, description=__doc__))
    except (ValueError, FileNotFoundError, DataSetError) as exc:
        print(f"baseline: error: {exc}", file=sys.stderr)
        sys.exit(2)
