"""Constrained generation of the next item's title: top-K catalog items per example.

The prompt of an example stops where the answer starts (`generation_features` cuts the assembled
ids there, `collate_for_generation` left-pads a batch of them). Generation may then only spell a
sequence of the catalog's `TitleTrie` (an answer followed by the end-of-turn token); the result per
example is up to K distinct leaves (a leaf = one title = the frozenset of items with that title),
best first, with their scores and token ids.

Two implementations of one beam search:

- `constrained_beam_search` (used by `generate_topk`): batched beam search over the trie with a KV
  cache. One embedding call builds ``inputs_embeds`` with the patches, one prefill forward fills
  the cache, then every step feeds only the chosen tokens of the live beams. Trie masking is done
  on the trie's edges as tensor ops (no vocabulary-sized masks, no Python per beam), finished
  leaves are distinct by construction (a trie path is a sequence), and an example whose result can
  no longer change leaves the batch (its cache rows are dropped).
- `released_protocol_generate`: the SLOW REFERENCE of the released PatchRec evaluation: Hugging
  Face ``generate`` with ``use_cache=False`` (every step re-runs the whole prompt and everything
  generated) and a Python ``prefix_allowed_tokens_fn`` that, for every beam at every step, finds
  the answer start in the whole input and walks the trie from there, as the released code did.
  Benchmarks and tests only.

Both follow Hugging Face's beam search rules (transformers 5.x ``_beam_search``), so on the same
inputs they return the same leaves in the same order: at each step the candidates are ranked by
their summed log-probability (log-softmax over the full vocabulary, then restricted to the trie); a
candidate that completes a title (end-of-turn) is kept as finished if it ranks in the top
``num_beams``; the best ``num_beams`` unfinished candidates among the top ``2 * num_beams`` go on;
the finished pool keeps the best ``num_beams`` by ``logprob / length ** length_penalty``;
``early_stopping`` has HF's meaning. One HF artefact is not copied: HF starts all beams but
one at -1e9 and, when a step has fewer than ``2 * num_beams`` allowed candidates, carries copies
with that score; when they finish, their score (-1e9 / length, or -1e9 + logprob, which rounds to
-1e9 in float32) beats or ties HF's empty-slot marker (-1e9), so these fillers can take pool
slots and, with ``early_stopping=True``, make the pool "full" and end the search early (HF then
returns fewer real titles). Here fillers never exist, so with ``early_stopping=True`` the two
may differ; with ``"never"`` or False they agree (tests, ``length_penalty`` 0 and 1).

Defaults: ``length_penalty=0`` (the score is the title's log-probability under the model) and
``early_stopping="never"`` (the canonical beam search: stop when no live beam can still beat the
worst finished one). The released code used HF's defaults
(``length_penalty=1``, ``early_stopping=True``) plus diverse beam groups (20 groups, penalty 0.8),
which transformers 5 no longer ships; pass the first two for that ranking.

Note: in transformers 5.x, ``generate(inputs_embeds=...)`` on a decoder-only model forces
``use_cache=True`` whatever is asked; the reference therefore passes the prompt ids and puts the
patch vectors in with a forward hook on the input embedding, so that it really runs without a
cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from patchrec_dist.evaluate.trie import ROOT, TitleTrie, generation_lead_length, generation_prompt_tail
from patchrec_dist.model.patch_embed import embed_with_patches
from patchrec_dist.patching.collate import Batch, collate_features
from patchrec_dist.patching.features import Features
from patchrec_dist.patching.prompt import PromptTokens

__all__ = [
    "Hit",
    "collate_for_generation",
    "constrained_beam_search",
    "diverse_beam_search",
    "exact_catalog_topk",
    "exact_memory_bytes",
    "generate_topk",
    "generation_cut",
    "generation_features",
    "prompt_ids_for_generation",
    "released_protocol_generate",
]

METHODS = ("kv-cache", "released-reference", "exact", "paper")


class Hit(NamedTuple):
    """One generated title: the catalog items with that exact title, its score, its tokens (ending
    with the end-of-turn token)."""

    items: frozenset[int]
    score: float
    tokens: list[int]


# -- prompts that stop where the answer starts -----------------------------------------------------
def generation_cut(features: Features, tokens: PromptTokens) -> int:
    """Length of the generation prompt inside ``features.input_ids``: everything up to and including
    ``between`` and the answer's lead (`generation_lead_length`), without the answer, end-of-turn and
    suffix. The same for every target (``label_start`` is not: it moves with the target's lead
    tokenization)."""
    answer_at = int(features.label_start) - int(tokens.answer_label_start[features.target])
    cut = answer_at + generation_lead_length(tokens)
    tail = generation_prompt_tail(tokens)
    ids = features.input_ids
    if cut < len(tail) or cut > len(ids) or not np.array_equal(ids[cut - len(tail) : cut], tail):
        raise ValueError("features do not hold a full prompt with its answer (already cut for generation?)")
    return cut


def prompt_ids_for_generation(features: Features, tokens: PromptTokens) -> np.ndarray:
    """``features.input_ids`` up to where generation starts (a copy)."""
    return features.input_ids[: generation_cut(features, tokens)].copy()


def generation_features(features: Features, tokens: PromptTokens) -> Features:
    """FEATURES with the answer, end-of-turn and suffix cut off (no labels). Patch positions all lie in
    the history, before the cut, so the patch index is unchanged."""
    cut = generation_cut(features, tokens)
    return dataclasses.replace(features, input_ids=features.input_ids[:cut].copy(), label_start=cut, label_end=cut)


def collate_for_generation(features: Sequence[Features], tokens: PromptTokens, pad_to_multiple: int = 1) -> Batch:
    """Full-prompt features -> a left-padded generation batch (what `generate_topk` takes)."""
    return collate_features([generation_features(f, tokens) for f in features], tokens, "left", pad_to_multiple)


@dataclasses.dataclass
class GenerationCollator:
    """collate_fn for evaluation streams: the worker's Features (or lists of them) -> a generation batch."""

    tokens: PromptTokens
    pad_to_multiple: int = 1

    def __call__(self, items: list) -> Batch:
        feats = [f for it in items for f in (it if isinstance(it, list) else [it])]
        return collate_for_generation(feats, self.tokens, self.pad_to_multiple)


