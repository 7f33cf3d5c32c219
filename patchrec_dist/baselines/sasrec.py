"""SASRec (Kang & McAuley, 2018): a small causal Transformer over item ids, in plain PyTorch.

Model: item embedding (index 0 is padding, catalog item i is id i + 1) scaled by sqrt(hidden),
plus a learned positional embedding, dropout, `blocks` pre-LayerNorm causal self-attention blocks
(torch's TransformerEncoderLayer with a causal mask), a final LayerNorm. The score of item i after
position p is the dot product of p's output with item i's embedding (tied input/output weights,
as in the paper).

Training: full softmax cross-entropy over the whole catalog for the next item at every position
(the strong modern variant; the paper used binary cross-entropy with one sampled negative).
At catalog sizes of a few thousand items the full softmax costs little and trains better.

Which targets are trained: exactly the split's targets, each once (the LLM's training examples).
Instead of one forward pass per prefix example (history ``items[:t]``, target ``items[t]``), each
user's sequence is cut, from its newest train target backwards, into windows of at most
`max_len` inputs: the window ``items[a:e]`` predicts ``items[a+1 : e+1]``, one target per
position, and the causal mask makes position ``j`` see only ``items[a : a+1+j]``, i.e. the
prefix example of target ``a+1+j`` truncated to the window. Targets outside the split's range
(before its first target, or below the minimum target position) are masked out of the loss. The
set of (history, target) pairs is the prefix examples' set, in about `max_len` times fewer
forward passes; the newest targets of a window see up to `max_len` items, the oldest fewer (the
usual SASRec trade-off). At evaluation each example's history is cut to its last `max_len` items.

Early stopping: with a `validate` function (the caller's validation metric, higher is better),
training runs until `patience` epochs in a row bring no improvement, or `epochs` (the cap), and
the model comes back with the weights of its best epoch, as RecBole's trainer does.

Deterministic on CPU for a given seed and thread count (torch uses OMP_NUM_THREADS when set).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from patchrec_dist.train.distributed import local_device

IGNORE = -100  # label of a position that is not a training target


class UserSequence(NamedTuple):
    """A user's items (catalog indices, oldest first) and the inclusive range of target positions to train."""

    items: np.ndarray
    first_target: int
    last_target: int


@dataclass(frozen=True)
class SASRecConfig:
    max_len: int = 50  # most recent items the model sees
    hidden: int = 64
    blocks: int = 2
    heads: int = 2
    dropout: float = 0.2
    epochs: int = 200  # the cap: early stopping usually ends training well before it
    patience: int = 5  # epochs without a better validation score before stopping; 0: run every epoch
    batch_size: int = 128  # windows per optimizer step
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 42


class SASRec(nn.Module):
    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.n_items, self.max_len, self.hidden = n_items, cfg.max_len, cfg.hidden
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, dim_feedforward=4 * cfg.hidden,
                                           dropout=cfg.dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden)
        nn.init.normal_(self.item_emb.weight, std=cfg.hidden ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) item ids, right-padded with 0 -> (B, L, hidden) states.

        Padding sits after the real items, so the causal mask alone keeps every real position
        from seeing it: no key-padding mask (and no fully masked rows) is needed."""
        length = ids.size(1)
        positions = torch.arange(length, device=ids.device)
        x = self.item_emb(ids) * math.sqrt(self.hidden) + self.pos_emb(positions)[None]
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device)
        return self.norm(self.encoder(self.dropout(x), mask=causal, is_causal=True))

    def item_logits(self, states: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., n_items) scores over catalog items (padding excluded)."""
        return states @ self.item_emb.weight[1:].T


def training_windows(user: UserSequence, window: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input ids, labels) windows covering each of the user's train targets exactly once.

    Labels are catalog indices, IGNORE where the position's target is not a train target."""
    items = np.asarray(user.items, dtype=np.int64)
    out = []
    end = user.last_target
    while end >= user.first_target:
        start = max(0, end - window)
        targets = np.arange(start + 1, end + 1)
        labels = np.where(targets >= user.first_target, items[start + 1 : end + 1], IGNORE)
        out.append((items[start:end] + 1, labels))
        end = start
    return out


