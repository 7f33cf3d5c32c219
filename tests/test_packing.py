"""Padding-free micro-batches: a packed batch (every example in one row, block-causal attention)
gives the padded batch's loss and every gradient, with each attention kernel that runs on CPU,
with LoRA and with gradient checkpointing; its structure is checked directly too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchrec_dist.model.answer_logits import logits_at
from patchrec_dist.model.packed_attention import VARLEN_SDPA, attention_for_training, sdpa_varlen_attention
from patchrec_dist.model.patch_embed import embed_with_patches
from patchrec_dist.patching.collate import Collator, predicted_positions
from patchrec_dist.patching.layouts import LayoutSpec
from patchrec_dist.patching.prompt import IGNORE_INDEX
from patchrec_dist.train.trainer import token_loss_sum
from tests.test_generate import TITLES, make_features, one_thread  # noqa: F401 (autouse: 1 thread here too)

SPECS = [LayoutSpec("text"), LayoutSpec("pft-s", group_size=2), LayoutSpec("pft-i", item_len=2),
         LayoutSpec("pft-s", group_size=3)]


@pytest.fixture(scope="module")
def tokens():
    from patchrec_dist.model.tiny import train_title_tokenizer
    from patchrec_dist.patching.prompt import PromptTemplate, build_prompt_tokens

    template = PromptTemplate.for_domain("movie")
    tokenizer = train_title_tokenizer([*TITLES, template.system, template.instruction], vocab_size=400)
    return build_prompt_tokens(tokenizer, template, TITLES), len(tokenizer)


def tiny_model(vocab: int, attn: str, seed: int = 0, layers: int = 2, kv_heads: int | None = None):
    from transformers import LlamaForCausalLM

    from patchrec_dist.model.tiny import tiny_llama_config

    config = tiny_llama_config(vocab, layers=layers)
    if kv_heads:  # grouped-query attention, as in SmolLM2 and Llama-3
        config.num_key_value_heads = kv_heads
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(config, attn_implementation=attn).train()


def loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """The trainer's forward (one embedding call with patches, logits at answer positions only),
    the token-summed loss, and every parameter's gradient."""
    model.zero_grad()
    embeds = embed_with_patches(model.get_input_embeddings(), batch.input_ids, batch.patches)
    with logits_at(model, batch.answer_positions):
        out = model(inputs_embeds=embeds, **batch.model_inputs(), use_cache=False, logits_to_keep=0)
    loss = token_loss_sum(out.logits, batch.labels, batch.answer_positions)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a: tuple[float, dict], b: tuple[float, dict], tol: float = 1e-5) -> None:
    assert abs(a[0] - b[0]) <= tol * max(1.0, abs(a[0])), (a[0], b[0])
    assert a[1].keys() == b[1].keys() and a[1]
    for name, g in a[1].items():
        err = (g - b[1][name]).abs().max().item()
        assert err <= tol * max(1.0, g.abs().max().item()), (name, err)


def test_a_packed_batch_is_one_row_with_restarting_positions_and_the_same_answers(tokens):
    tok, _ = tokens
    feats = make_features(tok, 6, seed=1, specs=SPECS)
    padded, packed = Collator(tok)(feats), Collator(tok, packing=True)(feats)
    lengths = [len(f.input_ids) for f in feats]
    assert packed.input_ids.shape == (1, sum(lengths)) and packed.attention_mask is None
    assert packed.cu_seqlens.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert packed.max_seqlen == max(lengths)
    assert packed.position_ids[0].tolist() == [p for n in lengths for p in range(n)]
    # the same tokens, labels and patch placeholders, moved from (row, column) to offset + column
    for r, (s, n) in enumerate(zip(packed.cu_seqlens[:-1].tolist(), lengths)):
        assert torch.equal(packed.input_ids[0, s:s + n], padded.input_ids[r, :n])
        assert torch.equal(packed.labels[0, s:s + n], padded.labels[r, :n])
    width = padded.input_ids.shape[1]
    rows, cols = padded.patches.patch_positions // width, padded.patches.patch_positions % width
    assert torch.equal(packed.patches.patch_positions, packed.cu_seqlens[rows].long() + cols)
    # answer positions: each padded (row, p) is (0, offset + p), and none crosses into the next example
    want = [[0, int(packed.cu_seqlens[r]) + int(p)] for r, p in padded.answer_positions.tolist()]
    assert packed.answer_positions.tolist() == want
    assert packed.input_tokens == padded.input_tokens == sum(lengths)
    assert (packed.labels[0, packed.cu_seqlens[:-1].long()] == IGNORE_INDEX).all()
    assert torch.equal(predicted_positions(packed.labels), packed.answer_positions)


