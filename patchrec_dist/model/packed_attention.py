"""Block-causal attention over packed micro-batches, without computing the blocks nobody reads.

A packed micro-batch (patching/collate.py, ``packing=True``) is one row holding every example
back to back, with each example's own ``position_ids`` (0, 1, ...) and cumulative lengths
``cu_seq_lens_q``. Each example may attend only to its own earlier tokens. Kernels:

- ``flash_attention_2`` (GPUs, flash-attn installed): transformers' own varlen path takes the
  ``cu_seq_lens_*`` / ``max_length_*`` keywords as they are.
- ``sdpa``: transformers sees ``attention_mask=None`` with restarting ``position_ids`` and builds
  a dense block-causal mask: exact, but attention then costs (sum of lengths)^2 instead of the
  sum of squares, and the mask itself is T x T.
- ``sdpa_varlen`` (registered here, the default with packing when ``sdpa`` is asked for): one
  causal ``scaled_dot_product_attention`` per example, on views of the packed tensors.

Written by hand because torch's own varlen attention (torch.nn.attention.varlen) and
flash-attn's run on CUDA only, and flex_attention on CPU needs an inductor compile per shape
(every micro-batch has a new one). Without ``cu_seq_lens_q`` (an unpacked batch, generation)
``sdpa_varlen`` is exactly transformers' ``sdpa``, mask included.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN_SDPA = "sdpa_varlen"


def sdpa_varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          cu_seq_lens_q: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: QUERY (1, H, T, D), KEY/VALUE (1, H_kv, T, D) of
    a packed row whose examples end at CU_SEQ_LENS_Q[1:]; returns (1, T, H, D) and no weights."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        raise ValueError(f"{VARLEN_SDPA}: a packed batch is one row without a cache; got query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}")
    bounds = cu_seq_lens_q.tolist()  # one host read per layer; CUDA runs use flash_attention_2's varlen kernel
    parts = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None,
                                    dropout=dropout, scaling=scaling, is_causal=True)[0]
             for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(parts, dim=1), None


def sdpa_varlen_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                     attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """sdpa's mask, except for a forward without a 2-D mask and without a cache: unpacked, sdpa's
    own is_causal needs none; packed, the blocks come from cu_seq_lens, and the dense T x T mask
    transformers would build from the restarting position_ids is never read (a packed batch always
    passes cu_seq_lens with its position_ids: Batch.model_inputs)."""
    if attention_mask is None and q_offset == 0 and kv_offset == 0 and q_length == kv_length:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(VARLEN_SDPA, sdpa_varlen_attention)
AttentionMaskInterface.register(VARLEN_SDPA, sdpa_varlen_mask)


def packing_by_default(device_type: str, attn_implementation: str) -> bool:
    """Whether a run packs its micro-batches when --packing is not given. On CPU ranks packing is
    the faster layout (bench/train_step.py, SmolLM2 micro-batch 8: a text step 19.0 s packed
    against 29.8 s padded, a PFT-S step 6.5 s against 7.1 s). On CUDA, flash_attention_2's varlen
    kernel takes a packed row in one call; sdpa_varlen's per-example loop (a host read of the
    bounds and one kernel per example and layer) made SmolLM2's steps 2.6x slower than padding on
    an H200 (bench/results/train_step-gpu.json), so CUDA with sdpa pads."""
    return device_type != "cuda" or attn_implementation == "flash_attention_2"


def attention_for_training(requested: str, packing: bool) -> str:
    """The kernel a training run builds its model with: sdpa becomes sdpa_varlen when micro-batches
    are packed (the same numbers, without the dense block mask); every other choice is kept."""
    return VARLEN_SDPA if packing and requested == "sdpa" else requested
