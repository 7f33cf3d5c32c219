"""What each patch placeholder of a batch pools: the contract between the DataLoader workers that
build batches (patching/collate.py) and the embedding that turns it into vectors
(model/patch_embed.py). It lives on the data side of that contract, so that patching never
imports the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class PatchIndex:
    """What each patch placeholder of a batch pools, in CSR form (all ``torch.long``, 1-D).

    Attributes:
        title_ids: ``(T,)`` title token ids of the batch's distinct items, concatenated.
        title_offsets: ``(U+1,)`` offsets into ``title_ids``, one row per distinct item; every
            title has at least one token.
        patch_items: ``(M,)`` indices into the ``U`` distinct items, concatenated per patch.
        patch_offsets: ``(P+1,)`` offsets into ``patch_items``; an item patch has one item, a
            session patch several (at least one).
        patch_positions: ``(P,)`` flat positions ``row * seq_len + col`` in ``input_ids`` where
            each patch goes; distinct.
    """

    title_ids: Tensor
    title_offsets: Tensor
    patch_items: Tensor
    patch_offsets: Tensor
    patch_positions: Tensor

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def empty(cls, device: torch.device | str | None = None) -> PatchIndex:
        """An index without patches (``T = U = M = P = 0``)."""

        def z(n: int) -> Tensor:
            return torch.zeros(n, dtype=torch.long, device=device)

        return cls(
            title_ids=z(0), title_offsets=z(1), patch_items=z(0), patch_offsets=z(1), patch_positions=z(0)
        )

    @classmethod
    def from_patches(
        cls,
        patches: Sequence[Sequence[Sequence[int]]],
        positions: Sequence[int],
        device: torch.device | str | None = None,
    ) -> PatchIndex:
        """Build an index from nested lists (tests, benchmarks, tools; not the worker fast path).

        ``patches[p]`` is the list of items of patch ``p`` and each item is its title token ids;
        ``positions[p]`` is the flat position of patch ``p``. Items with identical token ids are
        stored once.
        """
        if len(patches) != len(positions):
            raise ValueError(f"{len(patches)} patches but {len(positions)} positions")
        item_row: dict[tuple[int, ...], int] = {}
        title_ids: list[int] = []
        title_offsets = [0]
        patch_items: list[int] = []
        patch_offsets = [0]
        for patch in patches:
            for title in patch:
                key = tuple(int(t) for t in title)
                if key not in item_row:
                    item_row[key] = len(item_row)
                    title_ids.extend(key)
                    title_offsets.append(len(title_ids))
                patch_items.append(item_row[key])
            patch_offsets.append(len(patch_items))

        def t(values: Sequence[int]) -> Tensor:
            return torch.tensor(list(values), dtype=torch.long, device=device)

        return cls(
            title_ids=t(title_ids),
            title_offsets=t(title_offsets),
            patch_items=t(patch_items),
            patch_offsets=t(patch_offsets),
            patch_positions=t([int(p) for p in positions]),
        )

    def to_patches(self) -> tuple[list[list[list[int]]], list[int]]:
        """The inverse of :meth:`from_patches`: ``(patches, positions)`` as nested lists."""
        ids = self.title_ids.tolist()
        toff = self.title_offsets.tolist()
        items = self.patch_items.tolist()
        poff = self.patch_offsets.tolist()
        titles = [ids[toff[u] : toff[u + 1]] for u in range(len(toff) - 1)]
        patches = [[titles[i] for i in items[poff[p] : poff[p + 1]]] for p in range(len(poff) - 1)]
        return patches, self.patch_positions.tolist()

    # -- properties -----------------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        return int(self.patch_positions.shape[0])

    @property
    def num_items(self) -> int:
        """Number of distinct items ``U``."""
        return int(self.title_offsets.shape[0]) - 1

    @property
    def num_title_tokens(self) -> int:
        return int(self.title_ids.shape[0])

    @property
    def device(self) -> torch.device:
        return self.title_ids.device

    # -- movement -------------------------------------------------------------------------------
    def _map(self, fn) -> PatchIndex:
        return PatchIndex(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PatchIndex:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PatchIndex:
        """Lets ``DataLoader(pin_memory=True)`` pin an index inside a batch."""
        return self._map(lambda t: t.pin_memory())

    # -- checks ---------------------------------------------------------------------------------
    def validate(self, seq_len: int, batch: int) -> None:
        """Raise ``ValueError`` if the index is inconsistent or does not fit a ``(batch, seq_len)``
        ``input_ids``. Synchronises with the device; meant for tests, workers and debugging."""
        for f in fields(self):
            t = getattr(self, f.name)
            if not isinstance(t, Tensor):
                raise ValueError(f"{f.name} is {type(t).__name__}, not a Tensor")
            if t.dim() != 1:
                raise ValueError(f"{f.name} must be 1-D, got shape {tuple(t.shape)}")
            if t.dtype != torch.long:
                raise ValueError(f"{f.name} must be torch.long, got {t.dtype}")
        devices = {getattr(self, f.name).device for f in fields(self)}
        if len(devices) != 1:
            raise ValueError(f"index tensors on several devices: {sorted(map(str, devices))}")

        def check_offsets(name: str, offsets: Tensor, total: int, what: str) -> None:
            if offsets.numel() < 1:
                raise ValueError(f"{name} must hold at least one entry (0)")
            if int(offsets[0]) != 0:
                raise ValueError(f"{name}[0] must be 0, got {int(offsets[0])}")
            if int(offsets[-1]) != total:
                raise ValueError(f"{name}[-1] = {int(offsets[-1])} but there are {total} {what}")
            if offsets.numel() > 1 and bool((offsets[1:] <= offsets[:-1]).any()):
                raise ValueError(f"{name} must be strictly increasing (every segment >= 1 entry)")

        check_offsets("title_offsets", self.title_offsets, self.num_title_tokens, "title tokens")
        check_offsets("patch_offsets", self.patch_offsets, int(self.patch_items.numel()), "patch items")
        n_patches = int(self.patch_offsets.numel()) - 1
        if self.num_patches != n_patches:
            raise ValueError(
                f"{self.num_patches} patch_positions but patch_offsets describe {n_patches} patches"
            )
        if self.patch_items.numel() and (
            int(self.patch_items.min()) < 0 or int(self.patch_items.max()) >= self.num_items
        ):
            raise ValueError(f"patch_items out of range [0, {self.num_items})")
        if self.title_ids.numel() and int(self.title_ids.min()) < 0:
            raise ValueError("title_ids must be non-negative token ids")
        if self.num_patches:
            pos = self.patch_positions
            if int(pos.min()) < 0 or int(pos.max()) >= seq_len * batch:
                raise ValueError(f"patch_positions out of range [0, {batch} * {seq_len})")
            if int(torch.unique(pos).numel()) != self.num_patches:
                raise ValueError("patch_positions must be distinct")
