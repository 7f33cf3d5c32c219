"""Collation: a list of worker Features -> one batch with a batch-level PatchIndex.

Two forms. Padded: one row per example, padded to the longest (generation pads left). Packed
(``packing=True``, training's default): every example back to back in ONE row, each with its own
``position_ids`` and cumulative lengths for block-causal attention (model/packed_attention.py),
so no padded position is computed; the loss reads the same answer positions, shifted.

Titles are deduplicated per batch, so the model embeds each distinct item's title tokens once no
matter how many patches (or examples) pool it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from patchrec_dist.patching.features import Features, _ranges
from patchrec_dist.patching.patch_index import PatchIndex
from patchrec_dist.patching.prompt import IGNORE_INDEX, PromptTokens


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) long; packed: (1, T), T the sum of the examples' lengths
    attention_mask: torch.Tensor | None  # (B, L) long; packed: None (the blocks come from cu_seqlens)
    labels: torch.Tensor  # like input_ids, IGNORE_INDEX outside answers
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
    position_ids: torch.Tensor | None = None  # packed: (1, T) long, each example from 0
    cu_seqlens: torch.Tensor | None = None  # packed: (B+1,) int32, where each example starts in the row
    max_seqlen: int = 0  # packed: the longest example

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for the HF model besides inputs_embeds. Packed: transformers' varlen
        keywords (flash_attention_2 reads them as they are, sdpa_varlen too) and no 2-D mask, which
        would hide the packing from the mask builder."""
        if not self.packed:
            return {"attention_mask": self.attention_mask}
        return {"attention_mask": None, "position_ids": self.position_ids, "cu_seq_lens_q": self.cu_seqlens,
                "cu_seq_lens_k": self.cu_seqlens, "max_length_q": self.max_seqlen, "max_length_k": self.max_seqlen}

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
        def opt(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        return dataclasses.replace(self, input_ids=fn(self.input_ids), attention_mask=opt(self.attention_mask),
                                   labels=fn(self.labels), patches=fn_patches(self.patches),
                                   answer_positions=fn(self.answer_positions), position_ids=opt(self.position_ids),
                                   cu_seqlens=opt(self.cu_seqlens))


def predicted_positions(labels: torch.Tensor) -> torch.Tensor:
    """(row, position) pairs whose next token is labelled: the only logits the loss needs, row by row.

    Answers are a title and an end-of-turn token at the end of a long prompt; projecting every
    position onto the vocabulary (49k rows for SmolLM2, 128k for Llama-3) would spend a fifth of the
    step's FLOPs and most of its activation memory on logits nobody reads (model/answer_logits.py).
    Computed at collation (in the data workers), so the training step does not wait on it."""
    return torch.nonzero(labels[:, 1:] != IGNORE_INDEX)


@dataclass
class Collator:
    """Callable for DataLoader(collate_fn=...): packs the examples into one row (PACKING), or pads
    to the longest row (right, or left for generation)."""

    tokens: PromptTokens
    padding_side: str = "right"
    pad_to_multiple: int = 1
    packing: bool = False

    def __call__(self, items: list[Features | list[Features]]) -> Batch:
        feats: list[Features] = []
        for it in items:
            feats.extend(it if isinstance(it, list) else [it])
        return collate_features(feats, self.tokens, self.padding_side, self.pad_to_multiple, self.packing)


def collate_features(feats: list[Features], tokens: PromptTokens, padding_side: str = "right",
                     pad_to_multiple: int = 1, packing: bool = False) -> Batch:
    b = len(feats)
    lengths = np.array([len(f.input_ids) for f in feats], dtype=np.int64)
    if packing and (padding_side != "right" or pad_to_multiple != 1):
        raise ValueError("packing is for training batches: right side, no pad_to_multiple")
    packed = _pack(feats, lengths) if packing else None
    if packed is not None:
        ids, labels, starts, position_ids = packed
        mask, width = None, 0
    else:
        ids, mask, labels, starts = _pad(feats, lengths, tokens.pad, padding_side, pad_to_multiple)
        width = ids.shape[1]

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
    # a patch's place in the flattened (rows x width) input: row start (padded) or offset (packed)
    positions = np.concatenate([r * width + starts[r] + f.patch_positions for r, f in enumerate(feats)]) \
        if b else np.zeros(0, np.int64)
    index = PatchIndex(
        title_ids=torch.from_numpy(title_ids.astype(np.int64)),
        title_offsets=torch.from_numpy(title_offsets),
        patch_items=torch.from_numpy(inverse.astype(np.int64).reshape(-1)),
        patch_offsets=torch.from_numpy(patch_offsets),
        patch_positions=torch.from_numpy(positions.astype(np.int64)),
    )
    label_tensor = torch.from_numpy(labels)
    if packed is not None:
        pack = {"position_ids": torch.from_numpy(position_ids),
                "cu_seqlens": torch.from_numpy(np.append(starts, lengths.sum()).astype(np.int32)),
                "max_seqlen": int(lengths.max()) if b else 0}
    else:
        pack = {}
    return Batch(
        input_ids=torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask),
        labels=label_tensor, **pack,
        patches=index, num_examples=sum(not f.pad for f in feats),
        label_tokens=int(sum(f.label_end - f.label_start for f in feats)), input_tokens=int(lengths.sum()),
        answer_positions=predicted_positions(label_tensor),
        row_positions=[(f.history_positions, f.text_positions) for f in feats],
        pads=[f.pad for f in feats], indices=[f.index for f in feats], examples=[(f.user, f.position) for f in feats],
        targets=[f.target for f in feats], ppt_steps=[f.ppt_step for f in feats], seen=[f.seen for f in feats],
    )


def _pad(feats: list[Features], lengths: np.ndarray, pad: int, padding_side: str, pad_to_multiple: int):
    """One row per example: ids, mask, labels (B, width) and each row's first real position."""
    b = len(feats)
    width = int(lengths.max()) if b else 0
    width = -(-width // pad_to_multiple) * pad_to_multiple
    ids = np.full((b, width), pad, dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    labels = np.full((b, width), IGNORE_INDEX, dtype=np.int64)
    starts = (width - lengths) if padding_side == "left" else np.zeros(b, dtype=np.int64)
    for r, f in enumerate(feats):
        s, n = int(starts[r]), len(f.input_ids)
        ids[r, s : s + n] = f.input_ids
        mask[r, s : s + n] = 1
        labels[r, s + f.label_start : s + f.label_end] = f.input_ids[f.label_start : f.label_end]
    return ids, mask, labels, starts


def _pack(feats: list[Features], lengths: np.ndarray):
    """Every example in one row: ids, labels, position_ids (1, T) and each example's offset. No
    labelled token starts an example, so the last position of one never predicts the next one's
    first token (predicted_positions reads within examples only)."""
    starts = np.zeros(len(feats), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    total = int(lengths.sum())
    ids = np.concatenate([f.input_ids for f in feats]).astype(np.int64) if feats else np.zeros(0, np.int64)
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    for f, s in zip(feats, starts):
        if f.label_start == 0 and f.label_end > 0:
            raise ValueError("packing needs every example's first token unlabelled (a prompt comes first)")
        labels[s + f.label_start : s + f.label_end] = f.input_ids[f.label_start : f.label_end]
    position_ids = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
    return ids[None], labels[None], starts, position_ids[None]
