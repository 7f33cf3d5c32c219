"""2-rank DeepSpeed ZeRO-3 check of patch embeddings on CPU (launched by tests/test_patch_embed.py).

Run from the repository root:

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port 29617 \\
        tests/dist_scripts/patch_embed_zero3.py [--mode patched|reference] [--steps 4]

Environment and behaviour on CPU (deepspeed 0.19.8, torch 2.13 CPU):
- ``DS_ACCELERATOR=cpu`` is the only variable needed; the launcher sets RANK, LOCAL_RANK,
  WORLD_SIZE, MASTER_ADDR, MASTER_PORT and passes ``--local_rank=N`` on argv (ignored here).
  ``--num_gpus 2`` means 2 CPU ranks. The process group is gloo, created by
  ``deepspeed.init_distributed(dist_backend="gloo", timeout=...)``; no oneCCL needed.
- The first ``init_distributed`` on a machine JIT-compiles DeepSpeed's ``deepspeed_shm_comm``
  C++ op with ninja/g++ (about 40 s on 2 cores), cached under ``~/.cache/torch_extensions``
  (or ``$TORCH_EXTENSIONS_DIR``); later launches start in about 10 s.
- ``--master_port`` must be free; the test picks one.

Modes:
- ``patched`` (default): a tiny random LlamaForCausalLM, created partitioned (HfDeepSpeedConfig
  before ``from_config``), trains a few steps with ``embed_with_patches``. Rank 0's batches hold
  many item and session patches, rank 1's few or none, varying per step. Each rank checks that
  its embedding module ran exactly once per step, that the embedding weight really is
  partitioned, and after training (gathered with GatheredParameters) that rows used only in
  titles were updated (gradients flowed through the patch means), while never-used rows and
  the placeholder row (always overwritten by patches) were not. Prints
  ``RANK r OK steps=N loss=... embed_calls=N patches=[...]``.
- ``reference``: the same loop with ``per_item_loop_reference`` (one embedding call per item,
  as the released PatchRec code does). Ranks then call the embedding a different number of
  times and ZeRO-3's parameter all-gathers no longer pair up: the job hangs until the gloo
  timeout (``--pg-timeout``) raises. Observed with deepspeed 0.19.8: rank 0 (many items) blocks
  in the all-gather fetching the embedding for its 2nd call, rank 1 (no items) in the broadcast
  of ZeRO-3's trace check at the start of the model forward (``reset_step``); both then fail
  with gloo's ``Timed out waiting ...ms for send/recv operation to complete``. Prints
  ``RANK r REFERENCE-DONE`` if it ever got through, which it should not. Both modes print ``RANK r TRAINING mode=...`` once set up, before the first step.
"""

from __future__ import annotations

import argparse
import random
import sys

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.integrations import HfDeepSpeedConfig

from patchrec_dist.model.patch_embed import embed_with_patches, per_item_loop_reference
from patchrec_dist.patching.patch_index import PatchIndex

VOCAB = 300
PAD, PLACEHOLDER = 0, 1
TEXT_TOKENS = range(10, 200)  # appear in input_ids as plain text
TITLE_TOKENS = range(200, 290)  # appear only inside patched titles
UNUSED_TOKENS = range(290, 300)  # never used
SEQ_LEN = 24
MICRO_BATCH = 2


def ds_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "lr": 1e-3, "weight_decay": 0.0}},
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": 1e6,
            "stage3_prefetch_bucket_size": 0,
        },
        "steps_per_print": 10_000,
        "wall_clock_breakdown": False,
    }


def make_catalog(seed: int = 0, n_items: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [rng.choices(TITLE_TOKENS, k=rng.randint(1, 6)) for _ in range(n_items)]


def make_batch(rank: int, step: int, catalog: list[list[int]]):
    """input_ids, attention_mask, labels, PatchIndex; rank 0 many patches, rank 1 few or none."""
    rng = random.Random(1000 * rank + step)
    if rank == 0:
        per_row = [rng.randint(4, 8) for _ in range(MICRO_BATCH)]
    else:
        per_row = [0, 0] if step % 2 == 0 else [rng.randint(0, 1), 1]
    input_ids = torch.tensor([rng.choices(TEXT_TOKENS, k=SEQ_LEN) for _ in range(MICRO_BATCH)])
    patches, positions = [], []
    for row, n in enumerate(per_row):
        for col in sorted(rng.sample(range(1, SEQ_LEN - 4), n)):
            n_items = 1 if rng.random() < 0.5 else rng.randint(2, 5)  # item or session patch
            patches.append([catalog[i] for i in rng.sample(range(len(catalog)), n_items)])
            positions.append(row * SEQ_LEN + col)
    index = PatchIndex.from_patches(patches, positions)
    index.validate(SEQ_LEN, MICRO_BATCH)
    flat = input_ids.view(-1)
    flat[index.patch_positions] = PLACEHOLDER
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, SEQ_LEN - 3 :] = 0  # some right padding
    input_ids[1, SEQ_LEN - 3 :] = PAD
    labels = input_ids.masked_fill((input_ids == PLACEHOLDER) | (attention_mask == 0), -100)
    return input_ids, attention_mask, labels, index


