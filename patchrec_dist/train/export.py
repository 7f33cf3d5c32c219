"""A run's weights -> a standard Hugging Face model folder (sharded safetensors, config, tokenizer,
generation config) that AutoModelForCausalLM.from_pretrained loads, and `--init` accepts.

Two ways in, one way out (:class:`SafetensorsShardWriter`, a shard at a time, in the run's dtype):

- at the end of training (:func:`export_from_engine`, collective): ZeRO-3 gathers one parameter at
  a time on every rank; rank 0 casts it to the training dtype (bf16 when trained in bf16) and
  adds it to the current shard. Memory on rank 0 is one shard (2 GB by default), not the model;
  no second model is built.
- from any checkpoint, offline (:func:`export_run`, ``tools/export_hf.py``): DeepSpeed's
  zero_to_fp32 reassembles each fp32 tensor lazily from the partition files, one at a time.

LoRA runs are merged into the base weights (W + B A * alpha / r) by name, tensor by tensor; or,
offline with ``merge_lora=False``, written as an adapter folder with the base model in ``base/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from patchrec_dist.data import storage

SHARD_BYTES = 2 * 2**30
PEFT_PREFIX = "base_model.model."
_LORA_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.default\.weight$")


class SafetensorsShardWriter:
    """Writes (name, tensor) pairs into FOLDER as ``model-0000i-of-0000n.safetensors`` shards of at
    most SHARD_BYTES plus ``model.safetensors.index.json`` (one shard: ``model.safetensors``),
    the layout ``save_pretrained`` writes. Tensors are held until their shard is full."""

    def __init__(self, folder: str, shard_bytes: int = SHARD_BYTES):
        self.folder, self.shard_bytes = folder, shard_bytes
        self._shard: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._written: list[tuple[str, list[str], int]] = []  # (temp file, names, bytes)
        os.makedirs(folder, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._shard and self._bytes + size > self.shard_bytes:
            self._flush()
        self._shard[name] = tensor.contiguous()
        self._bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = os.path.join(self.folder, f".shard-{len(self._written):05d}.safetensors")
        save_file(self._shard, path, metadata={"format": "pt"})
        self._written.append((path, list(self._shard), self._bytes))
        self._shard, self._bytes = {}, 0

    def close(self) -> int:
        """Names the shards and writes the index; returns the total bytes of the weights."""
        if self._shard or not self._written:
            self._flush()
        n = len(self._written)
        total = sum(b for *_, b in self._written)
        if n == 1:
            os.replace(self._written[0][0], os.path.join(self.folder, "model.safetensors"))
            return total
        weight_map = {}
        for i, (path, names, _) in enumerate(self._written, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, os.path.join(self.folder, final))
            weight_map.update({name: final for name in names})
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1, sort_keys=True)
        return total


def hf_names(named: Iterable[tuple[str, torch.Tensor]], lora: dict[str, Any] | None,
             tied_embeddings: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a (peft-wrapped) training model -> the plain HF model's names, LoRA merged.

    A LoRA module's base weight and its A and B arrive together (parameter order), and are
    emitted once all three are there; a tied LM head is left out, as save_pretrained does."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    scaling = lora["lora_alpha"] / lora["lora_rank"] if lora else 1.0
    for name, tensor in named:
        if name.startswith(PEFT_PREFIX):
            name = name[len(PEFT_PREFIX):]
        m = _LORA_RE.match(name)
        if m or ".base_layer." in name and name.endswith(".weight"):
            module = m.group("module") if m else name.split(".base_layer.")[0]
            parts = pending.setdefault(module, {})
            parts[m.group("which") if m else "W"] = tensor
            if len(parts) == 3:
                del pending[module]
                merged = parts["W"].float() + (parts["B"].float() @ parts["A"].float()) * scaling
                yield f"{module}.weight", merged.to(parts["W"].dtype)
            continue
        name = name.replace(".base_layer.", ".")
        if tied_embeddings and name == "lm_head.weight":
            continue
        yield name, tensor
    if pending:
        raise RuntimeError(f"LoRA modules without all of base weight, A and B: {sorted(pending)[:5]}")


def gathered_parameters(model: Any, dtype: torch.dtype, rank: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective: every parameter of MODEL in full, one at a time (ZeRO-3 gathers each on every
    rank); rank 0 yields (name, CPU copy in DTYPE), the other ranks yield nothing."""
    import deepspeed

    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                yield name, param.detach().to(dtype=dtype, device="cpu", copy=True)