def _pad_batch(windows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids, _ in windows)
    ids = np.zeros((len(windows), length), dtype=np.int64)
    labels = np.full((len(windows), length), IGNORE, dtype=np.int64)
    for row, (x, y) in enumerate(windows):
        ids[row, : len(x)], labels[row, : len(y)] = x, y
    return torch.from_numpy(ids), torch.from_numpy(labels)


@dataclass
class FitReport:
    windows: int
    targets: int
    epoch_losses: list[float]
    seconds: float  # wall clock
    cpu_seconds: float  # this process's CPU time: what the training cost on a busy machine
    parameters: int
    val_scores: list[float] = field(default_factory=list)  # one per epoch, when validated
    best_epoch: int | None = None  # 1-based: the epoch whose weights the model has
    stopped: str = "cap"  # "early" (patience ran out) or "cap" (every epoch ran)


Validate = Callable[["SASRec"], float]  # model (in eval mode) -> validation score, higher is better


def fit_sasrec(users: list[UserSequence], n_items: int, cfg: SASRecConfig, validate: Validate | None = None,
               log: bool = True) -> tuple[SASRec, FitReport]:
    """Train a SASRec on the users' train targets; returns the model (in eval mode) and a report.

    With VALIDATE and cfg.patience > 0: stop once cfg.patience epochs in a row did not beat the best
    validation score, and return the best epoch's weights."""
    torch.manual_seed(cfg.seed)
    model = SASRec(n_items, cfg).to(local_device())  # this rank's GPU where there is one
    windows = [w for user in users for w in training_windows(user, cfg.max_len)]
    targets = int(sum((labels != IGNORE).sum() for _, labels in windows))
    if targets == 0:
        raise ValueError("SASRec: the training split has no targets")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98),
                                  weight_decay=cfg.weight_decay)
    losses, scores, t0, cpu0 = [], [], time.perf_counter(), time.process_time()
    best, best_state, stopped = None, None, "cap"
    for epoch in range(cfg.epochs):
        losses.append(_train_epoch(model, optimizer, windows, cfg, epoch))
        line = f"sasrec epoch {epoch + 1}/{cfg.epochs}: loss {losses[-1]:.4f}"
        if validate is not None and cfg.patience > 0:
            model.eval()
            scores.append(float(validate(model)))
            line += f", validation {scores[-1]:.4f}"
            if best is None or scores[-1] > scores[best]:
                best, best_state = epoch, copy.deepcopy(model.state_dict())
            elif epoch - best >= cfg.patience:
                stopped = "early"
        if log:
            print(f"{line} ({time.perf_counter() - t0:.1f}s)", flush=True)
        if stopped == "early":
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    return model, FitReport(len(windows), targets, losses, time.perf_counter() - t0, time.process_time() - cpu0,
                            params, scores, None if best is None else best + 1, stopped)


def _train_epoch(model: SASRec, optimizer: torch.optim.Optimizer, windows: list, cfg: SASRecConfig,
                 epoch: int) -> float:
    """One pass over the windows in a (seed, epoch) order; the mean loss per target."""
    model.train()
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(windows))
    total, count = 0.0, 0
    for i in range(0, len(order), cfg.batch_size):
        ids, labels = _pad_batch([windows[j] for j in order[i : i + cfg.batch_size]])
        device = next(model.parameters()).device
        ids, labels = ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        keep = labels != IGNORE
        # logits only where there is a target: padding and masked positions cost no softmax
        logits = model.item_logits(model(ids)[keep])
        loss = F.cross_entropy(logits, labels[keep])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        targets = int(keep.sum())
        total, count = total + loss.item() * targets, count + targets
    return total / max(count, 1)


@torch.no_grad()
def sasrec_scores(model: SASRec, histories: list[np.ndarray]) -> np.ndarray:
    """(len(histories), n_items) next-item scores after each history (its last max_len items)."""
    cut = [np.asarray(h, dtype=np.int64)[-model.max_len :] for h in histories]
    if any(len(h) == 0 for h in cut):
        raise ValueError("SASRec needs at least one history item per example")
    device = next(model.parameters()).device
    ids, _ = _pad_batch([(h + 1, h) for h in cut])
    last = torch.tensor([len(h) - 1 for h in cut], device=device)
    states = model(ids.to(device))[torch.arange(len(cut), device=device), last]
    return model.item_logits(states).float().cpu().numpy()
