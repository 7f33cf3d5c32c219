"""Evaluation of generated recommendations."""

from patchrec_dist.evaluate.metrics import (
    KS,
    SCORINGS,
    Prediction,
    Scoring,
    TitleIndex,
    example_result,
    finalize,
    format_table,
    merge_metric_sums,
    rank_patchrec_compat,
    rank_strict,
    score,
    score_sums,
)

__all__ = [
    "KS",
    "SCORINGS",
    "Prediction",
    "Scoring",
    "TitleIndex",
    "example_result",
    "finalize",
    "format_table",
    "merge_metric_sums",
    "rank_patchrec_compat",
    "rank_strict",
    "score",
    "score_sums",
]