# -- checks ------------------------------------------------------------------------------------------
def _check_args(num_beams: int, top_k: int, early_stopping: Any) -> None:
    if num_beams < 1 or top_k < 1:
        raise ValueError(f"num_beams and top_k must be >= 1, got {num_beams}, {top_k}")
    if top_k > num_beams:
        raise ValueError(f"top_k={top_k} > num_beams={num_beams}: beam search keeps num_beams finished titles")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _inputs(model: nn.Module, batch: Batch, trie: TitleTrie) -> tuple[Tensor, Tensor]:
    device = _model_device(model)
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    if ids.dim() != 2 or ids.shape != mask.shape or ids.shape[0] == 0:
        raise ValueError(f"expected a non-empty (B, L) batch, got input_ids {tuple(ids.shape)}")
    if not bool(mask[:, -1].all()):
        raise ValueError("generation needs a left-padded batch (Collator(padding_side='left') / collate_for_generation)")
    tail = trie.prompt_tail
    if tail is not None and len(tail):
        want = torch.as_tensor(tail, device=device)
        if ids.shape[1] < len(tail) or not bool((ids[:, -len(tail) :] == want).all()):
            raise ValueError("batch rows do not end where the answer starts; cut them with generation_features / "
                             "collate_for_generation (a prompt with its answer would leak the target)")
    return ids, mask


def _hits(trie: TitleTrie, nodes: np.ndarray, scores: np.ndarray, top_k: int) -> list[Hit]:
    out = []
    for node, score in zip(nodes[:top_k].tolist(), scores[:top_k].tolist()):
        if node < 0:
            break
        out.append(Hit(trie.leaf_items_of(node), float(score), trie.sequence(node)))
    return out


def _prefill(model: nn.Module, embedding: nn.Module, ids: Tensor, mask: Tensor, batch: Batch) -> tuple[Any, Tensor, Tensor]:
    """(KV cache, log-probabilities of the first answer token (b, V), prompt lengths): the one
    embedding call with the patches and the one prompt forward every decoding starts with."""
    from transformers import DynamicCache

    embeds = embed_with_patches(embedding, ids, batch.patches)
    cache = DynamicCache(config=model.config)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.long().cumsum(-1) - 1).clamp_min(0),
                cache=cache, use_cache=True, logits_to_keep=1)
    return cache, torch.log_softmax(out.logits[:, -1].float(), dim=-1), mask.long().sum(-1)


