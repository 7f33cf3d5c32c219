"""Item and session patches as input embeddings, with one embedding call per micro-step.

PatchRec (see docs/reference.md) replaces parts of a user's history with *patches*:

- an **item patch** is one input position whose embedding is the mean of the item title's token
  input embeddings, taken from the LLM's own embedding table (gradients flow into it);
- a **session patch** is one position whose embedding is the mean of several item patches
  (a mean of means: every item weighs the same, whatever its title length).

DataLoader workers describe the patches of a batch with a :class:`PatchIndex` (CSR layout, all
``int64``) and put a placeholder token id at every patch position of ``input_ids``.
:func:`embed_with_patches` then builds ``inputs_embeds`` for the LLM:

1. ONE call ``embedding(cat(input_ids.flatten(), index.title_ids))``, made also when the batch has
   no patches. Under DeepSpeed ZeRO-3 every call of a module all-gathers its partitioned
   parameters, so all ranks must call it the same number of times; the released PatchRec code
   calls the embedding once per item and deadlocks as soon as two ranks hold different item
   counts (:func:`per_item_loop_reference` reproduces that approach for tests and benchmarks).
2. :func:`segment_mean` over title token vectors gives one vector per distinct item.
3. :func:`segment_mean` over the item vectors selected by ``patch_items`` gives one vector per
   patch (an item patch is a session patch of one item).
4. The patch vectors replace the placeholder rows of the token embeddings (out of place).

The embedding weight is never read directly (under ZeRO-3 it is an empty shard outside the
module's forward); the module is always called. Means are computed in fp32 when the embedding
returns fp16/bf16 and cast back, so the output keeps the embedding's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

__all__ = [
    "PatchIndex",
    "embed_with_patches",
    "per_item_loop_reference",
    "segment_mean",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


@dataclass
class PatchIndex:
    """What each patch placeholder of a batch pools, in CSR form (all ``torch.long``, 1-D).

    Attributes:
        title_ids: ``(T,)`` title token ids of the batch's distinct items, concatenated.
        title_offsets: ``(U+1,)`` offsets into ``title_ids``, one row per distinct item; every
            title has at least one token.
        patch_items: ``(M,)`` indices into the ``U`` distinct items, concatenated per patch.
        patch_offsets: ``(P+1,)`` offsets into ``patch_items``; an item patch has one item, a
            session patch several (at least one).
        patch_positions: ``(P,)`` flat positions ``row * seq_len + col`` in ``input_ids`` where
            each patch goes; distinct.
    """

    title_ids: Tensor
    title_offsets: Tensor
    patch_items: Tensor
    patch_offsets: Tensor
    patch_positions: Tensor

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def empty(cls, device: torch.device | str | None = None) -> PatchIndex:
        """An index without patches (``T = U = M = P = 0``)."""

        def z(n: int) -> Tensor:
            return torch.zeros(n, dtype=torch.long, device=device)

        return cls(
            title_ids=z(0), title_offsets=z(1), patch_items=z(0), patch_offsets=z(1), patch_positions=z(0)
        )

    @classmethod
    def from_patches(
        cls,
        patches: Sequence[Sequence[Sequence[int]]],
        positions: Sequence[int],
        device: torch.device | str | None = None,
    ) -> PatchIndex:
        """Build an index from nested lists (tests, benchmarks, tools; not the worker fast path).

        ``patches[p]`` is the list of items of patch ``p`` and each item is its title token ids;
        ``positions[p]`` is the flat position of patch ``p``. Items with identical token ids are
        stored once.
        """
        if len(patches) != len(positions):
            raise ValueError(f"{len(patches)} patches but {len(positions)} positions")
        item_row: dict[tuple[int, ...], int] = {}
        title_ids: list[int] = []
        title_offsets = [0]
        patch_items: list[int] = []
        patch_offsets = [0]
        for patch in patches:
            for title in patch:
                key = tuple(int(t) for t in title)
                if key not in item_row:
                    item_row[key] = len(item_row)
                    title_ids.extend(key)
                    title_offsets.append(len(title_ids))
                patch_items.append(item_row[key])
            patch_offsets.append(len(patch_items))

        def t(values: Sequence[int]) -> Tensor:
            return torch.tensor(list(values), dtype=torch.long, device=device)

        return cls(
            title_ids=t(title_ids),
            title_offsets=t(title_offsets),
            patch_items=t(patch_items),
            patch_offsets=t(patch_offsets),
            patch_positions=t([int(p) for p in positions]),
        )

    def to_patches(self) -> tuple[list[list[list[int]]], list[int]]:
        """The inverse of :meth:`from_patches`: ``(patches, positions)`` as nested lists."""
        ids = self.title_ids.tolist()
        toff = self.title_offsets.tolist()
        items = self.patch_items.tolist()
        poff = self.patch_offsets.tolist()
        titles = [ids[toff[u] : toff[u + 1]] for u in range(len(toff) - 1)]
        patches = [[titles[i] for i in items[poff[p] : poff[p + 1]]] for p in range(len(poff) - 1)]
        return patches, self.patch_positions.tolist()

    # -- properties -----------------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        return int(self.patch_positions.shape[0])

    @property
    def num_items(self) -> int:
        """Number of distinct items ``U``."""
        return int(self.title_offsets.shape[0]) - 1

    @property
    def num_title_tokens(self) -> int:
        return int(self.title_ids.shape[0])

    @property
    def device(self) -> torch.device:
        return self.title_ids.device

    # -- movement -------------------------------------------------------------------------------
    def _map(self, fn) -> PatchIndex:
        return PatchIndex(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PatchIndex:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PatchIndex:
        """Lets ``DataLoader(pin_memory=True)`` pin an index inside a batch."""
        return self._map(lambda t: t.pin_memory())

    # -- checks ---------------------------------------------------------------------------------
    def validate(self, seq_len: int, batch: int) -> None:
        """Raise ``ValueError`` if the index is inconsistent or does not fit a ``(batch, seq_len)``
        ``input_ids``. Synchronises with the device; meant for tests, workers and debugging."""
        for f in fields(self):
            t = getattr(self, f.name)
            if not isinstance(t, Tensor):
                raise ValueError(f"{f.name} is {type(t).__name__}, not a Tensor")
            if t.dim() != 1:
                raise ValueError(f"{f.name} must be 1-D, got shape {tuple(t.shape)}")
            if t.dtype != torch.long:
                raise ValueError(f"{f.name} must be torch.long, got {t.dtype}")
        devices = {getattr(self, f.name).device for f in fields(self)}
        if len(devices) != 1:
            raise ValueError(f"index tensors on several devices: {sorted(map(str, devices))}")

        def check_offsets(name: str, offsets: Tensor, total: int, what: str) -> None:
            if offsets.numel() < 1:
                raise ValueError(f"{name} must hold at least one entry (0)")
            if int(offsets[0]) != 0:
                raise ValueError(f"{name}[0] must be 0, got {int(offsets[0])}")
            if int(offsets[-1]) != total:
                raise ValueError(f"{name}[-1] = {int(offsets[-1])} but there are {total} {what}")
            if offsets.numel() > 1 and bool((offsets[1:] <= offsets[:-1]).any()):
                raise ValueError(f"{name} must be strictly increasing (every segment >= 1 entry)")

        check_offsets("title_offsets", self.title_offsets, self.num_title_tokens, "title tokens")
        check_offsets("patch_offsets", self.patch_offsets, int(self.patch_items.numel()), "patch items")
        n_patches = int(self.patch_offsets.numel()) - 1
        if self.num_patches != n_patches:
            raise ValueError(
                f"{self.num_patches} patch_positions but patch_offsets describe {n_patches} patches"
            )
        if self.patch_items.numel() and (
            int(self.patch_items.min()) < 0 or int(self.patch_items.max()) >= self.num_items
        ):
            raise ValueError(f"patch_items out of range [0, {self.num_items})")
        if self.title_ids.numel() and int(self.title_ids.min()) < 0:
            raise ValueError("title_ids must be non-negative token ids")
        if self.num_patches:
            pos = self.patch_positions
            if int(pos.min()) < 0 or int(pos.max()) >= seq_len * batch:
                raise ValueError(f"patch_positions out of range [0, {batch} * {seq_len})")
            if int(torch.unique(pos).numel()) != self.num_patches:
                raise ValueError("patch_positions must be distinct")


def segment_mean(values: Tensor, offsets: Tensor) -> Tensor:
    """Mean of consecutive row segments: ``out[s] = values[offsets[s]:offsets[s+1]].mean(0)``.

    ``values`` is ``(N, D)``, ``offsets`` is ``(S+1,)`` with ``offsets[0] = 0`` and
    ``offsets[-1] = N``. Differentiable, no host synchronisation, torch ops only. A segment of
    length 0 gives a zero row (callers guarantee lengths >= 1). Computes in ``values.dtype``.
    """
    if values.dim() != 2:
        raise ValueError(f"values must be (N, D), got shape {tuple(values.shape)}")
    offsets = offsets.to(device=values.device, dtype=torch.long)
    n_seg = offsets.shape[0] - 1
    ends = offsets[1:]
    # segment of row i = number of segment ends <= i
    seg = torch.searchsorted(ends, torch.arange(values.shape[0], device=values.device), right=True)
    sums = values.new_zeros(n_seg, values.shape[1]).index_add(0, seg, values)
    counts = (ends - offsets[:-1]).clamp_min(1).to(values.dtype)
    return sums / counts.unsqueeze(1)


def embed_with_patches(
    embedding: nn.Module,
    input_ids: Tensor,
    index: PatchIndex,
    *,
    placeholder_id: int | None = None,
) -> Tensor:
    """``inputs_embeds`` of shape ``(B, L, D)`` for ``input_ids`` ``(B, L)`` with patches filled in.

    Calls ``embedding`` exactly once, on ``cat(input_ids.flatten(), index.title_ids)`` (with a
    leading batch dimension of 1), also when there are no patches. Token rows at
    ``index.patch_positions`` are replaced by the patch vectors. The result has the embedding's
    output dtype; means are taken in fp32 for fp16/bf16 embeddings.

    ``embedding`` is typically ``model.get_input_embeddings()``; under DeepSpeed ZeRO-3 its weight
    is gathered by the module's forward hooks, so it is never read here.

    If ``placeholder_id`` is given, checks (with a device synchronisation) that ``input_ids``
    holds it at every patch position.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
    batch, seq_len = input_ids.shape
    n_tok = batch * seq_len
    device = input_ids.device
    if index.device != device:
        index = index.to(device, non_blocking=True)
    flat_ids = input_ids.reshape(-1)
    if placeholder_id is not None and index.num_patches:
        if not bool((flat_ids[index.patch_positions] == placeholder_id).all()):
            raise ValueError(f"input_ids does not hold placeholder {placeholder_id} at every patch position")

    all_ids = torch.cat([flat_ids, index.title_ids.to(flat_ids.dtype)])
    out = embedding(all_ids.unsqueeze(0))[0]  # the one call: (B*L + T, D)
    tok = out[:n_tok]
    if index.num_patches == 0:
        return tok.reshape(batch, seq_len, -1)

    cdtype = _compute_dtype(out.dtype)
    title_vecs = out[n_tok:].to(cdtype)
    item_vecs = segment_mean(title_vecs, index.title_offsets)  # (U, D)
    patch_vecs = segment_mean(item_vecs.index_select(0, index.patch_items), index.patch_offsets)  # (P, D)
    merged = tok.index_copy(0, index.patch_positions, patch_vecs.to(out.dtype))  # out of place
    return merged.reshape(batch, seq_len, -1)


