"""A run's checkpoint -> a standard Hugging Face model folder (safetensors, config, tokenizer,
generation config) that AutoModelForCausalLM.from_pretrained loads, and `--init` accepts.

ZeRO-3 checkpoints hold partitioned fp32 shards; DeepSpeed's zero_to_fp32 reassembles them
offline (no ranks needed), then the weights go into a model built from the run's saved config.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any

from patchrec_dist.data import storage


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


@contextlib.contextmanager
def plain_model_creation():
    """Build a model without ZeRO-3 partitioning even inside a DeepSpeed run (rank 0 exporting
    while HfDeepSpeedConfig is alive would otherwise wait for the other ranks in zero.Init)."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def export_run(run: str, out: str | None = None, tag: str | None = None, merge_lora: bool = True) -> str:
    """Write RUN's checkpoint TAG (default: latest) as an HF folder at OUT (default RUN/final)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from patchrec_dist.train.checkpoint import CheckpointManager

    tag = tag or CheckpointManager(run).latest_tag()
    if tag is None:
        raise FileNotFoundError(f"{run}: no complete checkpoint to export")
    final_url = out or storage.join(run, "final")
    with tempfile.TemporaryDirectory() as tmp:
        local = _local_run(run, tag, os.path.join(tmp, "run"))
        with open(os.path.join(local, "config.json")) as f:
            run_cfg: dict[str, Any] = json.load(f)
        state = get_fp32_state_dict_from_zero_checkpoint(os.path.join(local, "checkpoints"), tag=tag)
        config = AutoConfig.from_pretrained(os.path.join(local, "model_config"))
        with plain_model_creation():
            model = AutoModelForCausalLM.from_config(config)
        if run_cfg.get("lora"):
            from peft import LoraConfig, get_peft_model

            targets = [t.strip() for t in run_cfg["lora_targets"].split(",") if t.strip()]
            model = get_peft_model(model, LoraConfig(r=run_cfg["lora_rank"], lora_alpha=run_cfg["lora_alpha"],
                                                     target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight", "base_model.model.lm_head.weight"} if config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"{run}/{tag}: checkpoint does not fit the model: missing {sorted(missing)[:5]}, "
                               f"unexpected {sorted(unexpected)[:5]}")
        if config.tie_word_embeddings:
            model.tie_weights()
        target = os.path.join(tmp, "final")
        if run_cfg.get("lora") and not merge_lora:
            base_dir = os.path.join(target, "base")
            model.get_base_model().save_pretrained(base_dir)
            model.peft_config["default"].base_model_name_or_path = "base"
            model.save_pretrained(target)
        else:
            if run_cfg.get("lora"):
                model = model.merge_and_unload()
            model.save_pretrained(target, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(local, "tokenizer"))
        tokenizer.save_pretrained(target)
        GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id).save_pretrained(target)
        with open(os.path.join(target, "patchrec_run.json"), "w") as f:
            json.dump({"run": run, "tag": tag, "config": run_cfg}, f, indent=2)
        _publish_folder(target, final_url)
    return final_url


def _publish_folder(src: str, url: str) -> None:
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
