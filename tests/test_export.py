"""The HF export, tensor by tensor: LoRA merged by name equals peft's own merge, the shard writer's
folder is what save_pretrained writes (from_pretrained loads it, in the run's dtype), and a
tied head is left out."""

from __future__ import annotations

import json
import os

import pytest
import torch

from patchrec_dist.model.tiny import tiny_llama_config
from patchrec_dist.train.export import SafetensorsShardWriter, hf_names


def _lora_model(tied: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(300, hidden_size=32, layers=2, tie_embeddings=tied))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                            task_type="CAUSAL_LM"))
    for name, p in peft.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: a merge of zeros would prove nothing
            p.data.normal_()
    return peft


def test_lora_merged_by_name_equals_peft_merge():
    peft = _lora_model()
    named = [(n, p.detach().clone()) for n, p in peft.named_parameters()]
    ours = dict(hf_names(named, {"lora_alpha": 8, "lora_rank": 4}, tied_embeddings=False))
    theirs = peft.merge_and_unload().state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor)


def test_a_lora_module_missing_its_b_is_an_error():
    named = [(n, p) for n, p in _lora_model().named_parameters() if "layers.1.self_attn.v_proj.lora_B" not in n]
    with pytest.raises(RuntimeError, match=r"layers\.1\.self_attn\.v_proj"):
        list(hf_names(named, {"lora_alpha": 8, "lora_rank": 4}, tied_embeddings=False))


@pytest.mark.parametrize("shard_bytes", [10_000, 2**30])  # many shards + index, or one model.safetensors
def test_sharded_bf16_folder_loads_with_from_pretrained(tmp_path, shard_bytes):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(300, hidden_size=32, layers=2, tie_embeddings=True))
    writer = SafetensorsShardWriter(str(tmp_path), shard_bytes)
    for name, tensor in hf_names(model.named_parameters(), None, tied_embeddings=True):
        assert name != "lm_head.weight"
        writer.add(name, tensor.detach().to(torch.bfloat16))
    total = writer.close()
    files = sorted(os.listdir(tmp_path))
    if shard_bytes == 2**30:
        assert files == ["model.safetensors"]
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == total and len(set(index["weight_map"].values())) > 1
        assert not [f for f in files if f.startswith(".shard-")]
    model.config.dtype = "bfloat16"
    model.config.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again on load
    want = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    got = loaded.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
