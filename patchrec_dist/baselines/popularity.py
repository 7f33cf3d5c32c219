"""Popularity: recommend the items most often seen in the training split, the same list for everyone.

What is counted: every interaction that some training example shows, as its target or in its
history (capped at `max_history`, as the LLM stream caps it), counted once per interaction, not
once per example it appears in. For a user whose train targets are positions ``lo..hi`` that is
``items[max(0, lo - max_history) : hi + 1]``; users without a train target count nothing. So no
val or test target is ever counted, and a user's interactions are not weighted by how many
prefixes happen to contain them.

Ties are broken by the smaller catalog index, so the ranking is a pure function of the data.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class Popularity:
    """Item counts over the training interactions; `scores` is the same row for every example."""

    def __init__(self, n_items: int) -> None:
        self.counts = np.zeros(n_items, dtype=np.int64)

    def fit(self, interactions: Iterable[np.ndarray]) -> Popularity:
        """Add one count per item occurrence in each array (catalog indices)."""
        for items in interactions:
            self.counts += np.bincount(np.asarray(items, dtype=np.int64), minlength=len(self.counts))
        return self

    @property
    def interactions(self) -> int:
        return int(self.counts.sum())

    def ranking(self) -> np.ndarray:
        """Catalog indices, most counted first; equal counts in increasing index order."""
        # lexsort sorts by the last key first: by -count, then by index
        return np.lexsort((np.arange(len(self.counts)), -self.counts))

    def scores(self, histories: list[np.ndarray]) -> np.ndarray:
        """(len(histories), n_items) float scores: the counts, whatever the history."""
        return np.broadcast_to(self.counts.astype(np.float64), (len(histories), len(self.counts)))
