"""The training loop: patched stream -> DeepSpeed engine, one optimizer step at a time.

Read top to bottom: set up (distributed, data, tokenizer, model, engine), resume, then
`while step < total_steps`: gather the step's micro-batches, agree on their label tokens, run
forward/backward per micro-batch with a token-weighted loss, step, log, maybe save; a signal
stops every rank at the same step boundary with a checkpoint and exit code 75.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from patchrec_dist.data import storage
from patchrec_dist.data.catalog import catalog_titles
from patchrec_dist.data.manifest import DataSetError, load_manifest
from patchrec_dist.data.stream import StreamConfig, StreamLoader
from patchrec_dist.model.answer_logits import logits_at
from patchrec_dist.model.load import build_model, load_tokenizer
from patchrec_dist.model.packed_attention import packing_by_default
from patchrec_dist.model.patch_embed import embed_with_patches
from patchrec_dist.monitor.profile import StepProfiler
from patchrec_dist.monitor.tensorboard import Monitor, upload_logdir
from patchrec_dist.patching.collate import Batch, Collator
from patchrec_dist.patching.features import Patcher
from patchrec_dist.patching.layouts import ppt_probability
from patchrec_dist.patching.prompt import IGNORE_INDEX, build_prompt_tokens, resolve_template
from patchrec_dist.train.checkpoint import CheckpointError, CheckpointManager, config_diff, tag_for_step
from patchrec_dist.train.config import RESUME_NEUTRAL, RUN_CONFIG_FILE, TrainConfig
from patchrec_dist.train.distributed import init_distributed
from patchrec_dist.train.signals import RESUME_EXIT_CODE, StopFlag

DONE_FILE = "DONE.json"


# ---------------------------------------------------------------------------------------------
# set-up helpers


def local_work_dir(output: str) -> str:
    """Where a run writes local files: the output itself, or a staging folder for a remote output."""
    if storage.is_local(output):
        os.makedirs(output, exist_ok=True)
        return output
    import hashlib

    path = os.path.join(storage.staging_root(), hashlib.sha256(output.encode()).hexdigest()[:16])
    os.makedirs(path, exist_ok=True)
    return path


def make_ds_config(cfg: TrainConfig, world: int) -> dict[str, Any]:
    """The DeepSpeed config file with the run's batch sizes, lr, clipping and precision filled in."""
    with open(cfg.ds_config) as f:
        ds = json.load(f)
    fill = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch, "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    if isinstance(ds.get("bf16"), dict) and ds["bf16"].get("enabled") == "auto":
        ds["bf16"]["enabled"] = bool(cfg.bf16)
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    for key, value in (("lr", cfg.lr), ("weight_decay", cfg.weight_decay)):
        if params.get(key, "auto") == "auto":
            params[key] = value
    zero = ds.get("zero_optimization", {})
    if opt.get("type", "").lower() in ("adam", "adamw"):
        if "offload_optimizer" in zero:
            pass  # DeepSpeed's CPU Adam, JIT-built with the host compiler, on CPU ranks too (tests run it)
        else:
            # DeepSpeed's FusedAdam needs CUDA (design.md) and is JIT-built with nvcc, which compute
            # nodes often lack; torch's fused AdamW is one kernel per parameter group, ships compiled
            # with torch, and runs on CPU too (5x torch's per-op AdamW on a 135M-parameter CPU rank)
            if torch.cuda.is_available():
                params.setdefault("torch_adam", True)
            else:
                params["torch_adam"] = True
            if params["torch_adam"]:
                params.setdefault("fused", True)
    return ds


# DeepSpeed settings that change speed or memory, not what the next step computes: free to change on resume
DS_CONFIG_NEUTRAL = (
    "train_batch_size", "steps_per_print", "wall_clock_breakdown", "flops_profiler", "tensorboard", "comms_logger",
    "optimizer.params.torch_adam", "optimizer.params.fused", "optimizer.params.foreach",
    *(f"zero_optimization.{k}" for k in (
        "overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size", "offload_optimizer",
        "offload_param", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
        "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save",
        "sub_group_size", "round_robin_gradients")),
)


