"""Train a baseline on a data set's train split and evaluate it exactly as the LLM is evaluated.

Same examples: training reads the train split through the stream's own window loader (the same
target ranges and minimum target position as the LLM's training examples); evaluation takes the
first `max_examples` examples of the split in the stream's unshuffled order, the subset
`patchrec_dist.evaluate.run` evaluates, with histories capped at `max_history` as there.

Same metrics: each example's ranked items become ranked *titles* (the first `top_k` distinct
titles, each standing for every catalog item with that title, as a leaf of the LLM's title trie
does), scored by `patchrec_dist.evaluate.metrics` (`score_sums` / `finalize`, strict by default).
By default nothing is excluded from the ranking, not even the history's items, as in the LLM
evaluation's default (the released PatchRec protocol); `--exclude-seen` masks the user's whole
history in both (RecBole's and HSTU's protocol).

Trained to convergence: SASRec is validated after every epoch on the val split (the same metric
code, `--stop-metric`), stops once `--patience` epochs bring no improvement (or at the `--epochs`
cap) and is evaluated with its best epoch's weights.

Writes OUTPUT/metrics.json (the LLM's keys "metrics", "split", "examples", "scoring", plus
"baseline") and OUTPUT/predictions.jsonl (the LLM's line format).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from patchrec_dist.baselines.popularity import Popularity
from patchrec_dist.baselines.sasrec import SASRecConfig, UserSequence, fit_sasrec, sasrec_scores
from patchrec_dist.data import storage
from patchrec_dist.data.catalog import catalog_titles
from patchrec_dist.data.manifest import DataSetError, Manifest, load_manifest
from patchrec_dist.data.stream import Example, StreamConfig, iter_examples, load_window, plan_epoch
from patchrec_dist.evaluate.metrics import KS, Prediction, TitleIndex, finalize, format_table, score_sums
from patchrec_dist.train.config import flag

BASELINES = ("popularity", "sasrec")
ScoreFn = Callable[[list[np.ndarray]], np.ndarray]  # histories -> (B, n_items) scores


@dataclass
class BaselineConfig:
    data: str = flag("", "data set folder or URL")
    baseline: str = flag("popularity", "which baseline", choices=BASELINES)
    output: str = flag("", "where metrics.json and predictions.jsonl go")
    split: str = flag("test", "split to evaluate", choices=("train", "val", "test"))
    max_examples: int | None = flag(None, "only the first N examples of the split (the LLM evaluation's subset)")
    top_k: int = flag(20, "titles returned per example")
    scoring: str = flag("strict", "strict or patchrec-compat (the released prefix rule)",
                      choices=("strict", "patchrec-compat"))
    max_history: int | None = flag(100, "most recent history items per example, as the LLM stream; 0 keeps all")
    seed: int = flag(42, "seed for SASRec's initialisation and data order")
    # SASRec
    max_len: int = flag(50, "sasrec: most recent items the model sees (capped by --max-history)")
    hidden: int = flag(64, "sasrec: embedding and hidden size")
    blocks: int = flag(2, "sasrec: self-attention blocks")
    heads: int = flag(2, "sasrec: attention heads")
    dropout: float = flag(0.2, "sasrec: dropout")
    epochs: int = flag(200, "sasrec: most passes over the training targets (early stopping usually ends sooner)")
    patience: int = flag(5, "sasrec: stop after this many epochs without a better validation score; 0: no early stopping")
    stop_metric: str = flag("NDCG@10", "sasrec: the validation metric early stopping follows (HR@K or NDCG@K)")
    val_examples: int | None = flag(None, "sasrec: validate on the first N val examples (default: all)")
    batch_size: int = flag(128, "sasrec: training windows per step")
    lr: float = flag(3e-3, "sasrec: AdamW learning rate")
    weight_decay: float = flag(0.0, "sasrec: AdamW weight decay")
    eval_batch_size: int = flag(256, "examples scored per forward pass")
    exclude_seen: bool = flag(False, "never return an item of the user's whole history (RecBole's evaluation masks it)")

    def check(self) -> None:
        """Refuse values that cannot work, naming the flag."""
        if not self.data:
            raise ValueError("--data is required: a data set folder or URL")
        if not self.output:
            raise ValueError("--output is required: where metrics.json and predictions.jsonl go")
        for name in ("top_k", "max_len", "hidden", "blocks", "heads", "epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"--max-examples must be >= 1; got {self.max_examples}")
        if self.max_history is not None and self.max_history < 0:
            raise ValueError(f"--max-history must be >= 0; got {self.max_history}")
        if self.hidden % self.heads:
            raise ValueError(f"--hidden ({self.hidden}) must be a multiple of --heads ({self.heads})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1); got {self.dropout}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0; got {self.lr}")
        if self.patience < 0:
            raise ValueError(f"--patience must be >= 0; got {self.patience}")
        if self.val_examples is not None and self.val_examples < 1:
            raise ValueError(f"--val-examples must be >= 1; got {self.val_examples}")
        name, _, k = self.stop_metric.partition("@")
        if name not in ("HR", "NDCG") or not k.isdigit() or int(k) not in KS:
            raise ValueError(f"--stop-metric must be HR@K or NDCG@K with K in {KS}; got {self.stop_metric!r}")
        if self.baseline != "sasrec" or not self.patience:
            return
        if int(k) > self.top_k:
            raise ValueError(f"--stop-metric {self.stop_metric} needs --top-k >= {k}; got --top-k {self.top_k}")
        if self.split == "val":
            raise ValueError("--split val with --patience > 0 would choose the epoch on the split it reports: "
                             "evaluate --split test, or pass --patience 0")

    def sasrec_config(self) -> SASRecConfig:
        # the model never sees more history than the LLM's examples hold
        max_len = min(self.max_len, self.max_history) if self.max_history else self.max_len
        return SASRecConfig(max_len=max_len, hidden=self.hidden, blocks=self.blocks, heads=self.heads,
                            dropout=self.dropout, epochs=self.epochs, patience=self.patience,
                            batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay, seed=self.seed)


# ---------------------------------------------------------------------------------------------
# the examples


def train_users(manifest: Manifest) -> list[UserSequence]:
    """Every user with train targets, with the inclusive range of its train target positions.

    Read through the stream's own window loader, so the ranges (and the minimum target position)
    are the ones the LLM's training examples come from; it also checks them against the manifest."""
    cfg = StreamConfig(split="train", shuffle=False, window_shards=1, num_workers=0)
    plan = plan_epoch(manifest, cfg, epoch=0, world=1, workers=1)
    users = []
    for w in range(len(plan.windows)):
        window = load_window(manifest, plan, cfg, w)
        counts = np.diff(window.example_offsets)
        for record, first, count in zip(window.users, window.first_target, counts):
            if count > 0:
                users.append(UserSequence(record.items, int(first), int(first + count - 1)))
    return users