def export_from_engine(engine: Any, run: str, tokenizer: Any, run_cfg: dict[str, Any], tag: str | None,
                       rank: int, out: str | None = None, shard_bytes: int = SHARD_BYTES) -> str:
    """Collective: ENGINE's weights, gathered in the training dtype, as an HF folder at OUT
    (default RUN/final), published by rank 0. Returns the folder's URL."""
    import torch.distributed as dist

    model = engine.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtype = torch.bfloat16 if run_cfg.get("bf16") else torch.float32
    final_url = out or storage.join(run, "final")
    lora = run_cfg if run_cfg.get("lora") else None
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "final")
        writer = SafetensorsShardWriter(target, shard_bytes) if rank == 0 else None
        for name, tensor in hf_names(gathered_parameters(model, dtype, rank), lora, base.config.tie_word_embeddings):
            writer.add(name, tensor)
        if rank == 0:
            writer.close()
            _write_folder_files(target, base.config, tokenizer, dtype, {"run": run, "tag": tag, "config": run_cfg})
            publish_folder(target, final_url)
        if dist.is_initialized():
            dist.barrier()
    return final_url


def _write_folder_files(target: str, config: Any, tokenizer: Any, dtype: torch.dtype, provenance: dict) -> None:
    from transformers import GenerationConfig

    config = type(config).from_dict(config.to_dict())  # a copy: the live model keeps its own
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(target)
    tokenizer.save_pretrained(target)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id).save_pretrained(target)
    with open(os.path.join(target, "patchrec_run.json"), "w") as f:
        json.dump(provenance, f, indent=2)


