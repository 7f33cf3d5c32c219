"""A tiny random Llama and a tokenizer trained on the catalog's titles: real components, small
enough for tests and smoke runs on CPU (`--model tiny`)."""

from __future__ import annotations

from collections.abc import Iterable

from patchrec_dist.patching.prompt import CHATML_TEMPLATE, PATCHREC_TOKENS

TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_title_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer (the scheme Llama-3 and SmolLM2 use) trained on TEXTS, with a
    ChatML chat template and the PatchRec special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*TINY_SPECIAL_TOKENS, *PATCHREC_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                      pad_token="<|endoftext|>", unk_token=None)
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def tiny_llama_config(vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                      max_positions: int = 4096, tie_embeddings: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=tie_embeddings,
                       rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=0)


def llama_1b_config(vocab_size: int = 128_256, layers: int = 16):
    """Llama-3.2-1B's shape (hidden 2048, 32 heads, 8 KV heads, MLP 8192, tied embeddings) for
    random-weight benchmarks; LAYERS below 16 makes a shallower model of the same width."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500_000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)


def save_tiny_model(folder: str, titles: Iterable[str], vocab_size: int = 1024, hidden_size: int = 64,
                    layers: int = 2, seed: int = 0) -> str:
    """Write a random tiny Llama and its title tokenizer as an ordinary HF folder: what `--model
    FOLDER` takes, so smoke runs exercise the same path as a real base model."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = train_title_tokenizer(titles, vocab_size)
    config = tiny_llama_config(len(tok), hidden_size=hidden_size, layers=layers)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
