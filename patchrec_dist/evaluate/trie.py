"""A token trie of every catalog answer: what constrained generation may produce.

Each catalog item contributes one sequence: its answer tokens as the chat template renders them,
from where the generation prompt ends (see `generation_lead_length`), followed by the end-of-turn
token. A complete sequence ends in a *leaf*; items with the same title share one leaf, so a leaf
maps to a frozenset of items.

The trie is built with numpy in one vectorised pass (sort the sequences, take longest common
prefixes, number the new nodes in preorder), ~10^5 titles in well under a second, and stored as
flat arrays (CSR children, sorted by token), so the beam search can do its trie lookups as tensor
ops on the accelerator (`TitleTrie.tensors`). Python-side lookups (`allowed`, `items`) walk the
same arrays.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from patchrec_dist.patching.prompt import PromptTokens

__all__ = ["TitleTrie", "TrieTensors", "catalog_sequences", "generation_lead_length", "generation_prompt_tail"]

ROOT = 0


def generation_lead_length(tokens: PromptTokens) -> int:
    """How many of the answer's lead tokens (text between the last template special token and the
    title, e.g. "assistant\\n") belong to the generation prompt.

    Normally the lead tokenizes on its own and this is ``len(tokens.lead)``. When for some title
    the lead merges with the title's first characters, that item's labels start earlier
    (``answer_label_start < len(lead)``); the prompt then has to stop at the shortest such start so
    that it is the same for every item (it must not depend on the target), and every item's trie
    sequence starts from there."""
    if tokens.num_items == 0:
        return len(tokens.lead)
    return int(min(int(tokens.answer_label_start.min()), len(tokens.lead)))


def generation_prompt_tail(tokens: PromptTokens) -> np.ndarray:
    """The last tokens of every generation prompt: ``between`` plus the lead part of the prompt."""
    return np.concatenate([tokens.between, tokens.lead[: generation_lead_length(tokens)]]).astype(np.int64)


def catalog_sequences(tokens: PromptTokens) -> tuple[np.ndarray, np.ndarray]:
    """Every item's generated sequence (answer tokens after the prompt's lead, then end-of-turn) in
    CSR form ``(flat, offsets)``; item ``i`` is ``flat[offsets[i]:offsets[i+1]]``."""
    lead = generation_lead_length(tokens)
    off = tokens.answer_offsets.astype(np.int64)
    starts = off[:-1] + lead
    body = off[1:] - starts  # answer tokens after the lead (title + tail)
    eot = tokens.eot.astype(np.int64)
    lengths = body + len(eot)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.empty(int(offsets[-1]), dtype=np.int64)
    # gather each body, then write the end-of-turn token(s) after it
    pos_in_seq = np.arange(len(flat)) - np.repeat(offsets[:-1], lengths)
    seq_of = np.repeat(np.arange(len(lengths)), lengths)
    is_body = pos_in_seq < body[seq_of]
    flat[is_body] = tokens.answer_flat[(starts[seq_of] + pos_in_seq)[is_body]]
    flat[~is_body] = eot[(pos_in_seq - body[seq_of])[~is_body]]
    return flat, offsets


@dataclass
class TrieTensors:
    """The trie's arrays as torch tensors on one device (all int64 except ``is_leaf``)."""

    child_offsets: torch.Tensor  # (N+1,)
    child_tokens: torch.Tensor  # (N-1,) children of node n: [child_offsets[n], child_offsets[n+1])
    child_nodes: torch.Tensor  # (N-1,)
    depth: torch.Tensor  # (N,) tokens from the root
    is_leaf: torch.Tensor  # (N,) bool


