"""Collation: a list of worker Features -> one padded batch with a batch-level PatchIndex.

Titles are deduplicated per batch, so the model embeds each distinct item's title tokens once no
matter how many patches (or examples) pool it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from patchrec_dist.patching.features import Features, _ranges
from patchrec_dist.patching.patch_index import PatchIndex
from patchrec_dist.patching.prompt import IGNORE_INDEX, PromptTokens


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long, IGNORE_INDEX outside answers
    patches: PatchIndex
    num_examples: int  # rows that are real examples (not remainder padding)
    label_tokens: int  # labelled tokens in the batch: the weight of this micro-batch's loss
    answer_positions: torch.Tensor  # (N, 2) long (row, position): predicted_positions(labels), the only logits read
    input_tokens: int = 0  # positions fed, padding excluded (tokens/s; counted here, in the data workers)
    row_positions: list[tuple[int, int]] = field(default_factory=list)  # (history, all-text) positions per row
    pads: list[bool] = field(default_factory=list)  # rows that only fill the last batch (remainder="pad")
    indices: list[int] = field(default_factory=list)  # examples' positions in the epoch order
    examples: list[tuple[str, int]] = field(default_factory=list)  # (user, target position) per row
    targets: list[int] = field(default_factory=list)
    ppt_steps: list[int] = field(default_factory=list)  # per row: the PPT schedule's step of its layout (-1: none)
    seen: list[np.ndarray | None] = field(default_factory=list)  # per row: its whole history, if the stream kept it

    @property
    def history_positions(self) -> int:
        """Positions fed for the batch's histories."""
        return sum(h for h, _ in self.row_positions)

    @property
    def text_positions(self) -> int:
        """Positions the same histories cost as all text."""
        return sum(t for _, t in self.row_positions)

    @property
    def compression(self) -> float:
        return self.history_positions / max(1, self.text_positions)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking),
                         lambda p: p.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Lets ``DataLoader(pin_memory=True)`` pin a batch, so its copy to the GPU can overlap."""
        return self._map(lambda t: t.pin_memory(), lambda p: p.pin_memory())

    def _map(self, fn, fn_patches) -> Batch:
        return dataclasses.replace(self, input_ids=fn(self.input_ids), attention_mask=fn(self.attention_mask),
                                   labels=fn(self.labels), patches=fn_patches(self.patches),
                                   answer_positions=fn(self.answer_positions))


def predicted_positions(labels: torch.Tensor) -> torch.Tensor:
    """(row, position) pairs whose next token is labelled: the only logits the loss needs, row by row.

    Answers are a title and an end-of-turn token at the end of a long prompt; projecting every
    position onto the vocabulary (49k rows for SmolLM2, 128k for Llama-3) would spend a fifth of the
    step's FLOPs and most of its activation memory on logits nobody reads (model/answer_logits.py).
    Computed at collation (in the data workers), so the training step does not wait on it."""
    return torch.nonzero(labels[:, 1:] != IGNORE_INDEX)


@dataclass
class Collator:
    """Callable for DataLoader(collate_fn=...): pads to the longest row (right, or left for generation)."""

    tokens: PromptTokens
    padding_side: str = "right"
    pad_to_multiple: int = 1

    def __call__(self, items: list[Features | list[Features]]) -> Batch:
        feats: list[Features] = []
        for it in items:
            feats.extend(it if isinstance(it, list) else [it])
        return collate_features(feats, self.tokens, self.padding_side, self.pad_to_multiple)



def collate_features(feats: list[Features], tokens: PromptTokens, padding_side: str = "right",
                     pad_to_multiple: int = 1) -> Batch:
    b = len(feats)
    lengths = np.array([len(f.input_ids) for f in feats], dtype=np.int64)
    width = int(lengths.max()) if b else 0
    width = -(-width // pad_to_multiple) * pad_to_multiple
    ids = np.full((b, width), tokens.pad, dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    labels = np.full((b, width), IGNORE_INDEX, dtype=np.int64)
    shifts = (width - lengths) if padding_side == "left" else np.zeros(b, dtype=np.int64)
    for r, f in enumerate(feats):
        s, n = int(shifts[r]), len(f.input_ids)
        ids[r, s : s + n] = f.input_ids
        mask[r, s : s + n] = 1
        labels[r, s + f.label_start : s + f.label_end] = f.input_ids[f.label_start : f.label_end]

    # batch-level patch index: distinct items' titles once, patches point into them
    patch_items = np.concatenate([f.patch_items for f in feats]) if b else np.zeros(0, np.int32)
    distinct, inverse = np.unique(patch_items, return_inverse=True)
    title_lens = tokens.title_offsets[distinct + 1] - tokens.title_offsets[distinct]
    title_ids = tokens.title_flat[_ranges(tokens.title_offsets[distinct], title_lens)]
    title_offsets = np.zeros(len(distinct) + 1, dtype=np.int64)
    np.cumsum(title_lens, out=title_offsets[1:])
    sizes = np.concatenate([np.diff(f.patch_offsets) for f in feats]) if b else np.zeros(0, np.int64)
    patch_offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=patch_offsets[1:])
    positions = np.concatenate([r * width + shifts[r] + f.patch_positions for r, f in enumerate(feats)]) \
        if b else np.zeros(0, np.int64)
    index = PatchIndex(
        title_ids=torch.from_numpy(title_ids.astype(np.int64)),
        title_offsets=torch.from_numpy(title_offsets),
        patch_items=torch.from_numpy(inverse.astype(np.int64).reshape(-1)),
        patch_offsets=torch.from_numpy(patch_offsets),
        patch_positions=torch.from_numpy(positions.astype(np.int64)),
    )
    label_tensor = torch.from_numpy(labels)
    return Batch(
        input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), labels=label_tensor,
        patches=index, num_examples=sum(not f.pad for f in feats),
        label_tokens=int(sum(f.label_end - f.label_start for f in feats)), input_tokens=int(lengths.sum()),
        answer_positions=predicted_positions(label_tensor),
        row_positions=[(f.history_positions, f.text_positions) for f in feats],
        pads=[f.pad for f in feats], indices=[f.index for f in feats], examples=[(f.user, f.position) for f in feats],
        targets=[f.target for f in feats], ppt_steps=[f.ppt_step for f in feats], seen=[f.seen for f in feats],
    )