def check_resume_unchanged(state: dict[str, Any], cfg: TrainConfig, ds_config: dict[str, Any], tag: str) -> None:
    """What a resume may not change silently. The LR and PPT schedules are functions of the run's
    length: other --max-steps or --epochs would move both mid-run (refused unless --schedule-change
    stretch). Another DeepSpeed config (optimizer betas/eps, ZeRO stage, precision, ...) changes the
    optimisation itself (refused unless --ds-config-change accept); speed and memory settings may change."""
    saved = state.get("config") or {}
    changed = [f"--{k.replace('_', '-')} {saved[k]} -> {getattr(cfg, k)}" for k in ("max_steps", "epochs")
               if k in saved and saved[k] != getattr(cfg, k)]
    if changed and cfg.schedule_change == "refuse":
        raise CheckpointError(
            f"resume from {tag}: {', '.join(changed)} changes the run's length, and with it the LR and PPT "
            f"schedules from step {state.get('step')} on (the run had {state.get('total_steps')} steps). Resume "
            "with the run's own values, or pass --schedule-change stretch to recompute both schedules over the "
            "new length.")
    if "ds_config" in state and cfg.ds_config_change == "refuse":
        keys = config_diff(state["ds_config"], ds_config, DS_CONFIG_NEUTRAL)
        if keys:
            raise CheckpointError(
                f"resume from {tag}: the DeepSpeed config differs from the run's in {', '.join(keys[:10])} "
                f"(--ds-config {cfg.ds_config}). Resume with the run's config, or pass --ds-config-change accept "
                "to continue with the new settings from this step on.")