# -- the KV-cache beam search ---------------------------------------------------------------------
@torch.no_grad()
def constrained_beam_search(model: nn.Module, embedding: nn.Module, batch: Batch, trie: TitleTrie, *,
                            num_beams: int = 20, top_k: int = 20, max_new_tokens: int | None = None,
                            length_penalty: float = 0.0, early_stopping: bool | str = "never",
                            exclude: Sequence[Iterable[int]] | None = None) -> list[list[Hit]]:
    """Per example of the left-padded generation BATCH: up to TOP_K distinct catalog titles, best
    first, as `Hit` (items, score = summed log-prob / length ** LENGTH_PENALTY, token ids).
    EXCLUDE: per example, catalog items it must not get (its history, for --exclude-seen): a title
    all of whose items are excluded is never generated (the trie's paths to it are closed, so the
    TOP_K titles come from the rest; a shared title keeps its other items).

    ``embedding`` is the module to embed the prompt with (``model.get_input_embeddings()``; called
    once, with the patches); later steps feed token ids to ``model``, which takes a
    ``cache=`` (transformers 5.x). Deterministic; the model is used as is (call ``.eval()`` first).
    """
    _check_args(num_beams, top_k, early_stopping)
    ids, mask = _inputs(model, batch, trie)
    device = ids.device
    b, _ = ids.shape
    nb = num_beams
    max_new = trie.max_depth if max_new_tokens is None else int(max_new_tokens)
    tt = trie.tensors(device)
    cache, logp, prompt_len = _prefill(model, embedding, ids, mask, batch)

    # live beams, one row each (rows of an example are contiguous only by accident; `ex` says whose)
    node = torch.full((b,), ROOT, dtype=torch.long, device=device)
    score = torch.zeros(b, dtype=torch.float32, device=device)
    ex = torch.arange(b, device=device)
    pool_score = torch.full((b, nb), -torch.inf, device=device)
    pool_node = torch.full((b, nb), -1, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    ones = torch.ones((1, 1), dtype=mask.dtype, device=device)
    hyp_never = float(max_new) ** length_penalty
    closed = _closed_keys(trie, exclude, device) if exclude is not None else None

    for t in range(max_new):
        # every trie edge out of every live beam is a candidate
        lo = tt.child_offsets[node]
        count = tt.child_offsets[node + 1] - lo
        n_cand = int(count.sum())
        row = torch.repeat_interleave(torch.arange(len(node), device=device), count, output_size=n_cand)
        first = torch.cumsum(count, 0) - count
        edge = lo[row] + torch.arange(n_cand, device=device) - first[row]
        tok = tt.child_tokens[edge]
        child = tt.child_nodes[edge]
        cand = score[row] + logp[row, tok]
        cex = ex[row]
        if closed is not None:
            ok = ~torch.isin(cex * trie.num_nodes + child, closed)
            tok, child, cand, cex, row = tok[ok], child[ok], cand[ok], cex[ok], row[ok]
            n_cand = len(tok)
        # rank the candidates of each example by score (two stable sorts: score, then example)
        order = torch.argsort(cand, descending=True, stable=True)
        order = order[torch.argsort(cex[order], stable=True)]
        tok, child, cand, cex, row = tok[order], child[order], cand[order], cex[order], row[order]
        start = torch.searchsorted(cex, cex)  # first candidate of the same example
        rank = torch.arange(n_cand, device=device) - start
        leaf = tt.is_leaf[child]

        # finished: completed titles ranked in the top num_beams join the pool of the num_beams best
        fin = leaf & (rank < nb)
        if bool(fin.any()):
            new_score = torch.full((b, nb), -torch.inf, device=device)
            new_node = torch.full((b, nb), -1, dtype=torch.long, device=device)
            norm = cand[fin] / tt.depth[child[fin]].to(torch.float32) ** length_penalty
            new_score[cex[fin], rank[fin]] = norm
            new_node[cex[fin], rank[fin]] = child[fin]
            merged_score = torch.cat([pool_score, new_score], 1)
            pool_score, pick = torch.topk(merged_score, nb, dim=1)
            pool_node = torch.cat([pool_node, new_node], 1).gather(1, pick)

        # running: the best num_beams unfinished candidates among the top 2 * num_beams
        open_ = ~leaf
        before = torch.cumsum(open_.long(), 0) - open_.long()
        open_rank = before - before[start]
        keep = open_ & (rank < 2 * nb) & (open_rank < nb)
        node, score, ex, parent, tok = child[keep], cand[keep], cex[keep], row[keep], tok[keep]

        # an example is done when no live beam can still enter its pool (HF's heuristic)
        best = torch.full((b,), -torch.inf, device=device).scatter_reduce(0, ex, score, "amax")
        hyp = hyp_never if (early_stopping == "never" and length_penalty > 0) else float(t + 1) ** length_penalty
        full = (pool_node >= 0).all(1)
        stop = full & ~(best / hyp > pool_score.min(1).values)
        if early_stopping is True:
            stop = stop | full
        done = done | stop | ~torch.isfinite(best)
        live = ~done[ex]
        node, score, ex, parent, tok = node[live], score[live], ex[live], parent[live], tok[live]
        if len(node) == 0 or t + 1 == max_new:
            break

        cache.reorder_cache(parent)
        step_mask = torch.cat([mask[ex], ones.expand(len(ex), t + 1)], 1)
        out = model(input_ids=tok[:, None], attention_mask=step_mask, position_ids=(prompt_len[ex] + t)[:, None],
                    cache=cache, use_cache=True)
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        del out

    nodes, scores = pool_node.cpu().numpy(), pool_score.cpu().numpy()
    return _without_seen([_hits(trie, nodes[i], scores[i], top_k) for i in range(b)], exclude)


def _without_seen(hits: list[list[Hit]], exclude: Sequence[Iterable[int]] | None) -> list[list[Hit]]:
    """A shared title stands for its items the example has not seen."""
    if exclude is None:
        return hits
    return [[h._replace(items=h.items - frozenset(int(i) for i in seen)) for h in row]
            for row, seen in zip(hits, exclude)]


def _closed_keys(trie: TitleTrie, exclude: Sequence[Iterable[int]], device: torch.device) -> torch.Tensor:
    """example * nodes + node for every node an example's beams may not enter (sorted)."""
    keys = [e * trie.num_nodes + trie.excluded_nodes(items) for e, items in enumerate(exclude)]
    return torch.from_numpy(np.concatenate(keys) if keys else np.zeros(0, np.int64)).to(device)


# -- the paper's decoding: diverse beam groups -------------------------------------------------------
@torch.no_grad()
def diverse_beam_search(model: nn.Module, embedding: nn.Module, batch: Batch, trie: TitleTrie, *, groups: int = 20,
                        diversity_penalty: float = 0.8, top_k: int = 20, length_penalty: float = 1.0,
                        max_new_tokens: int | None = None) -> list[list[Hit]]:
    """The released protocol's decoding with a KV cache: diverse beam search (Vijayakumar et al.;
    transformers 4.x group beam search, which transformers 5 no longer ships) with GROUPS groups
    of one beam each, over the title trie. Per example, up to TOP_K distinct titles, best first.

    At every step the groups choose in order; group g's log-probabilities (log-softmax over the
    whole vocabulary, then the trie) lose DIVERSITY_PENALTY for every earlier group of the same
    example that chose the same token at this step (Hamming diversity), and those penalised
    scores are what a beam sums. Of a group's two best candidates, a completed title joins the
    group's one-title pool (scored sum / generated length ** LENGTH_PENALTY) if it ranks first,
    and the best unfinished one goes on; a group is done when its pool holds a title its running
    beam can no longer beat (HF's heuristic at early_stopping=False). The result is every group's
    title, sorted by score; two groups that end on the same title count once.

    The groups' beams are rows of one batch: one prefill, one forward per step for every group."""
    if groups < 1 or top_k < 1:
        raise ValueError(f"groups and top_k must be >= 1, got {groups}, {top_k}")
    ids, mask = _inputs(model, batch, trie)
    device = ids.device
    b = ids.shape[0]
    max_new = trie.max_depth if max_new_tokens is None else int(max_new_tokens)
    tt = trie.tensors(device)
    cache, logp, prompt_len = _prefill(model, embedding, ids, mask, batch)
    rows = torch.arange(b, device=device).repeat_interleave(groups)  # row = example * groups + group
    cache.reorder_cache(rows)
    logp = logp[rows]
    r = b * groups
    node = torch.full((r,), ROOT, dtype=torch.long, device=device)
    score = torch.zeros(r, device=device)
    running = torch.ones(r, dtype=torch.bool, device=device)  # not done, and with a live beam
    pool_score = torch.full((r,), -torch.inf, device=device)
    pool_node = torch.full((r,), -1, dtype=torch.long, device=device)
    vocab = logp.shape[1]
    ones = torch.ones((1, 1), dtype=mask.dtype, device=device)
    for t in range(max_new):
        chosen = torch.zeros((b, vocab), device=device)  # tokens the earlier groups chose at this step
        next_tok = torch.full((r,), int(trie.eot if trie.eot is not None else 0), dtype=torch.long, device=device)
        for g in range(groups):
            at = torch.arange(b, device=device) * groups + g
            live = running[at]
            lo = tt.child_offsets[node[at]]
            count = torch.where(live, tt.child_offsets[node[at] + 1] - lo, 0)
            width = max(int(count.max()), 2)  # two candidates, as HF's topk takes 2 x group size
            col = torch.arange(width, device=device)
            valid = col[None, :] < count[:, None]
            edge = (lo[:, None] + col[None, :]).clamp(max=max(tt.child_tokens.numel() - 1, 0))
            tok, child = tt.child_tokens[edge], tt.child_nodes[edge]
            ex = torch.arange(b, device=device)[:, None]
            cand = score[at, None] + logp[at[:, None], tok] - diversity_penalty * chosen[ex, tok]
            cand = torch.where(valid, cand, -torch.inf)
            top = torch.topk(cand, 2, dim=1)  # sorted
            c_tok, c_child = tok.gather(1, top.indices), child.gather(1, top.indices)
            c_score, c_ok = top.values, valid.gather(1, top.indices)
            leaf0 = c_ok[:, 0] & tt.is_leaf[c_child[:, 0]]
            norm = c_score[:, 0] / float(t + 1) ** length_penalty
            better = leaf0 & (norm > pool_score[at])
            pool_score[at] = torch.where(better, norm, pool_score[at])
            pool_node[at] = torch.where(better, c_child[:, 0], pool_node[at])
            # the beam that goes on: the best unfinished of the two (a node has at most one leaf child)
            pick = leaf0.long()[:, None]
            go_child, go_tok = c_child.gather(1, pick)[:, 0], c_tok.gather(1, pick)[:, 0]
            go_ok = c_ok.gather(1, pick)[:, 0] & ~tt.is_leaf[go_child]
            new_score = c_score.gather(1, pick)[:, 0]
            node[at] = torch.where(live & go_ok, go_child, node[at])
            score[at] = torch.where(live & go_ok, new_score, score[at])
            done = ~go_ok | ((pool_node[at] >= 0) & (pool_score[at] >= new_score / float(t + 1) ** length_penalty))
            running[at] = live & ~done
            hit = live & go_ok
            chosen[torch.arange(b, device=device)[hit], go_tok[hit]] += 1.0
            next_tok[at] = torch.where(hit, go_tok, next_tok[at])
        if not bool(running.any()) or t + 1 == max_new:
            break
        step_mask = torch.cat([mask[rows], ones.expand(r, t + 1)], 1)
        out = model(input_ids=next_tok[:, None], attention_mask=step_mask, position_ids=(prompt_len[rows] + t)[:, None],
                    cache=cache, use_cache=True)
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        del out
    return _group_hits(trie, pool_node.view(b, groups), pool_score.view(b, groups), top_k)


def _group_hits(trie: TitleTrie, nodes: Tensor, scores: Tensor, top_k: int) -> list[list[Hit]]:
    """Per example, the groups' titles best first (ties: the earlier group), each title once."""
    order = torch.argsort(-scores, dim=1, stable=True)
    nodes, scores = nodes.gather(1, order).cpu().numpy(), scores.gather(1, order).cpu().numpy()
    out = []
    for ns, ss in zip(nodes, scores):
        seen, hits = set(), []
        for n, sc in zip(ns.tolist(), ss.tolist()):
            if n >= 0 and n not in seen:
                seen.add(n)
                hits.append(Hit(trie.leaf_items_of(n), float(sc), trie.sequence(n)))
        out.append(hits[:top_k])
    return out


# -- exact catalog ranking ------------------------------------------------------------------------
def exact_memory_bytes(model: nn.Module, trie: TitleTrie, batch_size: int, prompt_len: int,
                       chunk_nodes: int = 1024) -> int:
    """What `exact_catalog_topk` holds at its peak for a batch: the KV cache of the prompts and of
    every inner trie node, plus one chunk's logits and attention scores."""
    cfg = model.config
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    elem = next(model.parameters()).element_size()
    fed = int((np.diff(trie.child_offsets)[1:] > 0).sum())  # inner nodes below the root
    kv = batch_size * (prompt_len + fed) * layers * 2 * kv_heads * head_dim * elem
    chunk = min(chunk_nodes, max(fed, 1))
    logits = batch_size * chunk * int(cfg.vocab_size) * 4 * 2  # float32 logits and their log-softmax
    scores = batch_size * heads * chunk * (prompt_len + fed) * 4
    return kv + logits + scores


@torch.no_grad()
def exact_catalog_topk(model: nn.Module, embedding: nn.Module, batch: Batch, trie: TitleTrie, *, top_k: int = 20,
                       exclude: Sequence[Iterable[int]] | None = None, chunk_nodes: int = 1024,
                       max_bytes: int | None = None) -> list[list[Hit]]:
    """Per example of the left-padded generation BATCH: the TOP_K catalog titles of highest
    log-likelihood given the prompt, exactly (what beam search approximates), as `Hit`s with
    score = the title's summed log-probability (beam search's score at length_penalty 0).

    The prompts are run once into a KV cache; then every inner node of the trie is fed once, as
    one token after the prompt at position prompt length + depth - 1, attending to the prompt and
    to its own ancestors only (a tree-shaped 4D mask), so shared title prefixes are computed once
    for the whole catalog. Nodes go in preorder (ancestors first) in chunks of CHUNK_NODES.
    EXCLUDE as in `constrained_beam_search`. MAX_BYTES: refuse (ValueError) a batch whose peak
    (`exact_memory_bytes`) is larger."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    ids, mask = _inputs(model, batch, trie)
    device = ids.device
    b, p = ids.shape
    need = exact_memory_bytes(model, trie, b, p, chunk_nodes)
    if max_bytes is not None and need > max_bytes:
        raise ValueError(
            f"--decoding exact: scoring all {trie.num_leaves:,} titles ({trie.num_nodes:,} trie nodes) for a batch of "
            f"{b} prompts of {p} positions needs about {need / 2**30:.1f} GiB (KV cache of the prompts and the trie, "
            f"one chunk's logits); the limit is {max_bytes / 2**30:.1f} GiB. Use a smaller --batch-size, a larger "
            "--exact-memory-gb, or beam search (--decoding beam)")
    dtype = next(model.parameters()).dtype
    cache, root_logp, prompt_len = _prefill(model, embedding, ids, mask, batch)
    n = trie.num_nodes
    edge_lp = torch.zeros((b, n), dtype=torch.float32, device=device)  # log p(token of node | its parent)

    def take_children(parents: np.ndarray, logp: Tensor) -> None:
        """edge_lp of the children of PARENTS (logp: (b, len(parents), V))."""
        starts = trie.child_offsets[parents]
        counts = trie.child_offsets[parents + 1] - starts
        which = np.repeat(np.arange(len(parents)), counts)
        kids = trie.child_nodes[np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts - starts, counts)]
        kid_t = torch.from_numpy(kids).to(device)
        edge_lp[:, kid_t] = logp[:, torch.from_numpy(which).to(device), torch.from_numpy(trie.token[kids]).to(device)]

    take_children(np.array([ROOT]), root_logp[:, None])
    inner = np.flatnonzero(np.diff(trie.child_offsets) > 0)
    feed = inner[inner != ROOT]  # preorder: every node's ancestors come before it
    column = np.full(n, -1, dtype=np.int64)
    column[feed] = p + np.arange(len(feed))
    # ancestors of each node below the root, deepest first, padded with the root
    depth_max = trie.max_depth
    anc = np.zeros((n, depth_max), dtype=np.int64)
    anc[:, 0] = np.arange(n)
    for d in range(1, depth_max):
        anc[:, d] = trie.parent[anc[:, d - 1]]
    neg = torch.finfo(dtype).min
    prompt_part = torch.where(mask.bool(), 0.0, neg).to(dtype)[:, None, None, :]  # (b, 1, 1, p)
    for lo in range(0, len(feed), chunk_nodes):
        q = feed[lo:lo + chunk_nodes]
        width = p + lo + len(q)
        a = anc[q]  # (c, depth_max): the node itself, its parent, ...; the root (prompt) where it runs out
        cols = column[a]
        ok = (a != ROOT) & (cols >= 0)
        tree = torch.zeros((len(q), width - p), dtype=torch.bool)
        r = np.repeat(np.arange(len(q)), ok.sum(1))
        tree[torch.from_numpy(r), torch.from_numpy(cols[ok] - p)] = True
        node_part = torch.where(tree.to(device), 0.0, neg).to(dtype)[None, None].expand(b, 1, -1, -1)
        full = torch.cat([prompt_part.expand(b, 1, len(q), p), node_part], dim=-1)
        tok = torch.from_numpy(trie.token[q]).to(device)[None].expand(b, -1)
        pos = prompt_len[:, None] + torch.from_numpy(trie.depth[q] - 1).to(device)[None]
        out = model(input_ids=tok, attention_mask=full, position_ids=pos, cache=cache, use_cache=True)
        take_children(q, torch.log_softmax(out.logits.float(), dim=-1))
        del out
    # a title's log-likelihood: the sum of its path's edges, computed depth by depth
    score = edge_lp
    for d in range(2, depth_max + 1):
        at = np.flatnonzero(trie.depth == d)
        score[:, torch.from_numpy(at).to(device)] += score[:, torch.from_numpy(trie.parent[at]).to(device)]
    leaves = torch.from_numpy(trie.leaf_nodes).to(device)
    leaf_score = score[:, leaves]
    if exclude is not None:
        for e, items in enumerate(exclude):
            closed = np.isin(trie.leaf_nodes, trie.excluded_nodes(items))
            leaf_score[e, torch.from_numpy(closed).to(device)] = -torch.inf
    order = torch.argsort(-leaf_score, dim=1, stable=True)[:, :top_k].cpu().numpy()  # ties: trie order
    top_scores = leaf_score.gather(1, torch.from_numpy(order).to(device)).cpu().numpy()
    return _without_seen([_hits(trie, np.where(np.isfinite(top_scores[i]), trie.leaf_nodes[order[i]], -1),
                                top_scores[i], top_k) for i in range(b)], exclude)


# -- the released protocol (slow reference) ------------------------------------------------------
def _find_last(seq: list[int], sub: list[int]) -> int:
    """Index right after the last occurrence of SUB in SEQ, or -1; a plain Python scan of the whole
    input, as the released code's `find_sub_list` did at every call."""
    found = -1
    m = len(sub)
    for i in range(len(seq) - m + 1):
        if seq[i : i + m] == sub:
            found = i + m
    return found


@torch.no_grad()
def released_protocol_generate(model: nn.Module, embedding: nn.Module, batch: Batch, trie: TitleTrie, *,
                               num_beams: int = 20, top_k: int = 20, max_new_tokens: int | None = None,
                               length_penalty: float = 0.0,
                               early_stopping: bool | str = "never") -> list[list[Hit]]:
    """SLOW REFERENCE, for tests and benchmarks only: the released evaluation protocol.

    Hugging Face ``generate`` (beam search, ``num_return_sequences=num_beams``) with
    ``use_cache=False`` (every step recomputes the whole sequence) and a Python
    ``prefix_allowed_tokens_fn`` that re-derives, for every beam at every step, where the answer
    starts by scanning the whole input, then walks the trie. Patch vectors are put in by a forward
    hook on the model's input embedding (HF forces a cache when generating from
    ``inputs_embeds``). Returns what `constrained_beam_search` returns; sequences HF keeps only as
    fillers (not a catalog title, or scored about -1e9) are dropped.
    """
    _check_args(num_beams, top_k, early_stopping)
    if trie.prompt_tail is None or trie.eot is None:
        raise ValueError("the reference needs a trie built with TitleTrie.from_prompt_tokens")
    from transformers import GenerationConfig

    ids, mask = _inputs(model, batch, trie)
    b, length = ids.shape
    marker = trie.prompt_tail.tolist()
    eot = int(trie.eot)
    max_new = trie.max_depth if max_new_tokens is None else int(max_new_tokens)

    def allowed(batch_id: int, sent: Tensor) -> list[int]:
        seq = sent.tolist()
        at = _find_last(seq, marker)
        if at < 0:
            return [eot]
        node = ROOT
        for token in seq[at:]:
            node = trie.step(node, token)
            if node < 0:
                return [eot]
        nxt = trie.children(node)
        return nxt.tolist() if len(nxt) else [eot]

    handle = None
    if batch.patches.num_patches:
        prompt_embeds = embed_with_patches(embedding, ids, batch.patches)

        def put_patches(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            rows, seq_len = output.shape[:2]
            if seq_len < length or rows % b:
                raise RuntimeError(f"reference: embedding called on {tuple(output.shape[:2])}, expected the whole "
                                   f"sequence (>= {length} positions) for {b} x beams rows: is a cache in use?")
            output = output.clone()
            output[:, :length] = prompt_embeds.repeat_interleave(rows // b, dim=0).to(output.dtype)
            return output

        handle = model.get_input_embeddings().register_forward_hook(put_patches)
    config = GenerationConfig(
        max_new_tokens=max_new, num_beams=num_beams, num_return_sequences=num_beams, do_sample=False,
        early_stopping=early_stopping, length_penalty=length_penalty, use_cache=False, eos_token_id=eot,
        pad_token_id=eot, bos_token_id=None, output_scores=True, return_dict_in_generate=True)
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                             prefix_allowed_tokens_fn=allowed)
    finally:
        if handle is not None:
            handle.remove()

    sequences = out.sequences[:, length:].view(b, num_beams, -1).cpu().tolist()
    scores = out.sequences_scores.view(b, num_beams).float().cpu().tolist()
    return hits_from_generate(trie, sequences, scores, top_k)


def hits_from_generate(trie: TitleTrie, sequences: list[list[list[int]]], scores: list[list[float]],
                       top_k: int) -> list[list[Hit]]:
    """Per example, HF generate's returned beams (new tokens, `sequences_scores`) as Hits: cut at
    the first end-of-text, fillers (not a catalog title, or scored about -1e9) and repeats dropped."""
    eot = int(trie.eot)
    results = []
    for seqs, scs in zip(sequences, scores):
        hits: list[Hit] = []
        seen: set[tuple[int, ...]] = set()
        for seq, sc in zip(seqs, scs):
            if eot not in seq or not sc > -1e6:
                continue
            seq = seq[: seq.index(eot) + 1]
            items = trie.items(seq)
            if not items or tuple(seq) in seen:
                continue
            seen.add(tuple(seq))
            hits.append(Hit(items, float(sc), seq))
        results.append(hits[:top_k])
    return results


# -- public entry -------------------------------------------------------------------------------
def generate_topk(model: nn.Module, embedding: nn.Module, batch: Batch, trie: TitleTrie, *, num_beams: int = 20,
                  top_k: int = 20, max_new_tokens: int | None = None, length_penalty: float = 0.0,
                  early_stopping: bool | str = "never", method: str = "kv-cache",
                  exclude: Sequence[Iterable[int]] | None = None, max_bytes: int | None = None,
                  diversity_penalty: float = 0.8) -> list[list[Hit]]:
    """The evaluation entry: top-K catalog titles per example of a left-padded generation batch
    (see `collate_for_generation`), each a `Hit` (items, score, tokens), best first.

    ``method="kv-cache"`` (default) is `constrained_beam_search`; ``"released-reference"`` runs the
    slow `released_protocol_generate` (same results, for comparisons); ``"exact"`` ranks the whole
    catalog by log-likelihood (`exact_catalog_topk`; NUM_BEAMS and the length rules do not apply;
    MAX_BYTES caps its memory); ``"paper"`` is the released protocol's `diverse_beam_search`
    (NUM_BEAMS groups of one beam, DIVERSITY_PENALTY; the released code ran it at HF's
    length_penalty 1)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "paper":
        if exclude is not None:
            raise ValueError("exclude is not supported by the paper's decoding (the released protocol masks nothing)")
        return diverse_beam_search(model, embedding, batch, trie, groups=num_beams, top_k=top_k,
                                   diversity_penalty=diversity_penalty, length_penalty=length_penalty,
                                   max_new_tokens=max_new_tokens)
    if method == "exact":
        return exact_catalog_topk(model, embedding, batch, trie, top_k=top_k, exclude=exclude, max_bytes=max_bytes)
    if method != "kv-cache":
        if exclude is not None:
            raise ValueError("exclude is only supported by the kv-cache beam search")
        return released_protocol_generate(model, embedding, batch, trie, num_beams=num_beams, top_k=top_k,
                                          max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                                          early_stopping=early_stopping)
    return constrained_beam_search(model, embedding, batch, trie, num_beams=num_beams, top_k=top_k,
                                   max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                                   early_stopping=early_stopping, exclude=exclude)
