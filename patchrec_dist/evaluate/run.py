"""Evaluation: constrained title generation from patched prompts, scored with HR@K / NDCG@K.

Examples are split over ranks (each rank holds a full copy of the exported model: generation
is data-parallel), predictions are gathered to rank 0 and ordered by their position in the split,
so 1 rank and N ranks give identical metrics.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from patchrec_dist.data import storage
from patchrec_dist.data.catalog import catalog_titles
from patchrec_dist.data.manifest import load_manifest
from patchrec_dist.data.stream import StreamConfig, StreamLoader
from patchrec_dist.evaluate.recommend import eval_dtype, layout_for, load_for_generation
from patchrec_dist.model.load import (
    local_model_dir,
    resolve_model_source,
)
from patchrec_dist.patching.features import Patcher
from patchrec_dist.patching.layouts import LayoutSpec
from patchrec_dist.patching.prompt import resolve_template
from patchrec_dist.train.config import (
    ATTN_IMPLEMENTATIONS,
    check_attn_implementation,
    flag,
    read_run_config,
    section,
)
from patchrec_dist.train.distributed import init_distributed


@dataclass
class EvalConfig:
    data: str = flag("", "data set folder or URL")
    run: str | None = flag(None, "a training run, path or URL (its final export, saved layout and TensorBoard)")
    model: str | None = flag(None, "an HF model folder (or smollm2, or a .gguf) instead of --run: a base model, PatchRec tokens added")
    output: str = flag("", "where metrics.json and predictions.jsonl go (default RUN/eval-SPLIT)")
    split: str = flag("test", "split to evaluate", choices=("train", "val", "test"))
    max_examples: int | None = flag(None, "only the first N examples of the split (a fixed subset)")
    top_k: int = flag(20, "titles returned per example")
    decoding: str = flag("beam", "beam (constrained beam search over the title trie), exact (every catalog title's "
                       "log-likelihood: the exact top-K that beam search approximates) or paper (the released "
                       "protocol's diverse beam search: --beams groups of one beam, --diversity-penalty, length "
                       "penalty 1)", choices=("beam", "exact", "paper"))
    diversity_penalty: float = flag(0.8, "paper: Hamming diversity penalty between beam groups")
    exact_memory_gb: float | None = flag(None, "exact: refuse a batch that needs more than this (default: half the "
                                             "device's memory)")
    beams: int = flag(20, "beam width")
    batch_size: int = flag(8, "examples per generation batch on each rank")
    scoring: str = flag("strict", "strict or patchrec-compat (the released prefix rule)",
                      choices=("strict", "patchrec-compat"))
    max_history: int | None = flag(100, "most recent history items per example; 0 keeps all")
    layout: dict = section(LayoutSpec, "prompt layout (default: the run's; these flags change it)", overrides=True)
    prompt_file: str | None = flag(None, "two-line prompt file (default: the run's / data set's)")
    domain: str | None = flag(None, "movie or book")
    num_workers: int = flag(1, "DataLoader workers per rank")
    dist_timeout_s: int = flag(600, "collective timeout")
    tb_step: int | None = flag(None, "step for the eval/ TensorBoard scalars (default: the run's last step)")
    dtype: str = flag("auto", "weights and activations: auto (bfloat16 on GPUs, float32 on CPU), bfloat16, float16 or "
                    "float32", choices=("auto", "bfloat16", "float16", "float32"))
    attn_implementation: str = flag("sdpa", "attention kernel: sdpa, flash_attention_2 (needs flash-attn) or eager",
                                  choices=ATTN_IMPLEMENTATIONS)
    exclude_seen: bool = flag(False, "never generate an item of the user's whole history (RecBole and HSTU mask it; "
                            "the released PatchRec protocol does not)")

    def check(self) -> None:
        if not self.data:
            raise ValueError("--data is required")
        if bool(self.run) == bool(self.model):
            raise ValueError("give exactly one of --run (a training run) or --model (an HF folder)")
        for name in ("top_k", "beams", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.exact_memory_gb is not None and self.exact_memory_gb <= 0:
            raise ValueError("--exact-memory-gb must be > 0")
        if self.decoding == "paper" and self.exclude_seen:
            raise ValueError("--decoding paper reproduces the released protocol, which masks nothing: drop --exclude-seen")
        if self.decoding != "exact" and self.beams < self.top_k:
            raise ValueError(f"--beams ({self.beams}) must be >= --top-k ({self.top_k})")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError("--max-examples must be >= 1")
        check_attn_implementation(self.attn_implementation)

    def output_dir(self) -> str:
        return self.output or storage.join(self.run or self.model, f"eval-{self.split}")


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    from tqdm import tqdm

    from patchrec_dist.evaluate.generate import GenerationCollator, generate_topk
    from patchrec_dist.evaluate.metrics import Prediction, finalize, format_table, score_sums

    rank, world, device = init_distributed(cfg.dist_timeout_s, deepspeed_comm=False)
    manifest = load_manifest(cfg.data)
    titles = catalog_titles(manifest)
    model_source = storage.join(cfg.run, "final") if cfg.run else cfg.model
    model_dir = _model_folder(cfg, model_source)
    run_cfg = read_run_config(cfg.run) if cfg.run else {}
    template = resolve_template(manifest.prompt, cfg.prompt_file or run_cfg.get("prompt_file"),
                                cfg.domain or run_cfg.get("domain"))
    loaded = load_for_generation(model_dir, titles, template, device, eval_dtype(cfg.dtype, device),
                                 cfg.attn_implementation)
    model, tokens, trie = loaded.model, loaded.tokens, loaded.trie
    spec = layout_for(run_cfg, cfg.layout)

    stream_cfg = StreamConfig(split=cfg.split, batch_size=cfg.batch_size, shuffle=False, remainder="pad",
                              max_history=cfg.max_history or None, num_workers=cfg.num_workers,
                              max_examples=cfg.max_examples, keep_seen=cfg.exclude_seen)
    loader = StreamLoader(manifest, stream_cfg, rank, world, transform=Patcher(tokens, spec),
                          collate_fn=GenerationCollator(tokens), persistent_workers=False)  # one pass
    decoding = decoding_options(cfg, device)
    preds: list[tuple[int, Prediction, list[list[int]], tuple[int, int, int]]] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(loader) * world * cfg.batch_size, unit="ex", disable=rank != 0, desc=f"evaluating {cfg.split}")
    with torch.no_grad():
        for batch in loader:
            exclude = [set(s.tolist()) for s in batch.seen] if cfg.exclude_seen else None
            results = generate_topk(model, model.get_input_embeddings(), batch.to(device), trie,
                                    num_beams=cfg.beams, top_k=cfg.top_k, exclude=exclude, **decoding)
            for i, res in enumerate(results):
                if batch.indices[i] < 0 or batch.pads[i]:
                    continue
                user, _ = batch.examples[i]
                items = [sorted(leaf) for leaf, _, _ in res]
                pred = Prediction(user=user, target=batch.targets[i], titles=[titles[it[0]] for it in items],
                                  scores=[float(s) for _, s, _ in res])
                fed = (*batch.row_positions[i], int(batch.attention_mask[i].sum()))
                preds.append((batch.indices[i], pred, items, fed))
            bar.update(len(results) * world)
    bar.close()
    seconds = time.perf_counter() - t0
    gathered: list[list[tuple[int, Prediction, list[list[int]], tuple[int, int, int]]]] = [preds]
    if world > 1:
        gathered = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, preds)
    result: dict[str, Any] = {}
    if rank == 0:
        ordered = sorted((x for part in gathered for x in part), key=lambda x: x[0])
        metrics = finalize(score_sums([p for _, p, _, _ in ordered], titles, scoring=cfg.scoring))
        fed = np.array([f for *_, f in ordered], dtype=np.float64).reshape(-1, 3)
        result = {
            "metrics": metrics, "split": cfg.split, "examples": len(ordered), "scoring": cfg.scoring,
            "model": model_dir if storage.is_local(model_source) else model_source,  # a URL, not its copy
            "run": cfg.run, "data": cfg.data, "layout": asdict(spec),
            "top_k": cfg.top_k, "decoding": cfg.decoding, "beams": None if cfg.decoding == "exact" else cfg.beams,
            **({"diversity_penalty": cfg.diversity_penalty} if cfg.decoding == "paper" else {}),
            "ranks": world, "exclude_seen": cfg.exclude_seen,
            "examples_per_s": round(len(ordered) / max(seconds, 1e-9), 2),
            # what the prompts cost: history positions under this layout, the same histories as
            # all text, and the whole generation prompt (system, instruction, markers included)
            "positions_fed_per_example": round(float(fed[:, 0].mean()), 1) if len(fed) else 0.0,
            "text_positions_per_example": round(float(fed[:, 1].mean()), 1) if len(fed) else 0.0,
            "prompt_tokens_per_example": round(float(fed[:, 2].mean()), 1) if len(fed) else 0.0,
        }
        _write_outputs(cfg, result, ordered, titles)
        print(format_table(metrics))
        print(f"{len(ordered)} {cfg.split} examples in {seconds:.1f}s on {world} rank(s); wrote {cfg.output_dir()}")
    if world > 1:
        dist.barrier()
    return result


def decoding_options(cfg: EvalConfig, device: torch.device) -> dict[str, Any]:
    """generate_topk's keywords for --decoding: beam search, or the exact ranking with its memory cap."""
    if cfg.decoding == "beam":
        return {"method": "kv-cache"}
    if cfg.decoding == "paper":
        return {"method": "paper", "length_penalty": 1.0, "diversity_penalty": cfg.diversity_penalty}
    if cfg.exact_memory_gb is not None:
        limit = cfg.exact_memory_gb * 2**30
    elif device.type == "cuda":
        limit = 0.5 * torch.cuda.get_device_properties(device).total_memory
    else:
        import psutil

        limit = 0.5 * psutil.virtual_memory().available
    return {"method": "exact", "max_bytes": int(limit)}


