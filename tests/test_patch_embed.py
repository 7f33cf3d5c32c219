"""Tests for patchrec_dist.model.patch_embed (item/session patches with one embedding call)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from patchrec_dist.model.patch_embed import embed_with_patches, per_item_loop_reference, segment_mean
from patchrec_dist.patching.patch_index import PatchIndex

ROOT = Path(__file__).resolve().parents[1]
ZERO3_SCRIPT = "tests/dist_scripts/patch_embed_zero3.py"
PLACEHOLDER = 1


# ---------------------------------------------------------------------------------------------
# helpers
def random_lengths(rng: random.Random, n: int, lo: int = 1, hi: int = 10) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


def offsets_of(lengths: list[int]) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.long)


def loop_segment_mean(values: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    rows, start = [], 0
    for n in lengths:
        rows.append(values[start : start + n].mean(dim=0))
        start += n
    return torch.stack(rows)


def random_batch(seed: int, batch: int = 3, seq_len: int = 40, vocab: int = 97, n_patches: int | None = None):
    """input_ids with placeholders and a PatchIndex mixing item and session patches."""
    rng = random.Random(seed)
    catalog = [[rng.randrange(2, vocab) for _ in range(rng.randint(1, 7))] for _ in range(25)]
    input_ids = torch.randint(2, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    if n_patches is None:
        n_patches = rng.randint(batch, batch * seq_len // 3)
    positions = sorted(rng.sample(range(batch * seq_len), n_patches))  # spread over all rows
    patches = []
    for _ in positions:
        k = 1 if rng.random() < 0.5 else rng.randint(2, 8)  # item patch or session patch
        patches.append([rng.choice(catalog) for _ in range(k)])  # repeats allowed
    index = PatchIndex.from_patches(patches, positions)
    input_ids.view(-1)[index.patch_positions] = PLACEHOLDER
    return input_ids, index


class CallCounter:
    def __init__(self, module: nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


# ---------------------------------------------------------------------------------------------
# segment_mean
@pytest.mark.parametrize("seed", range(5))
def test_segment_mean_matches_loop_values_and_grads(seed):
    rng = random.Random(seed)
    lengths = random_lengths(rng, rng.randint(1, 30))
    values = torch.randn(sum(lengths), 7, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    upstream = torch.randn(len(lengths), 7)

    got = segment_mean(values, offsets_of(lengths))
    (g_got,) = torch.autograd.grad((got * upstream).sum(), values)
    want = loop_segment_mean(values, lengths)
    (g_want,) = torch.autograd.grad((want * upstream).sum(), values)

    assert got.shape == (len(lengths), 7)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-6)


def test_segment_mean_gradcheck_float64():
    lengths = [1, 3, 2, 5]
    values = torch.randn(sum(lengths), 3, dtype=torch.float64, requires_grad=True)
    offsets = offsets_of(lengths)
    assert torch.autograd.gradcheck(lambda v: segment_mean(v, offsets), (values,))


def test_segment_mean_edge_cases():
    assert segment_mean(torch.randn(0, 4), torch.zeros(1, dtype=torch.long)).shape == (0, 4)
    v = torch.randn(5, 2)
    torch.testing.assert_close(segment_mean(v, torch.tensor([0, 5])), v.mean(0, keepdim=True))
    torch.testing.assert_close(segment_mean(v, torch.arange(6)), v)  # all length 1
    with pytest.raises(ValueError):
        segment_mean(torch.randn(5), torch.tensor([0, 5]))


# ---------------------------------------------------------------------------------------------
# PatchIndex
def test_patch_index_roundtrip_dedup_and_empty():
    patches = [[[5, 6, 7]], [[5, 6, 7], [8]], [[9, 10], [8], [5, 6, 7]]]
    index = PatchIndex.from_patches(patches, [3, 11, 40])
    index.validate(seq_len=20, batch=3)
    assert index.num_patches == 3
    assert index.num_items == 3  # [5,6,7], [8], [9,10] stored once each
    assert index.title_ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert index.title_offsets.tolist() == [0, 3, 4, 6]
    assert index.patch_items.tolist() == [0, 0, 1, 2, 1, 0]
    assert index.patch_offsets.tolist() == [0, 1, 3, 6]
    assert index.to_patches() == (patches, [3, 11, 40])
    moved = index.to("cpu")
    assert isinstance(moved, PatchIndex) and moved.device.type == "cpu"
    assert all(t.dtype == torch.long for t in vars(moved).values())

    empty = PatchIndex.empty()
    empty.validate(seq_len=4, batch=2)
    assert empty.num_patches == 0 and empty.num_items == 0 and empty.num_title_tokens == 0
    assert empty.to_patches() == ([], [])


def _good_index() -> PatchIndex:
    return PatchIndex.from_patches([[[5, 6]], [[7], [5, 6]]], [1, 6])


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("title_offsets", [1, 2, 3], "must be 0"),
        ("title_offsets", [0, 2, 2], "there are 3"),
        ("title_offsets", [0, 2, 2, 3], "strictly increasing"),
        ("title_offsets", [0, 3, 2, 3], "strictly increasing"),
        ("patch_offsets", [0, 1, 4], "there are 3"),
        ("patch_offsets", [0, 1, 1, 3], "strictly increasing"),
        ("patch_offsets", [0, 3], "patch_positions"),
        ("patch_items", [0, 1, 2], "out of range"),
        ("patch_items", [0, -1, 0], "out of range"),
        ("patch_positions", [1, 8], "out of range"),
        ("patch_positions", [-1, 6], "out of range"),
        ("patch_positions", [6, 6], "distinct"),
        ("patch_positions", [1], "patch_positions"),
    ],
)
def test_validate_rejects_inconsistent_index(field, value, match):
    index = _good_index()
    index.validate(seq_len=4, batch=2)
    setattr(index, field, torch.tensor(value, dtype=torch.long))
    with pytest.raises(ValueError, match=match):
        index.validate(seq_len=4, batch=2)


def test_validate_rejects_wrong_dtype_and_shape():
    index = _good_index()
    index.title_ids = index.title_ids.int()
    with pytest.raises(ValueError, match="torch.long"):
        index.validate(seq_len=4, batch=2)
    index = _good_index()
    index.patch_positions = index.patch_positions.view(2, 1)
    with pytest.raises(ValueError, match="1-D"):
        index.validate(seq_len=4, batch=2)


# ---------------------------------------------------------------------------------------------
# embed_with_patches vs the per-item reference
@pytest.mark.parametrize("seed", range(4))
def test_embed_matches_reference_values_and_weight_grads(seed):
    input_ids, index = random_batch(seed)
    index.validate(seq_len=input_ids.shape[1], batch=input_ids.shape[0])
    assert index.patch_offsets.diff().max() > 1 and index.patch_offsets.diff().min() == 1  # both kinds
    assert len({int(p) // input_ids.shape[1] for p in index.patch_positions}) > 1  # several rows
    torch.manual_seed(seed)
    emb = nn.Embedding(97, 16)
    upstream = torch.randn(*input_ids.shape, 16)

    got = embed_with_patches(emb, input_ids, index, placeholder_id=PLACEHOLDER)
    (g_got,) = torch.autograd.grad((got * upstream).sum(), emb.weight)
    want = per_item_loop_reference(emb, input_ids, index)
    (g_want,) = torch.autograd.grad((want * upstream).sum(), emb.weight)

    assert got.shape == (*input_ids.shape, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=0)
    # the placeholder row never gets a gradient: its outputs are all overwritten
    assert g_got[PLACEHOLDER].abs().max() == 0


def test_embed_patch_vectors_are_means_of_means():
    emb = nn.Embedding(20, 4)
    w = emb.weight.detach()
    input_ids = torch.tensor([[2, PLACEHOLDER, 3], [PLACEHOLDER, 4, 5]])
    index = PatchIndex.from_patches([[[7, 8, 9]], [[10], [11, 12, 13]]], [1, 3])
    out = embed_with_patches(emb, input_ids, index).detach()
    torch.testing.assert_close(out[0, 0], w[2])
    torch.testing.assert_close(out[0, 1], w[7:10].mean(0))
    torch.testing.assert_close(out[1, 0], (w[10] + w[11:14].mean(0)) / 2)  # items weigh the same
    torch.testing.assert_close(out[1, 2], w[5])


def test_embed_without_patches_is_plain_embedding():
    emb = nn.Embedding(50, 8)
    input_ids = torch.randint(0, 50, (2, 9))
    out = embed_with_patches(emb, input_ids, PatchIndex.empty())
    torch.testing.assert_close(out, emb(input_ids))


def test_placeholder_check():
    emb = nn.Embedding(50, 8)
    input_ids, index = random_batch(0, vocab=50)
    input_ids.view(-1)[index.patch_positions[0]] = 7
    with pytest.raises(ValueError, match="placeholder"):
        embed_with_patches(emb, input_ids, index, placeholder_id=PLACEHOLDER)


# ---------------------------------------------------------------------------------------------
# one call per invocation
@pytest.mark.parametrize("n_patches", [0, 1, 25])
def test_exactly_one_embedding_call(n_patches):
    emb = nn.Embedding(97, 8)
    counter = CallCounter(emb)
    input_ids, index = random_batch(3, n_patches=n_patches)
    assert index.num_patches == n_patches
    embed_with_patches(emb, input_ids, index)
    assert counter.calls == 1
    embed_with_patches(emb, input_ids, PatchIndex.empty())
    assert counter.calls == 2

    # the reference calls it once per item occurrence (+1): what deadlocks ZeRO-3
    counter.calls = 0
    per_item_loop_reference(emb, input_ids, index)
    assert counter.calls == 1 + int(index.patch_items.numel())


# ---------------------------------------------------------------------------------------------
# frozen and low-precision embeddings
def test_frozen_embedding():
    emb = nn.Embedding(97, 8)
    emb.weight.requires_grad_(False)
    input_ids, index = random_batch(1)
    out = embed_with_patches(emb, input_ids, index)
    assert not out.requires_grad
    torch.testing.assert_close(out, per_item_loop_reference(emb, input_ids, index), atol=1e-6, rtol=0)
    # downstream trainable parameters (e.g. LoRA adapters) still train
    adapter = nn.Linear(8, 8)
    adapter(out).sum().backward()
    assert adapter.weight.grad is not None and emb.weight.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_embedding_keeps_dtype(dtype):
    torch.manual_seed(0)
    emb32 = nn.Embedding(97, 16)
    emb = nn.Embedding(97, 16).to(dtype)
    emb.weight.data.copy_(emb32.weight.data.to(dtype))
    input_ids, index = random_batch(2)
    out = embed_with_patches(emb, input_ids, index)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.dtype == dtype
    # same as computing in fp32 from the rounded weights, then rounding once
    emb32.weight.data.copy_(emb.weight.data.float())
    want = embed_with_patches(emb32, input_ids, index).detach().to(dtype)
    torch.testing.assert_close(out.detach(), want, atol=0, rtol=0)
    ref = per_item_loop_reference(emb, input_ids, index)
    assert ref.dtype == dtype
    torch.testing.assert_close(out.detach(), ref.detach(), atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# a real (tiny, random) HF model
def test_hf_llama_input_embeddings_train():
    import transformers  # installed with the package: a missing one is a failure, not a skip
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings()
    input_ids, index = random_batch(5, batch=2, seq_len=30, n_patches=8)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.masked_fill(input_ids == PLACEHOLDER, -100)

    # no patches: identical to feeding input_ids
    plain = model(input_ids=input_ids, attention_mask=attention_mask).logits
    via = model(
        inputs_embeds=embed_with_patches(embedding, input_ids, PatchIndex.empty()),
        attention_mask=attention_mask,
    ).logits
    torch.testing.assert_close(via, plain)

    counter = CallCounter(embedding)
    out = model(
        inputs_embeds=embed_with_patches(embedding, input_ids, index),
        attention_mask=attention_mask,
        labels=labels,
    )
    out.loss.backward()
    assert counter.calls == 1
    grad = embedding.weight.grad
    title_only = sorted(set(index.title_ids.tolist()) - set(input_ids.flatten().tolist()))
    assert title_only, "test batch should have tokens used only in titles"
    assert (grad[title_only].abs().amax(dim=1) > 0).all()  # gradients flow through the patch means
    assert grad[PLACEHOLDER].abs().max() == 0


# ---------------------------------------------------------------------------------------------
# 2 ranks, DeepSpeed ZeRO-3 on CPU
def _launch_zero3(extra: list[str], timeout: float) -> tuple[int | None, str, float]:
    """Run the 2-rank script in its own process group; (returncode or None on timeout, output, s)."""
    from tests.distlaunch import launch

    run = launch(ZERO3_SCRIPT, extra, nprocs=2, timeout=timeout)
    return run.returncode, run.output, run.seconds


@pytest.mark.multiproc
def test_zero3_two_ranks_unequal_patches():
    rc, out, _ = _launch_zero3(["--mode", "patched", "--steps", "4"], timeout=120)
    assert rc is not None, f"ZeRO-3 run hung (killed after 120 s):\n{out[-4000:]}"
    assert rc == 0, out[-6000:]
    ok = dict(re.findall(r"RANK (\d) OK (steps=4 loss=\S+ embed_calls=4 patches=\[[^\]]*\])", out))
    assert set(ok) == {"0", "1"}, out[-6000:]
    patches = {
        r: [int(x) for x in re.search(r"patches=\[([^\]]*)\]", line).group(1).split(",")]
        for r, line in ok.items()
    }
    assert sum(patches["0"]) > 4 * sum(patches["1"]) and 0 in patches["1"]  # truly unequal, incl. none


@pytest.mark.multiproc
def test_zero3_per_item_reference_hangs():
    """The released approach (one embedding call per item) deadlocks ZeRO-3 when ranks hold
    different item counts. The script's gloo timeout (20 s) turns the hang into an error; the
    subprocess timeout is a backstop. Both ranks must have reached the training loop, so a slow
    start cannot pass for a hang."""
    rc, out, _ = _launch_zero3(["--mode", "reference", "--steps", "2", "--pg-timeout", "20"], timeout=90)
    assert "REFERENCE-DONE" not in out, out[-4000:]
    started = set(re.findall(r"RANK (\d) TRAINING mode=reference", out))
    assert started == {"0", "1"}, out[-4000:]
    assert rc is None or (rc != 0 and "Timed out" in out), out[-4000:]