class TitleTrie:
    """Trie over complete token sequences (each ends with the end-of-turn token).

    Nodes are numbered in preorder, root 0; node ``n`` (``n > 0``) is reached from ``parent[n]``
    by ``token[n]``. Children of a node are contiguous and sorted by token in ``child_*``.
    """

    def __init__(self, flat: np.ndarray, offsets: np.ndarray, items: np.ndarray | None = None, *,
                 eot: int | None = None, prompt_tail: np.ndarray | None = None):
        flat = np.asarray(flat, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.int64)
        lengths = np.diff(offsets)
        n = len(lengths)
        if n == 0:
            raise ValueError("a title trie needs at least one sequence")
        if (lengths <= 0).any():
            raise ValueError(f"sequence {int(np.flatnonzero(lengths <= 0)[0])} is empty")
        if flat.size and flat.min() < 0:
            raise ValueError("token ids must be non-negative")
        items = np.arange(n, dtype=np.int64) if items is None else np.asarray(items, dtype=np.int64)
        if len(items) != n:
            raise ValueError(f"{n} sequences but {len(items)} items")
        self.eot = eot
        self.prompt_tail = None if prompt_tail is None else np.asarray(prompt_tail, dtype=np.int64)
        self.num_sequences = n

        width = int(lengths.max())
        if flat.size and flat.max() >= np.iinfo(np.int32).max:
            raise ValueError("token ids must fit in int32")
        mat = np.full((n, width), -1, dtype=np.int32)  # int32: half the memory and time of int64
        seq_of = np.repeat(np.arange(n), lengths)
        col = np.arange(len(flat)) - np.repeat(offsets[:-1], lengths)
        mat[seq_of, col] = flat
        order = np.lexsort(mat.T[::-1])  # lexicographic; -1 padding sorts a prefix first
        mat, lens = mat[order], lengths[order]
        # first column where each row differs from the previous one (the root is shared by all)
        lcp = np.zeros(n, dtype=np.int64)
        if n > 1:
            diff = mat[1:] != mat[:-1]
            lcp[1:] = np.where(diff.any(axis=1), diff.argmax(axis=1), width)
        cols = np.arange(width)
        new = (cols[None, :] >= lcp[:, None]) & (cols[None, :] < lens[:, None])  # row creates node (row, col)
        rows, dcol = np.nonzero(new)  # row-major order = preorder: new node j + 1 is (rows[j], dcol[j])
        num_nodes = len(rows) + 1
        node_at = np.zeros((n, width), dtype=np.int32 if num_nodes < 2**31 else np.int64)
        node_at[rows, dcol] = np.arange(1, num_nodes)
        np.maximum.accumulate(node_at, axis=0, out=node_at)  # per depth: the latest node at or above a row
        parent = np.zeros(num_nodes, dtype=np.int64)
        token = np.full(num_nodes, -1, dtype=np.int64)
        depth = np.zeros(num_nodes, dtype=np.int64)
        parent[1:] = np.where(dcol > 0, node_at[rows, np.maximum(dcol - 1, 0)], ROOT)
        token[1:] = mat[rows, dcol]
        depth[1:] = dcol + 1
        leaf_of_row = node_at[np.arange(n), lens - 1].astype(np.int64)

        # children in CSR, sorted by (parent, token): preorder ids already sort siblings by token
        by_parent = np.argsort(parent[1:], kind="stable") + 1
        child_count = np.bincount(parent[1:], minlength=num_nodes)
        self.child_offsets = np.zeros(num_nodes + 1, dtype=np.int64)
        np.cumsum(child_count, out=self.child_offsets[1:])
        self.child_nodes = by_parent
        self.child_tokens = token[by_parent]
        self.parent, self.token, self.depth = parent, token, depth

        # leaves: rows are sorted, so duplicate sequences are adjacent and share a leaf
        leaves, first, counts = np.unique(leaf_of_row, return_index=True, return_counts=True)
        if (child_count[leaves] > 0).any():
            bad = int(order[first[np.flatnonzero(child_count[leaves] > 0)[0]]])
            raise ValueError(f"sequence {bad} is a proper prefix of another sequence: every sequence must end "
                             "with the end-of-turn token, which no sequence may contain before its end")
        self.leaf_index = np.full(num_nodes, -1, dtype=np.int64)
        self.leaf_index[leaves] = np.arange(len(leaves))
        self.leaf_nodes = leaves
        self.leaf_offsets = np.zeros(len(leaves) + 1, dtype=np.int64)
        np.cumsum(counts, out=self.leaf_offsets[1:])
        # items of each leaf, sorted (rows of one leaf are contiguous)
        leaf_rank = self.leaf_index[leaf_of_row]
        self.leaf_items = items[order][np.lexsort((items[order], leaf_rank))]
        self.item_leaf = np.full(int(items.max()) + 1 if n else 0, -1, dtype=np.int64)
        self.item_leaf[items[order]] = leaf_of_row
        self._frozen: dict[int, frozenset[int]] = {}
        self._tensors: dict[str, TrieTensors] = {}
        self._leaves_below: np.ndarray | None = None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]], items: Sequence[int] | None = None,
                       **kwargs) -> TitleTrie:
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((int(t) for s in sequences for t in s), dtype=np.int64, count=int(offsets[-1]))
        return cls(flat, offsets, None if items is None else np.asarray(items), **kwargs)

    @classmethod
    def from_prompt_tokens(cls, tokens: PromptTokens) -> TitleTrie:
        """The trie of a catalog: item i's answer after the prompt's lead, then end-of-turn."""
        if len(tokens.eot) != 1:
            raise ValueError(f"expected one end-of-turn token, got {len(tokens.eot)}")
        flat, offsets = catalog_sequences(tokens)
        return cls(flat, offsets, eot=int(tokens.eot[0]), prompt_tail=generation_prompt_tail(tokens))

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return len(self.parent)

    @property
    def num_leaves(self) -> int:
        return len(self.leaf_nodes)

    @property
    def max_depth(self) -> int:
        """The longest sequence (the most new tokens a generation needs)."""
        return int(self.depth.max())

    # -- lookups --------------------------------------------------------------------------------
    def children(self, node: int) -> np.ndarray:
        return self.child_tokens[self.child_offsets[node] : self.child_offsets[node + 1]]

    def step(self, node: int, token: int) -> int:
        """The child of NODE by TOKEN, or -1."""
        lo, hi = int(self.child_offsets[node]), int(self.child_offsets[node + 1])
        i = lo + int(np.searchsorted(self.child_tokens[lo:hi], token))
        return int(self.child_nodes[i]) if i < hi and int(self.child_tokens[i]) == token else -1

    def node(self, prefix: Sequence[int]) -> int:
        """The node spelled by PREFIX from the root, or -1 if no sequence starts with it."""
        node = ROOT
        for t in prefix:
            node = self.step(node, int(t))
            if node < 0:
                return -1
        return node

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that may follow PREFIX (empty at a leaf or off the trie)."""
        node = self.node(prefix)
        return [] if node < 0 else self.children(node).tolist()

    def leaf_items_of(self, node: int) -> frozenset[int]:
        leaf = int(self.leaf_index[node]) if node >= 0 else -1
        if leaf < 0:
            return frozenset()
        got = self._frozen.get(leaf)
        if got is None:
            got = frozenset(self.leaf_items[self.leaf_offsets[leaf] : self.leaf_offsets[leaf + 1]].tolist())
            self._frozen[leaf] = got
        return got

    def leaves_below(self) -> np.ndarray:
        """(nodes,) how many distinct titles (leaves) lie at or below each node."""
        if self._leaves_below is None:
            counts = (self.leaf_index >= 0).astype(np.int64)
            for d in range(int(self.depth.max(initial=0)), 0, -1):  # preorder: children deeper than parents
                at = np.flatnonzero(self.depth == d)
                np.add.at(counts, self.parent[at], counts[at])
            self._leaves_below = counts
        return self._leaves_below

    def excluded_nodes(self, items: Iterable[int]) -> np.ndarray:
        """Nodes below which every title is excluded when ITEMS are (a title is excluded when all the
        items it stands for are in ITEMS): the beam search never enters them, so the K titles it
        returns are all allowed ones."""
        items = {int(i) for i in items if 0 <= int(i) < len(self.item_leaf)}
        leaves = {int(self.item_leaf[i]) for i in items} - {-1}
        banned_below: dict[int, int] = {}
        for leaf in leaves:
            if self.leaf_items_of(leaf) <= items:
                node = leaf
                while True:
                    banned_below[node] = banned_below.get(node, 0) + 1
                    if node == ROOT:
                        break
                    node = int(self.parent[node])
        below = self.leaves_below()
        return np.array(sorted(n for n, c in banned_below.items() if c == below[n]), dtype=np.int64)

    def items(self, sequence: Sequence[int]) -> frozenset[int]:
        """Catalog items whose complete sequence is exactly SEQUENCE (empty if none)."""
        return self.leaf_items_of(self.node(sequence))

    def sequence(self, node: int) -> list[int]:
        """The tokens from the root to NODE."""
        out = []
        while node > ROOT:
            out.append(int(self.token[node]))
            node = int(self.parent[node])
        return out[::-1]

    def item_sequence(self, item: int) -> list[int]:
        return self.sequence(int(self.item_leaf[item]))

    def tensors(self, device: torch.device | str) -> TrieTensors:
        """The arrays the beam search needs, as tensors on DEVICE (cached per device)."""
        key = str(torch.device(device))
        got = self._tensors.get(key)
        if got is None:
            def t(a: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(np.ascontiguousarray(a)).to(device)

            got = TrieTensors(child_offsets=t(self.child_offsets), child_tokens=t(self.child_tokens),
                              child_nodes=t(self.child_nodes), depth=t(self.depth),
                              is_leaf=t(self.leaf_index >= 0))
            self._tensors[key] = got
        return got
