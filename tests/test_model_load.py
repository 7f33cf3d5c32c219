"""Model set-up: vocabulary growth for the PatchRec tokens, config parsing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from patchrec_dist.model.load import resize_for_tokenizer
from patchrec_dist.model.tiny import tiny_llama_config
from patchrec_dist.patching.layouts import LayoutSpec
from patchrec_dist.train.config import TrainConfig, parse_config


def test_new_embedding_rows_are_the_mean_of_the_old_ones():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(100, hidden_size=16))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    assert resize_for_tokenizer(model, 104, zero3=False) == 4
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_in.shape == (104, 16) and new_out.shape == (104, 16) and model.config.vocab_size == 104
    torch.testing.assert_close(new_in[:100], old_in)
    torch.testing.assert_close(new_in[100:], old_in.mean(0, keepdim=True).expand(4, -1))
    torch.testing.assert_close(new_out[100:], old_out.mean(0, keepdim=True).expand(4, -1))
    assert resize_for_tokenizer(model, 104, zero3=False) == 0  # nothing to add


def test_config_file_and_flags(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("data: /d\nmicro-batch: 3\nstage: pft-i\nitem_len: 7\n")
    cfg = parse_config(["--config", str(cfg_file), "--micro-batch", "5", "--lora", "--max-history", "none"],
                       defaults={"stage": "ppt"})
    assert (cfg.data, cfg.micro_batch, cfg.layout.stage, cfg.layout.item_len, cfg.lora, cfg.max_history) == \
        ("/d", 5, "pft-i", 7, True, None)
    nested = tmp_path / "nested.yaml"
    nested.write_text("data: /d\nlayout:\n  stage: budget\n  max-positions: 64\n")
    cfg = parse_config(["--config", str(nested), "--group-size", "3"])
    assert (cfg.layout.stage, cfg.layout.max_positions, cfg.layout.group_size) == ("budget", 64, 3)


def _another_value(f: dataclasses.Field, value):
    if "choices" in f.metadata:
        return next(c for c in f.metadata["choices"] if c != value)
    if isinstance(value, bool):
        return not value
    if value is None:
        return 7
    return value + (1 if isinstance(value, (int, float)) else "-other")


# what a resume may change (speed, memory, I/O, how long to run) and what it may not (what is trained)
MUST_BE_NEUTRAL = {"num_workers", "log_every", "output", "save_every", "keep_last", "dist_timeout_s", "resume",
                   "universal", "export", "max_steps", "epochs", "attn_implementation", "ds_config"}
MUST_COUNT = {"data", "split", "max_history", "model", "init", "lora", "lora_rank", "ppt_schedule", "ppt_p_max", "micro_batch", "grad_accum", "lr", "weight_decay",
              "warmup_ratio", "grad_clip", "seed", "bf16", "tiny_hidden", "window_shards"}


def test_every_field_that_changes_training_changes_the_resume_hash_and_no_other_does():
    from patchrec_dist.train.config import RESUME_NEUTRAL

    assert MUST_BE_NEUTRAL <= RESUME_NEUTRAL and not MUST_COUNT & RESUME_NEUTRAL
    base = TrainConfig(data="/d", bf16=False, layout=LayoutSpec("budget", max_positions=64, session_gap=3600.0))
    fields = [f for f in dataclasses.fields(TrainConfig) if f.name != "layout"]
    assert {f.name for f in fields} >= MUST_BE_NEUTRAL | MUST_COUNT
    for f in fields:
        changed = dataclasses.replace(base, **{f.name: _another_value(f, getattr(base, f.name))})
        differs = changed.hash(ignore=RESUME_NEUTRAL) != base.hash(ignore=RESUME_NEUTRAL)
        assert differs == (f.name not in RESUME_NEUTRAL), f.name
    for f in dataclasses.fields(LayoutSpec):  # every layout knob changes what is trained
        layout = dataclasses.replace(base.layout, **{f.name: _another_value(f, getattr(base.layout, f.name))})
        assert dataclasses.replace(base, layout=layout).hash(ignore=RESUME_NEUTRAL) != base.hash(ignore=RESUME_NEUTRAL)


@pytest.mark.parametrize("argv,flag", [
    (["--micro-batch", "0"], "--micro-batch"),
    (["--stage", "budget"], "max_positions"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio"),
    (["--lr", "0"], "--lr"),
])
def test_bad_training_flags_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--data", "/d", *argv])
    assert exc.value.code == 2 and flag in capsys.readouterr().err


def test_unknown_config_key_is_refused(tmp_path, capsys):
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text('{"data": "/d", "learning_rate": 1}')
    with pytest.raises(SystemExit):
        parse_config(["--config", str(cfg_file)])
    assert "learning_rate" in capsys.readouterr().err


@pytest.mark.parametrize("env, enabled", [({}, False), ({"USE_HUB_KERNELS": "YES"}, True)])
def test_hub_kernels_are_off_unless_the_user_turns_them_on(env, enabled):
    """With `kernels` installed, transformers fetches Hub kernels at every CUDA model load; on an
    H200 that stopped every run ("could not verify publisher trust status"). patchrec_dist turns
    them off by default, in every process that imports it."""
    import os
    import subprocess
    import sys

    code = ("import patchrec_dist; from transformers.integrations.hub_kernels import _kernels_enabled; "
            "print(_kernels_enabled())")
    base = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    proc = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == str(enabled)