def _local_run(run: str, tag: str, tmp: str) -> str:
    """A local folder with the run's files needed for export (downloads a remote run's)."""
    if storage.is_local(run):
        return run
    fs, root = storage.filesystem_for(run)
    for rel in ("config.json", "tokenizer", "model_config", f"checkpoints/{tag}"):
        src = f"{root}/{rel}"
        dst = os.path.join(tmp, rel)
        if fs.isdir(src):
            fs.get(src, dst, recursive=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            fs.get_file(src, dst)
    return tmp


def export_run(run: str, out: str | None = None, tag: str | None = None, merge_lora: bool = True,
               shard_bytes: int = SHARD_BYTES) -> str:
    """Write RUN's checkpoint TAG (default: latest) as an HF folder at OUT (default RUN/final), in
    the run's training dtype, one tensor at a time (no model is built)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoTokenizer

    from patchrec_dist.train.checkpoint import CheckpointManager

    tag = tag or CheckpointManager(run).latest_tag()
    if tag is None:
        raise FileNotFoundError(f"{run}: no complete checkpoint to export")
    final_url = out or storage.join(run, "final")
    with tempfile.TemporaryDirectory() as tmp:
        local = _local_run(run, tag, os.path.join(tmp, "run"))
        with open(os.path.join(local, "config.json")) as f:
            run_cfg: dict[str, Any] = json.load(f)
        dtype = torch.bfloat16 if run_cfg.get("bf16") else torch.float32
        config = AutoConfig.from_pretrained(os.path.join(local, "model_config"))
        lazy = get_fp32_state_dict_from_zero_checkpoint(os.path.join(local, "checkpoints"), tag=tag, lazy_mode=True)
        named = ((name, t.contiguous().to(dtype)) for name, t in lazy.items())
        target = os.path.join(tmp, "final")
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(local, "tokenizer"))
        provenance = {"run": run, "tag": tag, "config": run_cfg}
        if run_cfg.get("lora") and not merge_lora:
            _write_adapter_folder(target, named, run_cfg, config, tokenizer, dtype, provenance, shard_bytes)
        else:
            writer = SafetensorsShardWriter(target, shard_bytes)
            lora = run_cfg if run_cfg.get("lora") else None
            try:
                for name, tensor in hf_names(named, lora, config.tie_word_embeddings):
                    writer.add(name, tensor)
            except RuntimeError as exc:
                raise RuntimeError(f"{run}/{tag}: {exc}") from None
            writer.close()
            _write_folder_files(target, config, tokenizer, dtype, provenance)
        publish_folder(target, final_url)
    return final_url


def _write_adapter_folder(target: str, named: Iterable[tuple[str, torch.Tensor]], run_cfg: dict[str, Any],
                          config: Any, tokenizer: Any, dtype: torch.dtype, provenance: dict, shard_bytes: int) -> None:
    """LoRA unmerged: TARGET holds peft's adapter (adapter_config.json, adapter_model.safetensors)
    and TARGET/base the base model; transformers' peft integration loads the pair."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    base_writer = SafetensorsShardWriter(os.path.join(target, "base"), shard_bytes)
    adapter: dict[str, torch.Tensor] = {}
    for name, tensor in named:
        if ".lora_A.default." in name or ".lora_B.default." in name:
            adapter[name.replace(".default.", ".")] = tensor
            continue
        plain = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        plain = plain.replace(".base_layer.", ".")
        if not (config.tie_word_embeddings and plain == "lm_head.weight"):
            base_writer.add(plain, tensor)
    base_writer.close()
    _write_folder_files(os.path.join(target, "base"), config, tokenizer, dtype, provenance)
    save_file(adapter, os.path.join(target, "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = [t.strip() for t in run_cfg["lora_targets"].split(",") if t.strip()]
    LoraConfig(r=run_cfg["lora_rank"], lora_alpha=run_cfg["lora_alpha"], target_modules=targets, lora_dropout=0.0,
               task_type="CAUSAL_LM", base_model_name_or_path="base").save_pretrained(target)
    tokenizer.save_pretrained(target)
    with open(os.path.join(target, "patchrec_run.json"), "w") as f:
        json.dump(provenance, f, indent=2)


def export_patch_table(run: str, out: str, data: str | None = None) -> str:
    """RUN's item-patch table (model/patch_table.py) at OUT, a local folder or URL: the vectors of
    the run's export (RUN/final, or an HF folder with the PatchRec tokens and DATA) over the
    catalog of DATA (default: the data set the run trained on)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from patchrec_dist.data.catalog import load_catalog
    from patchrec_dist.data.manifest import load_manifest
    from patchrec_dist.model.load import run_export_dir
    from patchrec_dist.model.patch_table import write_patch_table
    from patchrec_dist.patching.prompt import PATCHREC_TOKENS, build_prompt_tokens, resolve_template
    from patchrec_dist.train.config import read_run_config

    try:
        run_cfg = read_run_config(run)
    except FileNotFoundError:  # an HF folder: --data names the catalog
        run_cfg = {}
    data = data or run_cfg.get("data")
    if not data:
        raise FileNotFoundError(f"{run}: no config.json naming the data set; give --data")
    model_dir = run_export_dir(run)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    missing = [t for t in PATCHREC_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"{model_dir}: the tokenizer has no {', '.join(missing)}: not a PatchRec run's export")
    manifest = load_manifest(data)
    catalog = load_catalog(manifest)
    template = resolve_template(manifest.prompt, run_cfg.get("prompt_file"), run_cfg.get("domain"))
    tokens = build_prompt_tokens(tokenizer, template, catalog["title"].to_list())
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        write_patch_table(os.path.join(tmp, "table"), model, tokenizer, tokens, catalog,
                          {"run": run, "model": model_dir, "data": data, "catalog_generation": manifest.generation})
        publish_folder(os.path.join(tmp, "table"), out)
    return out


def publish_folder(src: str, url: str) -> None:
    """Copy a finished folder to URL; locally through a temporary name and a rename."""
    if storage.is_local(url):
        tmp = f"{url}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        if os.path.exists(url):
            shutil.rmtree(url)
        os.replace(tmp, url)
        return
    fs, path = storage.filesystem_for(url)
    fs.put(src.rstrip("/") + "/", path, recursive=True)
