"""The training loss projects only each row's own answer positions onto the vocabulary; it must
equal the loss over full logits, in value and gradient, and its logits must not grow with padding."""

from __future__ import annotations

import pytest
import torch

from patchrec_dist.model.answer_logits import logits_at
from patchrec_dist.model.tiny import tiny_llama_config
from patchrec_dist.patching.collate import IGNORE_INDEX, Batch, predicted_positions
from patchrec_dist.patching.patch_index import PatchIndex
from patchrec_dist.train.trainer import forward_loss_sum, token_loss_sum


def _batch(vocab: int, answers: list[tuple[int, int]], width: int, lengths: list[int]):
    torch.manual_seed(0)
    ids = torch.randint(3, vocab, (len(answers), width))
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, ((start, end), n) in enumerate(zip(answers, lengths)):
        mask[row, :n] = 1  # right padding after each row's own length
        labels[row, start:end] = ids[row, start:end]
    return ids, mask, labels


def _full_loss_and_grads(model, ids, mask, labels):
    model.zero_grad()
    full = token_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
    full.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return full, grads


class _Engine:
    """What forward_loss_sum needs of a DeepSpeed engine: .module and a call (the model's own)."""

    def __init__(self, model):
        self.module = model

    def __call__(self, **kwargs):
        return self.module(**kwargs)


@pytest.mark.parametrize("vocab", [300, 128_256])  # 128k: Llama-3's vocabulary
def test_logits_only_for_each_rows_answer_positions(vocab):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_llama_config(vocab, hidden_size=16, layers=1))
    answers = [(30, 40), (25, 31), (10, 14)]  # answers end at different places in a padded batch
    ids, mask, labels = _batch(vocab, answers, width=40, lengths=[40, 31, 14])
    full, grads = _full_loss_and_grads(model, ids, mask, labels)

    positions = predicted_positions(labels)
    answer_tokens = sum(end - start for start, end in answers)
    assert positions.tolist() == [[r, p] for r, (s, e) in enumerate(answers) for p in range(s - 1, e - 1)]

    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    batch = Batch(input_ids=ids, attention_mask=mask, labels=labels, patches=PatchIndex.empty(),
                  num_examples=3, label_tokens=answer_tokens, answer_positions=positions)
    kept = forward_loss_sum(_Engine(model), batch)
    handle.remove()
    assert seen == [(answer_tokens, vocab)]  # rows x answer tokens x vocab, no more: not (3, 40, vocab)
    kept.backward()
    torch.testing.assert_close(kept, full, rtol=1e-6, atol=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_more_padding_does_not_grow_the_logits():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_llama_config(300, hidden_size=16, layers=1))
    for width in (20, 200):
        ids, mask, labels = _batch(300, [(15, 20), (2, 5)], width=width, lengths=[20, 5])
        with logits_at(model, predicted_positions(labels)):
            out = model(input_ids=ids, attention_mask=mask, logits_to_keep=0)
        assert out.logits.shape == (8, 300)
