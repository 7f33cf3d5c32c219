"""The patch table: every catalog item's item-patch vector, for servers that take prompt embeddings.

An item patch is the mean of its title's token input embeddings (model/patch_embed.py); a session
patch is the mean of its items' patches. Both depend only on the model's embedding table and the
catalog, so they can be computed once and served: a server that accepts ``inputs_embeds`` (vLLM's
prompt embeddings, TGI, a plain ``model(inputs_embeds=...)``) builds a PatchRec prompt from
token embeddings of its text and rows of this table, without this package.

Folder layout (``write_patch_table``)::

    patch_table.safetensors   item_patches (items x hidden, the model's dtype),
                              special_tokens (the PatchRec tokens' input embeddings, same dtype)
    items.parquet             row (= index into item_patches), item_id, title, title_tokens
    patch_table.json          the special tokens' names, ids and rows; hidden size, dtype, where
                              the vectors came from

Means are taken in fp32 and cast to the model's dtype, as in training, so a bf16 table's item
rows equal the training path's bf16 item patches. A session patch built from the table is the
mean of bf16 rows, where training averages the fp32 item means: equal in fp32, within bf16
rounding in bf16.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from patchrec_dist.model.patch_embed import segment_mean
from patchrec_dist.patching.prompt import PATCHREC_TOKENS, PromptTokens

TABLE_FILE = "patch_table.safetensors"
ITEMS_FILE = "items.parquet"
META_FILE = "patch_table.json"


@torch.no_grad()
def item_patch_vectors(embedding: nn.Module, tokens: PromptTokens, chunk_items: int = 4096) -> Tensor:
    """(items, hidden): each catalog item's title-token mean, in the embedding's dtype; CHUNK_ITEMS
    titles per embedding call, so a catalog of millions of items never holds all token vectors."""
    weight = embedding.weight
    offsets = torch.as_tensor(tokens.title_offsets, dtype=torch.long)
    flat = torch.as_tensor(tokens.title_flat, dtype=torch.long)
    out = []
    for start in range(0, tokens.num_items, chunk_items):
        end = min(start + chunk_items, tokens.num_items)
        ids = flat[offsets[start] : offsets[end]].to(weight.device)
        vecs = embedding(ids).float()
        out.append(segment_mean(vecs, (offsets[start : end + 1] - offsets[start]).to(weight.device)).to(weight.dtype))
    return torch.cat(out).cpu()


def write_patch_table(out: str, model: Any, tokenizer: Any, tokens: PromptTokens, catalog: Any,
                      provenance: dict[str, Any]) -> str:
    """The table of MODEL (an HF causal LM) over TOKENS' catalog into the local folder OUT.
    CATALOG: the data set's catalog (polars: item, item_id, title), in item-index order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    embedding = model.get_input_embeddings()
    items = item_patch_vectors(embedding, tokens)
    if len(catalog) != len(items):
        raise ValueError(f"catalog has {len(catalog)} items, the prompt tokens {len(items)}")
    ids = [tokenizer.convert_tokens_to_ids(t) for t in PATCHREC_TOKENS]
    with torch.no_grad():
        specials = embedding(torch.as_tensor(ids, device=embedding.weight.device)).cpu()
    os.makedirs(out, exist_ok=True)
    save_file({"item_patches": items.contiguous(), "special_tokens": specials.contiguous()},
              os.path.join(out, TABLE_FILE), metadata={"format": "pt"})
    lengths = np.diff(tokens.title_offsets)
    pq.write_table(pa.table({"row": np.arange(len(items), dtype=np.int64),
                             "item_id": catalog["item_id"].cast(str).to_list(),
                             "title": catalog["title"].to_list(), "title_tokens": lengths.astype(np.int32)}),
                   os.path.join(out, ITEMS_FILE))
    meta = {"hidden_size": items.shape[1], "dtype": str(items.dtype).removeprefix("torch."), "items": len(items),
            "special_tokens": [{"token": t, "id": i, "row": r} for r, (t, i) in enumerate(zip(PATCHREC_TOKENS, ids))],
            "item_patch": "mean of the title's token input embeddings (fp32 mean, cast to dtype)",
            "session_patch": "mean of its items' item patches", **provenance}
    with open(os.path.join(out, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    return out


def load_patch_table(folder: str) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """(item_patches, special_tokens, meta) of a folder written by write_patch_table."""
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(folder, TABLE_FILE))
    with open(os.path.join(folder, META_FILE)) as f:
        meta = json.load(f)
    return tensors["item_patches"], tensors["special_tokens"], meta


def inputs_embeds_from_table(token_embeds: Tensor, patch_positions: Sequence[int],
                             patch_items: Sequence[Sequence[int]], item_patches: Tensor) -> Tensor:
    """What a server does: a prompt's token embeddings (L, H) with each patch position replaced by
    the mean of its items' table rows (one item: an item patch; several: a session patch)."""
    out = token_embeds.clone()
    for pos, items in zip(patch_positions, patch_items):
        out[pos] = item_patches[torch.as_tensor(list(items))].float().mean(0).to(out.dtype)
    return out


__all__ = ["inputs_embeds_from_table", "item_patch_vectors", "load_patch_table", "write_patch_table"]