def counted_interactions(users: list[UserSequence], max_history: int | None) -> list[np.ndarray]:
    """Per user, the interactions some train example shows (history capped at max_history, or target)."""
    reach = max_history or None
    return [u.items[max(0, u.first_target - reach) if reach else 0 : u.last_target + 1] for u in users]


def eval_examples(manifest: Manifest, split: str, max_examples: int | None,
                  max_history: int | None, keep_seen: bool = False) -> list[Example]:
    """The first MAX_EXAMPLES examples of SPLIT in the unshuffled order, as the LLM evaluation reads them."""
    cfg = StreamConfig(split=split, shuffle=False, max_history=max_history or None, max_examples=max_examples,
                       num_workers=0, keep_seen=keep_seen)
    plan = plan_epoch(manifest, cfg, epoch=0, world=1, workers=1)
    return list(iter_examples(manifest, plan, cfg, [(iv, False) for iv in plan.work]))


# ---------------------------------------------------------------------------------------------
# ranking and scoring


def ranked_titles(scores: np.ndarray, index: TitleIndex, top_k: int) -> list[tuple[str, list[int], float]]:
    """The first TOP_K distinct titles of the items ranked by score (ties: smaller item index first).

    An item whose title an earlier item already gave adds nothing: like a leaf of the LLM's title
    trie, a title is returned once and stands for every item that has it."""
    out: list[tuple[str, list[int], float]] = []
    seen: set[str] = set()
    for item in np.argsort(-scores, kind="stable"):
        if scores[item] == -np.inf:  # excluded (seen): everything after it is too
            break
        title = index.titles[item]
        if title in seen or not index.is_valid(title):
            continue
        seen.add(title)
        out.append((title, sorted(index.items_for(title)), float(scores[item])))
        if len(out) == top_k:
            break
    return out


def predict(score_fn: ScoreFn, examples: list[Example], index: TitleIndex, top_k: int,
            batch_size: int, exclude_seen: bool = False) -> list[tuple[Prediction, list[list[int]]]]:
    """A Prediction (and each title's items) per example, in the examples' order; EXCLUDE_SEEN
    ranks only items outside the example's whole history (Example.seen)."""
    out = []
    for i in range(0, len(examples), batch_size):
        batch = examples[i : i + batch_size]
        scores = score_fn([ex.history for ex in batch])
        for ex, row in zip(batch, scores):
            if exclude_seen:
                row = np.array(row, dtype=np.float64)
                row[ex.seen] = -np.inf
            top = ranked_titles(row, index, top_k)
            pred = Prediction(user=ex.user, target=ex.target, titles=[t for t, _, _ in top],
                              scores=[s for _, _, s in top])
            out.append((pred, [items for _, items, _ in top]))
    return out


# ---------------------------------------------------------------------------------------------
# the baselines


