"""Prompts as token ids, assembled by concatenation from pieces tokenized once.

A prompt is the model's chat template around two holes: the history (between
`<|start_seq_id|>` and `<|end_seq_id|>`) and the answer (the target title). Every text piece
between two added tokens is tokenized on its own by a Hugging Face tokenizer, so the pieces
(template prefix, each title, the template between history and answer) can be tokenized once
per (tokenizer, catalog) and concatenated on DataLoader workers; `tests/test_prompt.py` checks
that the result equals tokenizing the whole chat-formatted text.

`PromptTokens` holds only numpy arrays: it is what workers receive (no tokenizer is pickled).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SEQ_START = "<|start_seq_id|>"
SEQ_END = "<|end_seq_id|>"
ITEM_SEP = "<|item_sep_id|>"
PATCH = "<|patch_id|>"  # placeholder at an item or session patch position
PATCHREC_TOKENS = (SEQ_START, SEQ_END, ITEM_SEP, PATCH)
HISTORY_SLOT = "[HISTORY_SEQUENCE]"
IGNORE_INDEX = -100

_HOLE_HISTORY = "\ue000history\ue000"  # private-use markers: never inside a real template
_HOLE_ANSWER = "\ue000answer\ue000"

# Used only for tokenizers that come without a chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
PLAIN_TEMPLATE = (
    "{{ bos_token or '' }}{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


@dataclass(frozen=True)
class PromptTemplate:
    system: str
    instruction: str  # holds HISTORY_SLOT once

    def __post_init__(self) -> None:
        if self.instruction.count(HISTORY_SLOT) != 1:
            raise ValueError(f"prompt instruction must contain {HISTORY_SLOT} exactly once: {self.instruction!r}")

    @classmethod
    def for_domain(cls, domain: str = "movie") -> PromptTemplate:
        """The paper's prompt (reference.md) for movies or books."""
        verb = {"movie": "watched", "book": "read"}.get(domain)
        if verb is None:
            raise ValueError(f"domain {domain!r}: expected movie or book (or give a prompt file)")
        action = "watch" if domain == "movie" else "read"
        return cls(
            system=f"You are a helpful assistant in {domain} recommendations.",
            instruction=f"A user has {verb} {HISTORY_SLOT}. Please recommend one {domain} for this user to "
            f"{action} next with its title only and without any explanation.",
        )

    @classmethod
    def from_text(cls, text: str, source: str = "prompt") -> PromptTemplate:
        """Two lines, system then instruction (the paper's prompt.txt files)."""
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        if len(lines) != 2:
            raise ValueError(f"{source}: expected two lines (system, instruction), found {len(lines)}")
        return cls(system=lines[0], instruction=lines[1])

    def to_dict(self) -> dict[str, str]:
        return {"system": self.system, "instruction": self.instruction}