def _model_folder(cfg: EvalConfig, source: str) -> str:
    """The model folder to load, on local disk: a run's final/ (downloaded when the run is at a URL)
    or --model's folder; ValueError when there is none."""
    if cfg.run:
        if not storage.exists(storage.join(source, "config.json")):  # every rank: all fail together
            raise ValueError(f"{source}: not a model folder (export it: python tools/export_hf.py {cfg.run} {source})")
        return local_model_dir(source)
    model_dir = resolve_model_source(source, cfg.output_dir())
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise ValueError(f"{model_dir}: not a model folder")
    return model_dir


def _write_outputs(cfg: EvalConfig, result: dict[str, Any], preds: list, titles: list[str]) -> None:
    out = cfg.output_dir()
    lines = []
    for _, p, leaves, _ in preds:
        lines.append(json.dumps({"user": p.user, "target": p.target, "target_title": titles[p.target],
                                 "top": [{"items": items, "title": t, "score": s}
                                         for items, t, s in zip(leaves, p.titles, p.scores or [])]}))
    storage.write_bytes_atomic(storage.join(out, "predictions.jsonl"), ("\n".join(lines) + "\n").encode())
    if cfg.run:
        _log_to_run_tensorboard(cfg, result["metrics"])
    # last: metrics.json marks a finished evaluation (the pipeline skips a stage that has it)
    storage.write_bytes_atomic(storage.join(out, "metrics.json"), (json.dumps(result, indent=2) + "\n").encode())


def _log_to_run_tensorboard(cfg: EvalConfig, metrics: dict[str, Any]) -> None:
    """eval/SPLIT/* scalars at the run's last step in RUN/tb: a new event file beside training's,
    written locally and uploaded when the run is at a URL."""
    import tempfile

    from patchrec_dist.monitor.tensorboard import Monitor, upload_logdir

    step = cfg.tb_step
    if step is None:
        done = storage.join(cfg.run, "DONE.json")
        step = json.loads(storage.read_bytes(done))["step"] if storage.exists(done) else 0
    with tempfile.TemporaryDirectory() as tmp:
        logdir = os.path.join(cfg.run, "tb") if storage.is_local(cfg.run) else tmp
        mon = Monitor(logdir, True, 0, step)
        mon.scalars(step, {f"eval/{cfg.split}/{k}": v for k, v in metrics.items() if isinstance(v, float)})
        mon.close()
        if not storage.is_local(cfg.run):
            upload_logdir(tmp, storage.join(cfg.run, "tb"))