def warmup_cosine(total_steps: int, warmup_ratio: float):
    warmup = int(math.ceil(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


# ---------------------------------------------------------------------------------------------
# one step


@dataclass
class StepStats:
    loss: float
    label_tokens: int
    examples: int
    history_positions: int
    text_positions: int
    patches: int
    data_wait_s: float
    timings: dict[str, float]  # embed_s, forward_s, backward_s, optimizer_s (summed over micro-steps)
    input_tokens: int = 0  # positions the LLM ran on, padding excluded, over all ranks
    computed_positions: int = 0  # positions the LLM ran on, padding included (packed batches have none)
    ppt_step: int = -1  # the PPT schedule's step the step's layouts were drawn at (-1: not ppt)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over labelled positions. LOGITS are (B, L, V) over
    every position, or (N, V) for the (row, position) pairs in POSITIONS (then logits[i] predicts
    labels[row, position + 1])."""
    if positions is None:
        logits, targets = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    else:
        targets = labels[positions[:, 0], positions[:, 1] + 1]
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def forward_loss_sum(engine: Any, batch: Batch, timings: dict[str, float] | None = None) -> torch.Tensor:
    t0 = time.perf_counter()
    embed = engine.module.get_input_embeddings()
    inputs_embeds = embed_with_patches(embed, batch.input_ids, batch.patches)
    t1 = time.perf_counter()
    with logits_at(engine.module, batch.answer_positions):
        out = engine(inputs_embeds=inputs_embeds, **batch.model_inputs(), use_cache=False, logits_to_keep=0)
    loss = token_loss_sum(out.logits, batch.labels, batch.answer_positions)
    if timings is not None:
        timings["embed_s"] = timings.get("embed_s", 0.0) + t1 - t0
        timings["forward_s"] = timings.get("forward_s", 0.0) + time.perf_counter() - t1
    return loss


def train_step(engine: Any, micro_batches: Iterator[Batch], grad_accum: int, world: int,
               device: torch.device) -> StepStats:
    """One optimizer step. The loss is the sum of token losses over every micro-batch on every rank
    divided by the step's total label tokens: patched examples differ a lot in length, so a
    per-micro-batch mean would weight short answers more."""
    t0 = time.perf_counter()
    batches = [next(micro_batches) for _ in range(grad_accum)]
    wait = time.perf_counter() - t0
    local = [sum(b.label_tokens for b in batches), sum(b.num_examples for b in batches),
             sum(b.history_positions for b in batches), sum(b.text_positions for b in batches),
             sum(b.patches.num_patches for b in batches), sum(b.input_tokens for b in batches),
             sum(b.input_ids.numel() for b in batches)]
    tokens, examples, hist, text, patches, inputs, computed = all_reduce_sum(local, device)
    scale = world * grad_accum / max(1.0, tokens)  # DeepSpeed averages over ranks and micro-steps
    loss_sum, timings = 0.0, {}
    for b in batches:
        b = b.to(device, non_blocking=True)  # pinned by the DataLoader on GPUs: the copy overlaps
        loss = forward_loss_sum(engine, b, timings)
        t1 = time.perf_counter()
        engine.backward(loss * scale)
        t2 = time.perf_counter()
        engine.step()
        timings["backward_s"] = timings.get("backward_s", 0.0) + t2 - t1
        timings["optimizer_s"] = timings.get("optimizer_s", 0.0) + time.perf_counter() - t2
        loss_sum += float(loss.detach())
    (total_loss,) = all_reduce_sum([loss_sum], device)
    ppt_step = max((s for b in batches for s in b.ppt_steps), default=-1)
    return StepStats(total_loss / max(1.0, tokens), int(tokens), int(examples), int(hist), int(text), int(patches),
                     wait, timings, int(inputs), int(computed), ppt_step)


@torch.no_grad()
def validation_loss(engine: Any, make_loader, batches: int, device: torch.device) -> float:
    """Token-weighted loss on the first BATCHES batches of the (unshuffled) validation stream."""
    engine.eval()
    loader = make_loader()
    sums = [0.0, 0.0]
    for i, b in enumerate(loader):
        if i == batches:
            break
        b = b.to(device)
        sums[0] += float(forward_loss_sum(engine, b))
        sums[1] += b.label_tokens
    engine.train()
    loss, tokens = all_reduce_sum(sums, device)
    return loss / max(1.0, tokens)


class Counters(dict):
    """The training loop's own counters, a checkpointed component (CheckpointManager.register)."""

    def state_dict(self) -> dict[str, int]:
        return dict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.update(state)


def micro_batch_source(loader: StreamLoader, patcher: Patcher, counters: dict[str, int]) -> Iterator[Batch]:
    """Batches across epochs; keeps the patcher's micro-step offset (PPT's schedule) in step."""
    while True:
        patcher.micro_step_offset = counters["micro_before_epoch"]
        epoch_batches = len(loader)
        yield from loader
        counters["micro_before_epoch"] += epoch_batches


# ---------------------------------------------------------------------------------------------
# the run


def write_run_files(cfg: TrainConfig, tokenizer: Any, model: Any, rank: int) -> None:
    """Rank 0: the resolved config, tokenizer and model config beside the checkpoints (export needs them)."""
    if rank != 0:
        return
    import tempfile

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        base.config.save_pretrained(os.path.join(tmp, "model_config"))
        files = {os.path.join(sub, name): os.path.join(tmp, sub, name)
                 for sub in ("tokenizer", "model_config") for name in os.listdir(os.path.join(tmp, sub))}
        for rel, src in files.items():
            storage.write_bytes_atomic(storage.join(cfg.output, rel), Path(src).read_bytes())
    storage.write_bytes_atomic(storage.join(cfg.output, RUN_CONFIG_FILE),
                               json.dumps(cfg.to_dict(), indent=2).encode())


class Trainer:
    """One training run. `train(cfg)` is setup() + run(); tests and tools use the parts."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def setup(self) -> None:
        import deepspeed

        cfg = self.cfg
        self.rank, self.world, self.device = init_distributed(cfg.dist_timeout_s)
        if cfg.bf16 is None:  # resolved once, so config.json (and the export) say what ran
            cfg.bf16 = self.device.type == "cuda"
        if cfg.packing is None:
            cfg.packing = packing_by_default(self.device.type, cfg.attn_implementation)
        self.config_hash = cfg.hash(ignore=RESUME_NEUTRAL)
        self.stop = StopFlag()  # early: a signal during set-up is honoured at the first step
        torch.manual_seed(cfg.seed)
        self.work = local_work_dir(cfg.output)

        manifest = load_manifest(cfg.data)
        titles = catalog_titles(manifest)
        template = resolve_template(manifest.prompt, cfg.prompt_file, cfg.domain)
        self.tokenizer = load_tokenizer(cfg, titles, template, self.work)
        self.tokens = build_prompt_tokens(self.tokenizer, template, titles, os.path.join(self.work, "cache"))
        ds_config = self.ds_config = make_ds_config(cfg, self.world)
        model = build_model(cfg, self.tokenizer, ds_config, self.work)

        stream_cfg = StreamConfig(split=cfg.split, batch_size=cfg.micro_batch, seed=cfg.seed,
                                  window_shards=cfg.window_shards, max_history=cfg.max_history or None,
                                  num_workers=cfg.num_workers)
        self.patcher = Patcher(self.tokens, cfg.layout, seed=cfg.seed, grad_accum=cfg.grad_accum,
                               ppt_schedule=cfg.ppt_schedule, ppt_p_max=cfg.ppt_p_max,
                               ppt_pair_text=cfg.ppt_pair_text)
        self.loader = StreamLoader(manifest, stream_cfg, self.rank, self.world, transform=self.patcher,
                                   collate_fn=Collator(self.tokens, packing=cfg.packing))
        self.total_steps = cfg.max_steps or max(1, int(cfg.epochs * len(self.loader)) // cfg.grad_accum)
        self.patcher.total_steps = self.total_steps

        trainable = [p for p in model.parameters() if p.requires_grad]
        schedule = warmup_cosine(self.total_steps, cfg.warmup_ratio)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=trainable, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        write_run_files(cfg, self.tokenizer, model, self.rank)

        self.ckpt = CheckpointManager(cfg.output, keep_last=cfg.keep_last)
        self.step, self.counters = 0, Counters(micro_before_epoch=0)
        self.ckpt.register("data", self.loader)  # the stream's position (every rank's, one state)
        self.ckpt.register("counters", self.counters)  # the PPT schedule's micro-step count
        tag = self.ckpt.resolve_resume(cfg.resume)
        if tag is not None:
            # the run's length is checked before anything is loaded (a refusal after a 100 GB load wastes minutes)
            expect = {"config_hash": self.config_hash,
                      "check": lambda saved: check_resume_unchanged(saved, cfg, ds_config, tag)}
            state = self.ckpt.load(self.engine, tag, expect=expect, universal=cfg.universal)
            self.step = int(state["step"])
            # PPT's schedule follows global progress: after a world-size or worker change the stream
            # restarts its batch count on the examples nobody consumed, so this epoch's batch 0 is
            # re-anchored at the micro-batch the run has reached (the same value when nothing changed)
            self.counters["micro_before_epoch"] = self.step * cfg.grad_accum - self.loader.batches_done
        self.monitor = Monitor(os.path.join(self.work, "tb"), self.rank == 0, self.step, self.total_steps,
                               cfg.log_every)
        self.monitor.text(f"training {cfg.layout.stage} on {manifest.num_examples(cfg.split):,} {cfg.split} examples: "
                          f"{self.total_steps} steps x {self.world} ranks x {cfg.grad_accum} x {cfg.micro_batch}, "
                          f"{type(self.engine.basic_optimizer).__name__}"
                          + (f", resumed at step {self.step} ({tag})" if tag else ""))
        self.make_val_loader = self._validation_loader_factory(manifest) if cfg.eval_every else None

    def _validation_loader_factory(self, manifest):
        cfg = self.cfg
        val_cfg = StreamConfig(split="val", batch_size=cfg.micro_batch, shuffle=False,
                               max_history=cfg.max_history or None, remainder="pad", num_workers=0)

        def make() -> StreamLoader:
            # ppt: training's patcher at the current step of its schedule (a default Patcher knows no
            # schedule: its total_steps=1 compressed nearly every item)
            patcher = dataclasses.replace(self.patcher, fixed_step=self.step)
            return StreamLoader(manifest, val_cfg, self.rank, self.world, transform=patcher,
                                collate_fn=Collator(self.tokens, packing=cfg.packing), persistent_workers=False)

        try:
            make()
        except DataSetError as exc:
            self.monitor.text(f"no validation loss: {exc}")
            return None
        return make

    def save(self) -> None:
        # TensorBoard before the checkpoint: once `latest` moves, a remote output's tb/ must hold
        # every step up to it, since a crash right after the commit (or a resume on another node)
        # never uploads this node's files again. Points of a save that never commits are hidden
        # by the resumed run's purge_step.
        self.monitor.flush()
        sync_tensorboard(self.work, self.cfg.output, self.rank)
        self.ckpt.save(self.engine, self.step, {  # what a resume is checked against (check_resume_unchanged)
            "config": self.cfg.to_dict(), "config_hash": self.config_hash, "total_steps": self.total_steps,
            "ds_config": self.ds_config})

    def log_examples(self, batches_seen: list[list[tuple[str, int]]]) -> None:
        """--log-examples: which examples each step trained on, per rank (an audit trail; tests use it)."""
        path = os.path.join(self.work, "examples", f"rank{self.rank}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"step": self.step, "examples": batches_seen}) + "\n")

    def run(self) -> int:
        """Train to the last step; returns the exit code (0, or RESUME_EXIT_CODE after a signal)."""
        cfg, engine = self.cfg, self.engine
        source = self._logged(micro_batch_source(self.loader, self.patcher, self.counters))
        exit_code = 0
        profiler = StepProfiler(cfg.profile_steps, cfg.output, enabled=self.rank == 0)
        engine.train()
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            self._step_examples: list = []
            profiler.begin(self.step + 1)
            stats = train_step(engine, source, cfg.grad_accum, self.world, self.device)
            self.step += 1
            profiler.end(self.step)
            dt = time.perf_counter() - t0
            if cfg.log_examples:
                self.log_examples(self._step_examples)
            self.monitor.step(self.step, {
                "train/loss": stats.loss, "train/lr": self.scheduler.get_last_lr()[0],
                "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "train/examples_per_s": stats.examples / dt, "train/positions_per_s": stats.history_positions / dt,
                "train/tokens_per_s": stats.input_tokens / dt,
                "train/padding_frac": 1.0 - stats.input_tokens / max(1, stats.computed_positions),
                "train/input_positions": stats.input_tokens,
                "train/compression": stats.history_positions / max(1, stats.text_positions),
                "train/patch_fraction": stats.patches / max(1, stats.examples),
                "train/data_wait_frac": stats.data_wait_s / dt, "train/label_tokens": stats.label_tokens,
                "time/step_s": dt, "time/data_wait_s": stats.data_wait_s,
                **{f"time/{k}": v for k, v in stats.timings.items()},
                **({"train/ppt_p": ppt_probability(stats.ppt_step, self.total_steps, cfg.ppt_schedule, cfg.ppt_p_max)}
                   if stats.ppt_step >= 0 else {}),
            })
            if self.make_val_loader is not None and self.step % cfg.eval_every == 0:
                loss = validation_loss(engine, self.make_val_loader, cfg.eval_batches, self.device)
                self.monitor.scalars(self.step, {"val/loss": loss})
            if self.stop.should_stop():
                self.monitor.text(f"stop requested (signal {self.stop.received or 'on another rank'}): "
                                  f"saving at step {self.step}")
                self.save()
                exit_code = RESUME_EXIT_CODE
                break
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self.save()
        source.close()  # shuts the DataLoader's workers down now, not at interpreter exit
        if exit_code == 0:
            self.finish()
        self.monitor.close()
        sync_tensorboard(self.work, cfg.output, self.rank)
        self.stop.restore()
        return exit_code

    def _logged(self, source: Iterator[Batch]) -> Iterator[Batch]:
        for batch in source:
            if self.cfg.log_examples:
                self._step_examples.append([list(e) for e in batch.examples])
            yield batch

    def finish(self) -> None:
        """Final checkpoint, the HF export (OUTPUT/final) and DONE.json, which marks a finished run."""
        self.save()
        if self.cfg.export:  # every rank: the weights are gathered one tensor at a time
            from patchrec_dist.train.export import export_from_engine

            export_from_engine(self.engine, self.cfg.output, self.tokenizer, self.cfg.to_dict(),
                               tag_for_step(self.step), self.rank)
        if self.rank == 0:
            storage.write_bytes_atomic(storage.join(self.cfg.output, DONE_FILE),
                                       json.dumps({"step": self.step, "total_steps": self.total_steps}).encode())

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Collective: the engine's logits for plain token ids (tests compare exports with it)."""
        self.engine.eval()
        out = self.engine(input_ids=input_ids.to(self.device), use_cache=False).logits
        self.engine.train()
        return out.float().cpu()


def train(cfg: TrainConfig) -> int:
    """Run CFG to its last step (or a signal); returns the process exit code."""
    trainer = Trainer(cfg)
    trainer.setup()
    return trainer.run()


def sync_tensorboard(work: str, output: str, rank: int) -> None:
    """A remote output gets the TensorBoard files too (rank 0 writes them into WORK/tb)."""
    if rank == 0 and not storage.is_local(output):
        upload_logdir(os.path.join(work, "tb"), storage.join(output, "tb"))
