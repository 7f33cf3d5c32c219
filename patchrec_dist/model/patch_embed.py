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

import torch
from torch import Tensor, nn

from patchrec_dist.patching.patch_index import PatchIndex

__all__ = [
    "embed_with_patches",
    "per_item_loop_reference",
    "segment_mean",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


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
