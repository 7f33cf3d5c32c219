"""DeepSpeed ZeRO-3 training on CPU with CheckpointManager and StopFlag (launched by
tests/test_checkpoint.py).

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port PORT tests/dist_scripts/checkpoint_zero3.py \\
        --output DIR_OR_URL --steps 8 --save-every 2 --resume auto

A tiny random LlamaForCausalLM (created partitioned: HfDeepSpeedConfig before from_config), ZeRO-3
fp32, torch AdamW, DeepSpeed's WarmupCosineLR. Every optimizer step consumes GLOBAL_MICRO (=2)
micro-batches of MICRO (=2) sequences, whatever the world size: rank r of W runs 2/W micro-batches
(gradient accumulation) with global micro index r*GA+m, so a 1-rank run computes the same updates as
a 2-rank run (up to float summation order). Batches depend only on (step, global micro index).

Each step also draws from torch's and Python's global RNGs (as augmentation would), so a resumed run
only reproduces the uninterrupted run if the per-rank RNG states were restored.

Output lines (parsed by the test):
    RANK r PID p                       at start, every rank
    RESUMED from=URL step=s            after a load (rank 0)
    REFUSED <message>                  a load refused by CheckpointManager (rank 0)
    STEP s loss=L lr=X rng=[...]        after each step (rank 0): mean loss over all micro-batches
    SAVED step=s tag=T                 (rank 0)
    STOPPED step=s signal=NAME         every rank, then exit RESUME_EXIT_CODE
    CKSUM when=W step=s sum=F sha=H    checksum of all gathered parameters (rank 0)
    DONE step=s                        (rank 0)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import time

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.integrations import HfDeepSpeedConfig

from patchrec_dist.train.checkpoint import CheckpointError, CheckpointManager, tag_for_step
from patchrec_dist.train.signals import RESUME_EXIT_CODE, StopFlag

VOCAB = 300
SEQ_LEN = 16
MICRO = 2
GLOBAL_MICRO = 2  # micro-batches per optimizer step, over all ranks
IGNORE = {"deepspeed.gradient_accumulation_steps"}  # changes with the world size, harmless


def ds_config(world: int, total_steps: int) -> dict:
    if GLOBAL_MICRO % world:
        raise SystemExit(f"world size {world} must divide {GLOBAL_MICRO}")
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GLOBAL_MICRO // world,
        "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "lr": 1e-3, "weight_decay": 0.01}},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": total_steps, "warmup_num_steps": 2, "warmup_min_ratio": 0.1},
        },
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": 0,
        },
        "steps_per_print": 10_000,
        "wall_clock_breakdown": False,
    }


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def say(line: str) -> None:
    """One write(2) per line: ranks share the launcher's stdout pipe, and print() writes the text and
    the newline separately, so lines of two ranks could interleave."""
    os.write(1, (line + "\n").encode())


def make_batch(step: int, index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + 97 * step + index)
    return torch.randint(2, VOCAB, (MICRO, SEQ_LEN), generator=g)


def checksum(engine) -> tuple[float, str]:
    """(weighted float64 sum, sha256 of the bytes) of all parameters, gathered (collective)."""
    named = sorted(engine.module.named_parameters())
    params = [p for _, p in named]
    h = hashlib.sha256()
    total = 0.0
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for i, (name, p) in enumerate(named):
            t = p.detach().float().contiguous()
            h.update(name.encode())
            h.update(t.numpy().tobytes())
            total += float(t.double().sum()) * (i + 1) + float(t.double().abs().sum())
    return total, h.hexdigest()


def config_hash(config: dict, ignore: set[str]) -> str:
    """This script's resume check: the config minus the IGNOREd dotted keys, hashed (the trainer
    hashes its TrainConfig the same way, TrainConfig.hash)."""
    kept = copy.deepcopy(config)
    for dotted in ignore:
        *path, last = dotted.split(".")
        node = kept
        for part in path:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--no-save-final", action="store_true")
    ap.add_argument("--keep-last", type=int, default=2)
    ap.add_argument("--resume", default="never", help="auto | never | PATH")
    ap.add_argument("--universal", choices=["no", "yes", "fallback"], default="no",
                    help="fallback: try a plain load, print REFUSED, then load universal")
    ap.add_argument("--crash-rank", type=int, default=-1, help="this rank exits(1) right after")
    ap.add_argument("--crash-step", type=int, default=-1, help="... engine.save_checkpoint at this step")
    ap.add_argument("--stop-signals", default="USR1", help="comma-separated, e.g. USR1,TERM")
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--pg-timeout", type=float, default=60.0)
    args, _ = ap.parse_known_args()  # the launcher adds --local_rank=N

    from patchrec_dist.train.distributed import init_distributed

    init_distributed(args.pg_timeout)  # gloo on CPU; also unlinks DeepSpeed's leaked /dev/shm buffers
    rank, world = dist.get_rank(), dist.get_world_size()
    stop = StopFlag(signals=[s for s in args.stop_signals.split(",") if s])
    say(f"RANK {rank} PID {os.getpid()}")

    config = ds_config(world, args.steps)
    run_config = {"deepspeed": copy.deepcopy(config), "model": llama_config().to_dict(),
                  "data": {"seq_len": SEQ_LEN, "global_micro": GLOBAL_MICRO}}
    run_config["model"].pop("transformers_version", None)
    run_config = json.loads(json.dumps(run_config))  # JSON-normalised (int keys of id2label -> str)
    chash = config_hash(run_config, IGNORE)
    ga = GLOBAL_MICRO // world

    dschf = HfDeepSpeedConfig(config)  # keep alive: from_config creates the model partitioned
    torch.manual_seed(0)
    random.seed(rank)
    model = AutoModelForCausalLM.from_config(llama_config())
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    assert scheduler is not None

    mgr = CheckpointManager(args.output, keep_last=args.keep_last)
    if args.crash_rank == rank:
        def crash(r: int, tag: str) -> None:
            if tag == tag_for_step(args.crash_step):
                say(f"RANK {r} CRASHING after engine.save_checkpoint of {tag}")
                os._exit(1)
        mgr.after_engine_save = crash

    start = 0
    ckpt = mgr.resolve_resume(args.resume)
    if ckpt is not None:
        expect = {"config_hash": chash, "config": run_config, "ignore": IGNORE}
        if args.universal == "fallback":
            try:
                mgr.load(engine, ckpt, expect=expect)
                raise SystemExit("expected the load to be refused")
            except CheckpointError as exc:
                if rank == 0:
                    say(f"REFUSED {exc}")
        state = mgr.load(engine, ckpt, expect=expect, universal=args.universal != "no")
        start = int(state["step"])
        assert state["data"]["examples_consumed"] == start * GLOBAL_MICRO * MICRO, state["data"]
        assert engine.global_steps == start, (engine.global_steps, start)
        if rank == 0:
            say(f"RESUMED from={ckpt} step={start}")
        cs, sha = checksum(engine)
        if rank == 0:
            say(f"CKSUM when=loaded step={start} sum={cs!r} sha={sha}")

    def save(step: int) -> None:
        state = {
            "data": {"examples_consumed": step * GLOBAL_MICRO * MICRO, "seed": 0, "epoch": 0},
            "scheduler": scheduler.state_dict(),
            "config": run_config,
            "config_hash": chash,
        }
        tag = mgr.save(engine, step, state)
        cs, sha = checksum(engine)
        if rank == 0:
            say(f"SAVED step={step} tag={tag}")
            say(f"CKSUM when=saved step={step} sum={cs!r} sha={sha}")

    for step in range(start, args.steps):
        losses = []
        for m in range(ga):
            ids = make_batch(step, rank * ga + m)
            out = engine(input_ids=ids, labels=ids)
            engine.backward(out.loss)
            engine.step()
            losses.append(out.loss.detach().float())
        total = torch.stack(losses).sum().reshape(1)
        dist.all_reduce(total)
        draws = [float(torch.rand(())), random.random()]
        gathered = [None] * world
        dist.all_gather_object(gathered, draws)
        done = step + 1
        if rank == 0:
            lr = scheduler.get_last_lr()[0]
            say(f"STEP {done} loss={float(total) / GLOBAL_MICRO:.10f} lr={lr:.8g} rng={gathered}")
        if args.step_sleep:
            time.sleep(args.step_sleep)
        saved = False
        if (args.save_every and done % args.save_every == 0) or (done == args.steps and not args.no_save_final):
            save(done)
            saved = True
        if stop.should_stop(engine):
            if not saved:
                save(done)
            say(f"STOPPED step={done} rank={rank} signal={stop.signal_name}")
            shutdown()
            return RESUME_EXIT_CODE

    cs, sha = checksum(engine)
    if rank == 0:
        say(f"CKSUM when=final step={args.steps} sum={cs!r} sha={sha}")
        say(f"DONE step={args.steps}")
    stop.restore()
    del dschf
    shutdown()
    return 0


def shutdown() -> None:
    """exit_process() does the teardown (barrier, destroy_process_group, os._exit)."""


if __name__ == "__main__":
    from patchrec_dist.train.signals import exit_process

    exit_process(main())
