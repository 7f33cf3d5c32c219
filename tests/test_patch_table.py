"""tools/export_patch_table.py: the item-patch table of a run, and a patched prompt rebuilt from
that table alone (plus the model's token embeddings, which any server has) gives the training
path's logits."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import polars as pl
import torch

from patchrec_dist.data.catalog import catalog_titles
from patchrec_dist.data.manifest import load_manifest
from patchrec_dist.model.patch_embed import embed_with_patches
from patchrec_dist.model.patch_table import inputs_embeds_from_table, load_patch_table
from patchrec_dist.model.tiny import save_tiny_model
from patchrec_dist.patching.collate import collate_features
from patchrec_dist.patching.features import assemble
from patchrec_dist.patching.layouts import TEXT, LayoutSpec, layout_arrays
from patchrec_dist.patching.prompt import PATCHREC_TOKENS, build_prompt_tokens, resolve_template
from tests.distlaunch import REPO


def _run(tmp_path, data: str):
    """A finished run as the tool reads it: RUN/config.json and the export RUN/final."""
    run = tmp_path / "run"
    titles = catalog_titles(load_manifest(data))
    save_tiny_model(str(run / "final"), titles, vocab_size=300, hidden_size=32)
    (run / "config.json").write_text(json.dumps({"data": data, "stage": "pft-s"}))
    return run


def test_prompt_rebuilt_from_the_table_gives_the_training_paths_logits(small_dataset, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, out = _run(tmp_path, small_dataset), tmp_path / "table"
    proc = subprocess.run([sys.executable, "tools/export_patch_table.py", str(run), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    items, specials, meta = load_patch_table(str(out))
    manifest = load_manifest(small_dataset)
    titles = catalog_titles(manifest)
    assert items.shape == (len(titles), 32) and items.dtype == torch.float32 and meta["items"] == len(titles)
    table = pl.read_parquet(out / "items.parquet")
    assert table["title"].to_list() == titles and table["row"].to_list() == list(range(len(titles)))

    model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    embedding = model.get_input_embeddings()
    ids = [tokenizer.convert_tokens_to_ids(t) for t in PATCHREC_TOKENS]
    assert [s["id"] for s in meta["special_tokens"]] == ids
    torch.testing.assert_close(specials, embedding.weight[ids].detach())

    tokens = build_prompt_tokens(tokenizer, resolve_template(manifest.prompt), titles)
    history = np.random.default_rng(0).integers(0, len(titles), size=23)
    layout = layout_arrays(LayoutSpec("pft-s", group_size=3), len(history))
    assert (layout.kinds != TEXT).sum() >= 2  # item and session patches both
    features = assemble(tokens, history, layout, target=int(history[-1]))
    batch = collate_features([features], tokens)
    with torch.no_grad():
        trained = model(inputs_embeds=embed_with_patches(embedding, batch.input_ids, batch.patches)).logits
        groups = [history[s:e] for k, s, e in zip(layout.kinds, layout.starts, layout.ends) if k != TEXT]
        served = inputs_embeds_from_table(embedding(batch.input_ids[0]), features.patch_positions.tolist(), groups, items)
        rebuilt = model(inputs_embeds=served.unsqueeze(0)).logits
    torch.testing.assert_close(rebuilt, trained, rtol=1e-5, atol=1e-5)


def test_a_run_without_its_data_set_is_refused(tmp_path):
    save_tiny_model(str(tmp_path / "model"), ["A", "B"], vocab_size=300, hidden_size=16)
    proc = subprocess.run([sys.executable, "tools/export_patch_table.py", str(tmp_path / "model"), str(tmp_path / "t")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "give --data" in proc.stderr
    assert not (tmp_path / "t").exists()
