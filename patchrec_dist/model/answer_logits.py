"""Logits only where the loss reads them: each row's own answer positions.

A PatchRec answer is a title and an end-of-turn token at the end of a long prompt. Projecting
every position onto the vocabulary is (B x L x V) floats: with Llama-3's 128k vocabulary and a
16 x 2k micro-batch that is 16 GB in fp32. Even the union of answer positions over a right-padded
micro-batch grows with padding (rows end at different places). Gathering each row's answer hidden
states first and projecting only those costs (answer tokens x V), whatever the padding and the
micro-batch size.

The gather is a forward pre-hook on the LM head, installed for one forward call: the model is
still called as a whole (through the DeepSpeed engine, whose ZeRO-3 hooks fetch the head's
shards as usual) with ``logits_to_keep=0``, and the head receives (N, H) instead of (B, L, H).
Written by hand because transformers' own per-row selection (a 2-D boolean ``logits_to_keep``)
only exists in its newest releases and not for every architecture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def lm_head(model: Any) -> torch.nn.Module:
    """The output projection of an HF causal LM, also through a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (LM head)")
    return head


@contextlib.contextmanager
def logits_at(model: Any, positions: torch.Tensor) -> Iterator[None]:
    """Inside the block, MODEL's forward returns logits of shape (N, V): one row per
    ``positions[i] = (row, position)``, in that order. Call the model with ``logits_to_keep=0``."""

    def gather_rows(module: torch.nn.Module, args: tuple) -> tuple:
        hidden, *rest = args
        return (hidden[positions[:, 0], positions[:, 1]], *rest)

    handle = lm_head(model).register_forward_pre_hook(gather_rows)
    try:
        yield
    finally:
        handle.remove()