def per_item_loop_reference(embedding: nn.Module, input_ids: Tensor, index: PatchIndex) -> Tensor:
    """SLOW REFERENCE PATH, for tests and benchmarks only: the released PatchRec approach.

    Embeds ``input_ids`` with one call, then loops over patches and, inside each patch, over its
    items, calling ``embedding`` once per item occurrence on that item's title ids and taking the
    mean; a session patch is the mean of its item means. The number of embedding calls therefore
    depends on the batch content: under DeepSpeed ZeRO-3 ranks with different item counts call
    the module a different number of times and the job hangs. Never use it in training.

    Numerically it follows the same policy as :func:`embed_with_patches` (fp32 means for fp16/bf16,
    cast back), so the two agree up to summation order.
    """
    batch, seq_len = input_ids.shape
    tok = embedding(input_ids)  # (B, L, D)
    patches, positions = index.to_patches()
    if not patches:
        return tok
    cdtype = _compute_dtype(tok.dtype)
    rows = []
    for patch in patches:
        item_means = []
        for title in patch:
            ids = torch.tensor(title, dtype=input_ids.dtype, device=input_ids.device)
            item_means.append(embedding(ids).to(cdtype).mean(dim=0))
        rows.append(torch.stack(item_means).mean(dim=0).to(tok.dtype))
    flat = tok.reshape(batch * seq_len, -1).clone()
    for pos, row in zip(positions, rows):
        flat[pos] = row
    return flat.reshape(batch, seq_len, -1)
