#!/usr/bin/env python
"""Top-K recommendations for every user of a data set, from a trained run.

    python launchers/recommend.py --run runs/pfts --output recs/pfts [--top-k 20] [--users users.txt]
    deepspeed --num_gpus 8 launchers/recommend.py --run s3://bucket/runs/pfts --output s3://bucket/recs/pfts
    python -m patchrec_dist.launch --nproc 8 launchers/recommend.py ...   (the SLURM scripts' launch path)

Each user's whole history (its last --max-history items) is laid out as the run trained and the
next titles are generated under the constraint to catalog titles. Writes OUTPUT/part-*.parquet
(user, rank, item_id, items, title, score) and OUTPUT/recommendations.json last; started again,
it skips the parts already written. Exit status: 0, or 2 on bad flags or input.
"""

from patchrec_dist.evaluate.recommend import RecommendConfig, recommend_users
from patchrec_dist.train.config import parse_config
from patchrec_dist.train.preflight import check_recommend
from patchrec_dist.train.signals import run_job

if __name__ == "__main__":
    run_job("recommend", lambda: parse_config(cls=RecommendConfig, description=__doc__), recommend_users,
            check_recommend)