@pytest.mark.parametrize("attn", [VARLEN_SDPA, "sdpa", "eager"])
def test_packed_loss_and_every_gradient_equal_the_padded_batch(tokens, attn):
    """fp32, 1e-5, with grouped-query attention: sdpa_varlen (one causal sdpa per example), sdpa
    (transformers' dense block mask from the restarting position_ids) and eager."""
    tok, vocab = tokens
    feats = make_features(tok, 7, seed=2, specs=SPECS, lengths=(2, 30))
    padded, packed = Collator(tok)(feats), Collator(tok, packing=True)(feats)
    assert padded.patches.num_patches > 0 and padded.input_ids.shape[1] * len(feats) > packed.input_ids.shape[1]
    model = tiny_model(vocab, attn, kv_heads=2)
    assert_same(loss_and_grads(model, padded), loss_and_grads(model, packed))


def test_packing_breaks_without_the_block_mask(tokens):
    """The check above can fail: packed rows attending across examples (one causal sdpa over the
    whole row) change the loss."""
    tok, vocab = tokens
    feats = make_features(tok, 5, seed=3, specs=SPECS)
    padded, packed = Collator(tok)(feats), Collator(tok, packing=True)(feats)
    model = tiny_model(vocab, VARLEN_SDPA)
    leaky = packed.model_inputs()
    leaky["cu_seq_lens_q"] = leaky["cu_seq_lens_k"] = packed.cu_seqlens[[0, -1]]  # one block: the whole row
    embeds = embed_with_patches(model.get_input_embeddings(), packed.input_ids, packed.patches)
    with logits_at(model, packed.answer_positions):
        out = model(inputs_embeds=embeds, **leaky, use_cache=False, logits_to_keep=0)
    leaked = float(token_loss_sum(out.logits, packed.labels, packed.answer_positions).detach())
    assert abs(leaked - loss_and_grads(model, padded)[0]) > 1e-3


def test_packing_with_lora_and_gradient_checkpointing(tokens):
    """peft LoRA adapters and HF gradient checkpointing pass the varlen keywords down unchanged."""
    from peft import LoraConfig, get_peft_model

    tok, vocab = tokens
    feats = make_features(tok, 6, seed=4, specs=SPECS)
    padded, packed = Collator(tok)(feats), Collator(tok, packing=True)(feats)
    model = tiny_model(vocab, VARLEN_SDPA)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():  # LoRA's B starts at zero: give it values so the adapters' gradients matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    a, b = loss_and_grads(model, padded), loss_and_grads(model, packed)
    assert any("lora_A" in n for n in a[1]) and all("lora" in n for n in a[1])
    assert_same(a, b)


def test_sdpa_varlen_is_sdpa_on_unpacked_batches(tokens):
    """Validation with --packing false and generation call the same kernel without cu_seq_lens."""
    tok, vocab = tokens
    feats = make_features(tok, 4, seed=5, specs=SPECS)
    batch = Collator(tok, padding_side="left")(feats)  # a padded batch whose mask matters
    outs = []
    for attn in ("sdpa", VARLEN_SDPA):
        model = tiny_model(vocab, attn).eval()
        with torch.no_grad():
            embeds = embed_with_patches(model.get_input_embeddings(), batch.input_ids, batch.patches)
            outs.append(model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits)
    assert torch.equal(outs[0], outs[1])
    assert attention_for_training("sdpa", True) == VARLEN_SDPA
    assert attention_for_training("sdpa", False) == "sdpa"
    assert attention_for_training("flash_attention_2", True) == "flash_attention_2"
    with pytest.raises(ValueError, match="one row"):
        q = torch.zeros(2, 4, 3, 8)
        sdpa_varlen_attention(torch.nn.Module(), q, q, q, None, cu_seq_lens_q=torch.tensor([0, 3]))


def test_packing_refuses_what_it_cannot_do(tokens):
    tok, _ = tokens
    feats = make_features(tok, 2, seed=6, specs=SPECS)
    with pytest.raises(ValueError, match="right side"):
        Collator(tok, padding_side="left", packing=True)(feats)
