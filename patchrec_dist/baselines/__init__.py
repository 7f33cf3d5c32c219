"""Baselines on the LLM's splits, scored by the LLM's metrics code: popularity and SASRec.

`run_baseline(BaselineConfig(...))` trains one on the train split and evaluates it on the
same examples (and the same first-N subset) as `patchrec_dist.evaluate.run`; see docs/baselines.md.
"""

from patchrec_dist.baselines.popularity import Popularity
from patchrec_dist.baselines.run import (
    BASELINES,
    BaselineConfig,
    counted_interactions,
    eval_examples,
    ranked_titles,
    run_baseline,
    train_users,
)
from patchrec_dist.baselines.sasrec import SASRec, SASRecConfig, UserSequence, fit_sasrec, sasrec_scores

__all__ = [
    "BASELINES",
    "BaselineConfig",
    "Popularity",
    "SASRec",
    "SASRecConfig",
    "UserSequence",
    "counted_interactions",
    "eval_examples",
    "fit_sasrec",
    "ranked_titles",
    "run_baseline",
    "sasrec_scores",
    "train_users",
]
