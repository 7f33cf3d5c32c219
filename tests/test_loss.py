"""The training loss projects only the positions that predict an answer token onto the
vocabulary; it must equal the loss over full logits, in value and gradient."""

from __future__ import annotations

import torch

from patchrec_dist.model.tiny import tiny_llama_config
from patchrec_dist.patching.collate import IGNORE_INDEX, predicted_positions
from patchrec_dist.train.trainer import token_loss_sum


def test_loss_over_kept_positions_equals_the_full_logits_loss():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(300, hidden_size=32, layers=2))
    ids = torch.randint(3, 300, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, 31:] = 0  # a right-padded row
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, (start, end) in enumerate([(30, 40), (25, 31), (10, 14)]):  # answers end at different places
        labels[row, start:end] = ids[row, start:end]

    full = token_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
    full.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    keep = predicted_positions(labels)
    assert keep.tolist() == [*range(9, 13), *range(24, 39)]  # union of rows' (answer start - 1 .. end - 2)
    out = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep)
    assert out.logits.shape == (3, len(keep), 300)
    kept = token_loss_sum(out.logits, labels, keep)
    kept.backward()
    torch.testing.assert_close(kept, full, rtol=1e-6, atol=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
