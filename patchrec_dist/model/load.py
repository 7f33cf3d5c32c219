"""Build the LLM and its tokenizer for a run, in the order ZeRO-3 needs.

1. HfDeepSpeedConfig exists before the model is created, so weights arrive partitioned.
2. The PatchRec tokens are added and the embeddings resized inside GatheredParameters, new rows
   set to the mean of the old ones, config.vocab_size updated.
3. Only then peft wraps the model (LoRA), so the adapters see the final vocabulary.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from patchrec_dist.data import storage
from patchrec_dist.patching.prompt import PromptTemplate, add_patchrec_tokens, ensure_chat_template


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _node_leader() -> bool:
    """Local rank 0: the rank that writes this node's local files (nodes need not share a disk)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def resolve_model_source(spec: str, work_dir: str) -> str:
    """An HF folder (or hub id) for SPEC; GGUF files and 'smollm2' are converted once (rank 0), an
    HF folder at a URL is downloaded (local_model_dir)."""
    if not storage.is_local(spec):
        return local_model_dir(spec)
    if spec == "smollm2" or spec.endswith(".gguf"):
        from patchrec_dist.model.smollm2 import gguf_to_hf_folder, smollm2_model_dir

        if spec == "smollm2":
            if _node_leader():  # a locked, atomic conversion: safe where nodes share the cache
                smollm2_model_dir()
            _barrier()
            return str(smollm2_model_dir())
        out = Path(work_dir) / "converted-model"
        if _node_leader() and not out.exists():
            gguf_to_hf_folder(spec, out)
        _barrier()
        return str(out)
    return spec


def run_export_dir(path: str) -> str:
    """`--init RUN` means RUN/final (the export a finished run writes); an HF folder is itself.
    Either may be a URL (any fsspec store): then the local copy of it (local_model_dir)."""
    final = storage.join(path, "final")
    return local_model_dir(final if storage.exists(storage.join(final, "config.json")) else path)


def local_model_dir(url: str) -> str:
    """Collective for a URL: a local copy of the model folder at URL (a local path is itself).

    from_pretrained reads local folders only. One rank per node (local rank 0) downloads into the
    node's staging area (storage.cached_copy: atomic, reused while the remote files are
    unchanged); the others wait at the barrier, then find the finished copy."""
    if storage.is_local(url):
        return url
    # every rank checks, so a wrong URL fails them all at once instead of leaving some at the barrier
    if not storage.exists(storage.join(url, "config.json")):
        raise FileNotFoundError(f"{url}: no config.json there: not a model folder (nor a run with a final/ export)")
    path = storage.cached_copy(url) if _node_leader() else None
    _barrier()
    return path or storage.cached_copy(url)


def load_tokenizer(cfg: Any, titles: list[str], template: PromptTemplate, work_dir: str):
    """The tokenizer with PatchRec tokens and a chat template; `tiny` trains one on the titles."""
    from transformers import AutoTokenizer

    if cfg.init:
        tok = AutoTokenizer.from_pretrained(run_export_dir(cfg.init))
    elif cfg.model == "tiny":
        from patchrec_dist.model.tiny import train_title_tokenizer

        path = Path(work_dir) / "tiny-tokenizer"
        files = None
        if _rank() == 0:
            if not (path / "tokenizer.json").exists():
                tok = train_title_tokenizer([*titles, template.system, template.instruction], cfg.tiny_vocab)
                tok.save_pretrained(path)
            files = {f.name: f.read_bytes() for f in path.iterdir() if f.is_file()}
        write_on_every_node(path, files)  # one tokenizer per run: rank 0's, on every node's disk
        tok = AutoTokenizer.from_pretrained(path)
    else:
        tok = AutoTokenizer.from_pretrained(resolve_model_source(cfg.model, work_dir))
    return with_patchrec_vocabulary(tok)


def write_on_every_node(folder: Path, files: dict[str, bytes] | None) -> None:
    """Collective: rank 0's FILES (name -> bytes) written into FOLDER on every node (by its local
    rank 0, atomically), so every rank reads the same files from its own node's disk."""
    if dist.is_available() and dist.is_initialized():
        box = [files]
        dist.broadcast_object_list(box, src=0)
        files = box[0]
    if _node_leader() and _rank() != 0 and files is not None:
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    _barrier()


def with_patchrec_vocabulary(tok: Any) -> Any:
    """TOK with the PatchRec tokens, a chat template and a pad token (training's and, for a base
    model, evaluation's tokenizer)."""
    add_patchrec_tokens(tok)
    ensure_chat_template(tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(cfg: Any, tokenizer: Any, ds_config: dict[str, Any], work_dir: str):
    """The causal LM, partitioned under ZeRO-3, vocabulary resized, optionally LoRA-wrapped."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from patchrec_dist.model.packed_attention import attention_for_training

    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    hf_ds = HfDeepSpeedConfig(ds_config) if zero3 else None  # must outlive model creation
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    attn = {"attn_implementation": attention_for_training(cfg.attn_implementation, cfg.packing)}
    torch.manual_seed(cfg.seed)
    if cfg.init:
        model = AutoModelForCausalLM.from_pretrained(run_export_dir(cfg.init), dtype=dtype, **attn)
    elif cfg.model == "tiny":
        from patchrec_dist.model.tiny import tiny_llama_config

        config = tiny_llama_config(len(tokenizer), hidden_size=cfg.tiny_hidden, layers=cfg.tiny_layers)
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **attn)
    else:
        source = resolve_model_source(cfg.model, work_dir)
        AutoConfig.from_pretrained(source)  # a clear error for a wrong path before the heavy load
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **attn)
    resize_for_tokenizer(model, len(tokenizer), zero3)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets,
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
    model._patchrec_hf_ds_config = hf_ds  # keep it alive as long as the model
    return model


def resize_for_tokenizer(model: Any, vocab: int, zero3: bool) -> int:
    """Grow the embeddings (and an untied head) to VOCAB rows; new rows = mean of the old rows.

    Under ZeRO-3 the weights are shards outside a forward: gather them (modifier_rank=0 writes
    on rank 0 and re-partitions to everyone)."""
    old = model.get_input_embeddings().num_embeddings
    if vocab <= old:
        return 0
    model.resize_token_embeddings(vocab, mean_resizing=False)
    params = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not params[0]:
        params.append(head.weight)
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    else:
        import contextlib

        ctx = contextlib.nullcontext()
    with ctx, torch.no_grad():
        if _rank() == 0 or not zero3:
            for w in params:
                w[old:] = w[:old].mean(dim=0, keepdim=True)
    model.config.vocab_size = vocab
    return vocab - old
