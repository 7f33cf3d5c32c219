"""What only a GPU shows: NCCL with the rank's device set first, bf16 against fp32, and the loss's
logits memory on CUDA. Skipped without CUDA (CI has none); bench/gpu_check.sh runs them on a lent
GPU machine."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from patchrec_dist.launch import free_port
from patchrec_dist.model.tiny import tiny_llama_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_nccl_on_one_gpu_uses_the_ranks_device():
    script = textwrap.dedent("""
        import torch, torch.distributed as dist
        from patchrec_dist.train.distributed import init_distributed
        rank, world, device = init_distributed(60, deepspeed_comm=False)
        assert dist.get_backend() == "nccl" and torch.cuda.current_device() == device.index
        t = torch.ones(4, device=device)
        dist.all_reduce(t)
        out = [None]
        dist.all_gather_object(out, {"rank": rank})
        print("OK", world, t.sum().item(), out)
        dist.destroy_process_group()
    """)
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK 1 4.0" in proc.stdout


def test_bf16_loss_is_close_to_fp32():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(1000, hidden_size=128, layers=2)).cuda()
    ids = torch.randint(3, 1000, (4, 64), device="cuda")
    fp32 = model(input_ids=ids, labels=ids).loss.item()
    bf16 = model.to(torch.bfloat16)(input_ids=ids, labels=ids).loss.item()
    assert abs(bf16 - fp32) / fp32 < 2e-2, (bf16, fp32)


def test_answer_logits_memory_on_cuda_with_a_128k_vocabulary():
    """Peak memory of the kept-logits loss on a 16 x 1024 micro-batch is far below the full logits'."""
    from transformers import AutoModelForCausalLM

    from patchrec_dist.model.answer_logits import logits_at
    from patchrec_dist.patching.collate import IGNORE_INDEX, predicted_positions
    from patchrec_dist.train.trainer import token_loss_sum

    vocab, rows, width = 128_256, 16, 1024
    model = AutoModelForCausalLM.from_config(tiny_llama_config(vocab, hidden_size=64, layers=1)).cuda()
    ids = torch.randint(3, vocab, (rows, width), device="cuda")
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -12:] = ids[:, -12:]
    positions = predicted_positions(labels)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with logits_at(model, positions):
        loss = token_loss_sum(model(input_ids=ids, logits_to_keep=0).logits, labels, positions)
    loss.backward()
    kept_peak = torch.cuda.max_memory_allocated() - base
    full_logits_bytes = rows * width * vocab * 4
    assert kept_peak < full_logits_bytes / 10, (kept_peak, full_logits_bytes)
