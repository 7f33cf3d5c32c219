"""Worker side: an example and its layout -> token ids plus a compact index of what patches pool.

No model and no embeddings here: a patch is one placeholder id in `input_ids`, and the index says
which catalog items it averages (one for an item patch, several for a session patch). The model
side (patchrec_dist.model.patch_embed) turns that into vectors with one embedding call.

Runs per example on DataLoader workers, so it is a handful of numpy calls, no per-item Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from patchrec_dist.data.stream import Example
from patchrec_dist.patching.layouts import (
    TEXT,
    LayoutArrays,
    LayoutSpec,
    layout_arrays,
    ppt_probability,
    ppt_rng,
)
from patchrec_dist.patching.prompt import PromptTokens


@dataclass
class Features:
    input_ids: np.ndarray  # int32 (L,)
    label_start: int  # labels are input_ids[label_start:label_end]; the rest is ignored
    label_end: int
    patch_positions: np.ndarray  # int64 (P,) positions in input_ids holding the placeholder
    patch_offsets: np.ndarray  # int64 (P+1,) CSR into patch_items
    patch_items: np.ndarray  # int32 (M,) catalog item indices pooled by each patch
    history_positions: int  # positions the history costs (segments + separators, markers excluded)
    text_positions: int  # what the same history costs as all text
    history_items: int  # items the layout covers
    target: int
    index: int = -1  # position of the example in the epoch's order
    pad: bool = False  # a filler example (remainder="pad"): no labels
    user: str = ""
    position: int = -1
    ppt_step: int = -1  # ppt: the optimizer step of the schedule its layout was drawn at (-1: no draw)
    seen: np.ndarray | None = None  # the example's whole history, when the stream keeps it (--exclude-seen)

    @property
    def num_patches(self) -> int:
        return len(self.patch_positions)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), in one vectorised pass."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    shift = np.repeat(starts - (ends - lengths), lengths)
    return shift + np.arange(total)


def assemble(tokens: PromptTokens, history: np.ndarray, layout: LayoutArrays, target: int) -> Features:
    """Token ids of the prompt for HISTORY (catalog indices, oldest first) laid out by LAYOUT."""
    kinds, starts, ends = layout.kinds, layout.starts, layout.ends
    n_seg = len(kinds)
    is_text = kinds == TEXT
    first_item = history[starts] if n_seg else np.zeros(0, dtype=np.int64)
    toff = tokens.title_offsets
    # each segment is a run of the token pool: a title (text) or the placeholder; then a separator
    pool_patch = len(tokens.title_flat)
    pool = tokens.token_pool
    seg_start = np.where(is_text, toff[first_item], pool_patch)
    seg_len = np.where(is_text, toff[first_item + 1] - toff[first_item], 1)
    sep = np.full(n_seg, pool_patch + 1)
    if n_seg:
        sep[-1] = pool_patch + 2
    piece_start = np.empty(2 * n_seg, dtype=np.int64)
    piece_start[0::2], piece_start[1::2] = seg_start, sep
    piece_len = np.ones(2 * n_seg, dtype=np.int64)
    piece_len[0::2] = seg_len
    if n_seg:
        hist_ids = pool[_ranges(piece_start, piece_len)]
    else:
        hist_ids = np.array([tokens.seq_end], dtype=np.int32)

    answer = tokens.answer(target)
    head = len(tokens.prefix) + 1  # + <|start_seq_id|>
    input_ids = np.concatenate([tokens.prefix, [tokens.seq_start], hist_ids, tokens.between, answer,
                                tokens.eot, tokens.suffix]).astype(np.int32)
    answer_at = head + len(hist_ids) + len(tokens.between)
    label_start = answer_at + int(tokens.answer_label_start[target])
    label_end = answer_at + len(answer) + len(tokens.eot)

    patch_seg = ~is_text
    piece_pos = np.cumsum(piece_len) - piece_len
    patch_positions = head + piece_pos[0::2][patch_seg]
    sizes = (ends - starts)[patch_seg]
    patch_offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=patch_offsets[1:])
    patch_items = history[_ranges(starts[patch_seg], sizes)].astype(np.int32)

    covered = history[starts[0] : ends[-1]] if n_seg else history[:0]
    text_positions = int((toff[covered + 1] - toff[covered]).sum()) + len(covered)
    return Features(
        input_ids=input_ids, label_start=label_start, label_end=label_end,
        patch_positions=patch_positions.astype(np.int64), patch_offsets=patch_offsets, patch_items=patch_items,
        history_positions=int(piece_len.sum()), text_positions=text_positions, history_items=len(covered),
        target=int(target),
    )


@dataclass
class Patcher:
    """The worker-side transform: Example -> [Features] under a stage's layout.

    For `ppt`, p follows the schedule over optimizer steps; the step of an example is known from
    its batch number, so a resumed run draws the same layouts. With `ppt_pair_text` the same
    example also comes in all-text form (the paper trains both in one batch)."""

    tokens: PromptTokens
    spec: LayoutSpec
    seed: int = 42
    total_steps: int = 1
    grad_accum: int = 1
    micro_step_offset: int = 0  # global micro-batch index of this epoch's batch 0; set by the trainer
    #: ppt: draw every example at this optimizer step instead of its batch's (validation at step N
    #: sees the layouts training sees at step N)
    fixed_step: int | None = None
    ppt_schedule: str = "linear"
    ppt_p_max: float = 1.0
    ppt_pair_text: bool = True

    def __post_init__(self) -> None:
        self._title_lens = self.tokens.title_lengths()

    def layout(self, ex: Example) -> LayoutArrays:
        n = len(ex.history)
        if self.spec.stage == "ppt":
            p = ppt_probability(self.ppt_step(ex), self.total_steps, self.ppt_schedule, self.ppt_p_max)
            return layout_arrays(self.spec, n, p=p, rng=ppt_rng(self.seed, ex.epoch, ex.index))
        lens = self._title_lens[ex.history] if self.spec.stage == "budget" else None
        return layout_arrays(self.spec, n, title_lens=lens, times=ex.times)

    def ppt_step(self, ex: Example) -> int:
        """The optimizer step EX trains at: the global micro-batch index of its batch over grad_accum
        (micro_step_offset is the global index of this epoch's batch 0, kept by the trainer)."""
        if self.fixed_step is not None:
            return self.fixed_step
        return (self.micro_step_offset + ex.batch) // max(1, self.grad_accum)

    def __call__(self, ex: Example) -> list[Features]:
        out = [self._features(ex, self.layout(ex))]
        if self.spec.stage == "ppt":
            out[0].ppt_step = self.ppt_step(ex)
        if self.spec.stage == "ppt" and self.ppt_pair_text:
            out.append(self._features(ex, layout_arrays(LayoutSpec(stage="text"), len(ex.history))))
        return out

    def _features(self, ex: Example, layout: LayoutArrays) -> Features:
        f = assemble(self.tokens, ex.history, layout, ex.target)
        f.index, f.pad, f.user, f.position, f.seen = ex.index, ex.pad, ex.user, ex.position, ex.seen
        if ex.pad:
            f.label_end = f.label_start
        return f