def gathered_rows(embedding: torch.nn.Module) -> torch.Tensor:
    with deepspeed.zero.GatheredParameters(embedding.weight, modifier_rank=None):
        return embedding.weight.detach().clone()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["patched", "reference"], default="patched")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--pg-timeout", type=float, default=60.0, help="gloo timeout, seconds")
    args, _ = parser.parse_known_args()  # the launcher adds --local_rank=N

    from patchrec_dist.train.distributed import init_distributed

    init_distributed(args.pg_timeout)  # gloo on CPU; also unlinks DeepSpeed's leaked /dev/shm buffers
    rank = deepspeed.comm.get_rank()
    world = deepspeed.comm.get_world_size()
    assert world == 2, world
    assert get_accelerator().device_name() == "cpu", get_accelerator().device_name()

    config = ds_config()
    dschf = HfDeepSpeedConfig(config)  # keep alive: makes from_config create the model partitioned
    torch.manual_seed(0)
    llama = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(llama)
    weight = model.get_input_embeddings().weight
    assert hasattr(weight, "ds_id"), "embedding weight is not a ZeRO-3 parameter"
    assert weight.ds_tensor.numel() < weight.ds_numel, "embedding weight is not partitioned"
    before = gathered_rows(model.get_input_embeddings())

    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    embedding = engine.module.get_input_embeddings()
    calls = [0]
    embedding.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    catalog = make_catalog()
    print(f"RANK {rank} TRAINING mode={args.mode}", flush=True)
    used_title_tokens: set[int] = set()
    n_patches, losses = [], []
    for step in range(args.steps):
        input_ids, attention_mask, labels, index = make_batch(rank, step, catalog)
        used_title_tokens.update(index.title_ids.tolist())
        n_patches.append(index.num_patches)
        if args.mode == "patched":
            inputs_embeds = embed_with_patches(embedding, input_ids, index, placeholder_id=PLACEHOLDER)
        else:
            inputs_embeds = per_item_loop_reference(embedding, input_ids, index)
        out = engine(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.detach().item())

    if args.mode == "reference":
        print(f"RANK {rank} REFERENCE-DONE steps={args.steps} patches={n_patches}", flush=True)
        return 0

    assert calls[0] == args.steps, f"embedding called {calls[0]} times in {args.steps} steps"
    assert all(torch.isfinite(torch.tensor(losses))), losses
    # which title tokens did any rank use?
    used = torch.zeros(VOCAB)
    used[sorted(used_title_tokens)] = 1.0
    deepspeed.comm.all_reduce(used)
    after = gathered_rows(embedding)
    changed = (after - before).abs().amax(dim=1) > 0
    title_used = [t for t in TITLE_TOKENS if used[t] > 0]
    assert title_used, "no title tokens used"
    assert bool(changed[title_used].all()), "title-only rows were not updated: no gradient through patches"
    assert not bool(changed[list(UNUSED_TOKENS)].any()), "never-used rows changed"
    assert not bool(changed[PLACEHOLDER]), "placeholder row changed: patch positions leaked gradient"
    assert bool(changed[list(TEXT_TOKENS)].any()), "text rows were not updated"

    for r in range(world):  # one rank at a time, so the lines do not interleave
        if r == rank:
            print(
                f"RANK {rank} OK steps={args.steps} loss={losses[-1]:.4f} embed_calls={calls[0]} "
                f"patches={n_patches}",
                flush=True,
            )
        deepspeed.comm.barrier()
    del dschf
    return 0


if __name__ == "__main__":
    sys.exit(main())