def fit_popularity(users: list[UserSequence], n_items: int, cfg: BaselineConfig, manifest: Manifest,
                   index: TitleIndex) -> tuple[ScoreFn, dict]:
    model = Popularity(n_items).fit(counted_interactions(users, cfg.max_history))
    info = {"params": {"max_history": cfg.max_history},
            "counted": "each train-split interaction that some train example shows as target or history "
                       "(history capped at max_history), once per interaction",
            "train_interactions": model.interactions}
    return model.scores, info


def validation_score(manifest: Manifest, index: TitleIndex, cfg: BaselineConfig) -> Callable[[Any], float]:
    """model -> cfg.stop_metric on the val split, ranked and scored as the reported split is."""
    examples = eval_examples(manifest, "val", cfg.val_examples, cfg.max_history, keep_seen=cfg.exclude_seen)
    if not examples:
        raise DataSetError(f"{cfg.data}: the val split has no examples to stop early on (pass --patience 0)")

    def score(model: Any) -> float:
        preds = predict(lambda h: sasrec_scores(model, h), examples, index, cfg.top_k, cfg.eval_batch_size,
                        exclude_seen=cfg.exclude_seen)
        return finalize(score_sums([p for p, _ in preds], index, scoring=cfg.scoring))[cfg.stop_metric]

    return score


def fit_sasrec_baseline(users: list[UserSequence], n_items: int, cfg: BaselineConfig, manifest: Manifest,
                        index: TitleIndex) -> tuple[ScoreFn, dict]:
    scfg = cfg.sasrec_config()
    validate = validation_score(manifest, index, cfg) if cfg.patience else None
    model, report = fit_sasrec(users, n_items, scfg, validate=validate)
    info = {"params": asdict(scfg), "parameters": report.parameters, "train_targets": report.targets,
            "train_windows": report.windows, "train_cpu_seconds": round(report.cpu_seconds, 3),
            "epochs_run": len(report.epoch_losses), "stopped": report.stopped,
            "epoch_losses": [round(x, 5) for x in report.epoch_losses],
            "torch_threads": torch.get_num_threads()}
    if validate is not None:
        info["early_stopping"] = {"metric": cfg.stop_metric, "split": "val", "patience": cfg.patience,
                                  "best_epoch": report.best_epoch,
                                  "val_scores": [round(x, 5) for x in report.val_scores]}
    return (lambda histories: sasrec_scores(model, histories)), info


FITTERS = {"popularity": fit_popularity, "sasrec": fit_sasrec_baseline}


def run_baseline(cfg: BaselineConfig) -> dict[str, Any]:
    """Train CFG.baseline on the train split, evaluate it on CFG.split, write OUTPUT; the metrics.json dict."""
    cfg.check()
    manifest = load_manifest(cfg.data)
    titles = catalog_titles(manifest)
    index = TitleIndex(titles)
    users = train_users(manifest)
    t0 = time.perf_counter()
    score_fn, info = FITTERS[cfg.baseline](users, len(titles), cfg, manifest, index)
    train_seconds = time.perf_counter() - t0
    examples = eval_examples(manifest, cfg.split, cfg.max_examples, cfg.max_history, keep_seen=cfg.exclude_seen)
    if not examples:
        raise DataSetError(f"{cfg.data}: the {cfg.split} split has no examples")
    t1 = time.perf_counter()
    preds = predict(score_fn, examples, index, cfg.top_k, cfg.eval_batch_size, exclude_seen=cfg.exclude_seen)
    eval_seconds = time.perf_counter() - t1
    metrics = finalize(score_sums([p for p, _ in preds], index, scoring=cfg.scoring))
    result = {
        "metrics": metrics, "split": cfg.split, "examples": len(preds), "scoring": cfg.scoring,
        "data": cfg.data, "top_k": cfg.top_k, "max_history": cfg.max_history, "exclude_seen": cfg.exclude_seen,
        "baseline": {"name": cfg.baseline, "train_seconds": round(train_seconds, 3), **info},
        "examples_per_s": round(len(preds) / max(eval_seconds, 1e-9), 2),
    }
    write_outputs(cfg.output, result, preds, titles)
    print(format_table(metrics))
    print(f"{cfg.baseline}: trained in {train_seconds:.1f}s; {len(preds)} {cfg.split} examples; wrote {cfg.output}")
    return result


def write_outputs(output: str, result: dict[str, Any], preds: list[tuple[Prediction, list[list[int]]]],
                  titles: list[str]) -> None:
    """predictions.jsonl in the LLM evaluation's line format, then metrics.json."""
    lines = []
    for p, leaves in preds:
        lines.append(json.dumps({"user": p.user, "target": p.target, "target_title": titles[p.target],
                                 "top": [{"items": items, "title": t, "score": s}
                                         for items, t, s in zip(leaves, p.titles, p.scores or [])]}))
    storage.write_bytes_atomic(storage.join(output, "predictions.jsonl"), ("\n".join(lines) + "\n").encode())
    storage.write_bytes_atomic(storage.join(output, "metrics.json"), (json.dumps(result, indent=2) + "\n").encode())