def add_patchrec_tokens(tokenizer: Any) -> int:
    """Register the history markers and the patch placeholder as special tokens; returns how many
    were new (the model's embeddings must then be resized)."""
    from tokenizers import AddedToken

    missing = [t for t in PATCHREC_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return len(missing)


def ensure_chat_template(tokenizer: Any) -> None:
    """Give a tokenizer without a chat template a default that fits its special tokens."""
    if getattr(tokenizer, "chat_template", None):
        return
    vocab = tokenizer.get_vocab()
    if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
        tokenizer.chat_template = LLAMA3_TEMPLATE
    elif "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        tokenizer.chat_template = CHATML_TEMPLATE
    else:
        tokenizer.chat_template = PLAIN_TEMPLATE


def chat_text(tokenizer: Any, template: PromptTemplate, history_text: str, answer: str | None) -> str:
    """The whole prompt as text (answer None: up to where generation starts)."""
    messages = [{"role": "system", "content": template.system},
                {"role": "user", "content": template.instruction.replace(HISTORY_SLOT, history_text)}]
    if answer is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": answer})
    return tokenizer.apply_chat_template(messages, tokenize=False)


def history_text(segments: list[tuple[str, str | None]]) -> str:
    """`<|start_seq_id|>T1<|item_sep_id|>...Tn<|end_seq_id|>`; a patch segment is (kind, None)."""
    parts = [title if title is not None else PATCH for _, title in segments]
    return SEQ_START + ITEM_SEP.join(parts) + SEQ_END


@dataclass
class PromptTokens:
    """Everything a worker needs to assemble prompts as ids, as numpy arrays."""

    prefix: np.ndarray  # template up to and excluding <|start_seq_id|>
    between: np.ndarray  # after <|end_seq_id|> up to the answer's lead text
    lead: np.ndarray  # text right before the answer that tokenizes together with it (may be empty)
    title_flat: np.ndarray  # title tokens of every catalog item, concatenated
    title_offsets: np.ndarray  # (items + 1,)
    answer_flat: np.ndarray  # lead + title + tail tokens per item (the answer as the template renders it)
    answer_offsets: np.ndarray
    answer_label_start: np.ndarray  # (items,) where the answer's labels start inside its answer tokens
    eot: np.ndarray  # the end-of-turn token(s): labelled
    suffix: np.ndarray  # the rest of the template after end-of-turn: fed, not labelled
    seq_start: int
    seq_end: int
    item_sep: int
    patch: int
    pad: int
    key: str  # hash of tokenizer + template + catalog

    @property
    def num_items(self) -> int:
        return len(self.title_offsets) - 1

    @functools.cached_property
    def token_pool(self) -> np.ndarray:
        """Every title's tokens, then the placeholder, separator and end marker: what a worker
        gathers a history's ids from (built once per process, not per example)."""
        return np.concatenate([self.title_flat, np.array([self.patch, self.item_sep, self.seq_end], np.int32)])

    def title_lengths(self) -> np.ndarray:
        return np.diff(self.title_offsets)

    def title(self, item: int) -> np.ndarray:
        return self.title_flat[self.title_offsets[item] : self.title_offsets[item + 1]]

    def answer(self, item: int) -> np.ndarray:
        return self.answer_flat[self.answer_offsets[item] : self.answer_offsets[item + 1]]


def _csr(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for x in lists for t in x), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


def _split_at_added_tokens(text: str, added: list[str], last: bool) -> int:
    """Index in TEXT right after the last added token (last=True) or at the first one (False)."""
    best = 0 if last else len(text)
    for tok in added:
        i = text.rfind(tok) if last else text.find(tok)
        if i >= 0:
            best = max(best, i + len(tok)) if last else min(best, i)
    return best


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([tokenizer.chat_template, str(tokenizer.pad_token), str(tokenizer.eos_token)])
    return hashlib.sha256((body + extra).encode()).hexdigest()


def build_prompt_tokens(tokenizer: Any, template: PromptTemplate, titles: list[str],
                        cache_dir: str | os.PathLike | None = None) -> PromptTokens:
    """Tokenize the template pieces and every title once; cached in memory and on disk by a hash of
    (tokenizer, template, titles)."""
    add_patchrec_tokens(tokenizer)
    ensure_chat_template(tokenizer)
    key = hashlib.sha256("\x00".join([tokenizer_fingerprint(tokenizer), json.dumps(template.to_dict()),
                                       *titles]).encode()).hexdigest()[:24]
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    path = Path(cache_dir) / f"prompt-tokens-{key}.npz" if cache_dir else None
    if path is not None and path.exists():
        tokens = _load(path, key)
    else:
        tokens = _tokenize(tokenizer, template, titles, key)
        if path is not None:
            _save(tokens, path)
    _MEMORY_CACHE[key] = tokens
    return tokens


_MEMORY_CACHE: dict[str, PromptTokens] = {}


def _tokenize(tokenizer: Any, template: PromptTemplate, titles: list[str], key: str) -> PromptTokens:
    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    full = chat_text(tokenizer, template, _HOLE_HISTORY, _HOLE_ANSWER)
    if full.count(_HOLE_HISTORY) != 1 or full.count(_HOLE_ANSWER) != 1:
        raise ValueError("the chat template must render the user message and the assistant answer once each")
    pre, rest = full.split(_HOLE_HISTORY)
    mid, post = rest.split(_HOLE_ANSWER)
    added = [t.content for t in tokenizer.added_tokens_decoder.values()]
    cut = _split_at_added_tokens(mid, added, last=True)
    between_text, lead_text = mid[:cut], mid[cut:]
    tail_end = _split_at_added_tokens(post, added, last=False)
    tail_text, post_text = post[:tail_end], post[tail_end:]
    post_ids = enc(post_text)
    if not post_ids:
        raise ValueError("the chat template has no end-of-turn token after the answer")
    lead_ids = enc(lead_text)
    titles_ids = tokenizer(list(titles), add_special_tokens=False)["input_ids"] if titles else []
    answers = tokenizer([lead_text + t + tail_text for t in titles], add_special_tokens=False)["input_ids"] if titles else []
    label_start = np.zeros(len(titles), dtype=np.int64)
    for i, a in enumerate(answers):  # labels start where the answer leaves the lead's tokens
        k = 0
        while k < len(lead_ids) and k < len(a) and a[k] == lead_ids[k]:
            k += 1
        label_start[i] = k
    if any(len(t) == 0 for t in titles_ids):
        empty = next(i for i, t in enumerate(titles_ids) if len(t) == 0)
        raise ValueError(f"title of item {empty} ({titles[empty]!r}) tokenizes to nothing")
    title_flat, title_offsets = _csr(titles_ids)
    answer_flat, answer_offsets = _csr(answers)
    vocab = tokenizer.get_vocab()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PromptTokens(
        prefix=np.asarray(enc(pre), dtype=np.int32), between=np.asarray(enc(between_text), dtype=np.int32),
        lead=np.asarray(lead_ids, dtype=np.int32), title_flat=title_flat, title_offsets=title_offsets,
        answer_flat=answer_flat, answer_offsets=answer_offsets, answer_label_start=label_start,
        eot=np.asarray(post_ids[:1], dtype=np.int32), suffix=np.asarray(post_ids[1:], dtype=np.int32),
        seq_start=vocab[SEQ_START], seq_end=vocab[SEQ_END], item_sep=vocab[ITEM_SEP], patch=vocab[PATCH],
        pad=int(pad if pad is not None else 0), key=key,
    )


def _save(tokens: PromptTokens, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {f.name: getattr(tokens, f.name) for f in dataclasses.fields(tokens)}  # not cached properties
    arrays = {k: v for k, v in values.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in values.items() if not isinstance(v, np.ndarray)}
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, scalars=json.dumps(scalars), **arrays)
    os.replace(tmp, path)


def _load(path: Path, key: str) -> PromptTokens:
    with np.load(path) as z:
        scalars = json.loads(str(z["scalars"]))
        arrays = {k: z[k] for k in z.files if k != "scalars"}
    if scalars.get("key") != key:
        raise ValueError(f"{path}: cache entry for another key")
    return PromptTokens(**arrays, **scalars)


def resolve_template(manifest_prompt: dict[str, str] | None = None, prompt_file: str | None = None,
                     domain: str | None = None) -> PromptTemplate:
    """An explicit prompt file wins, then an explicit domain, then the data set's own prompt, then movies."""
    if prompt_file:
        return PromptTemplate.from_text(Path(prompt_file).read_text(), prompt_file)
    if domain:
        return PromptTemplate.for_domain(domain)
    if manifest_prompt:
        return PromptTemplate(**manifest_prompt)
    return PromptTemplate.for_domain("movie")
