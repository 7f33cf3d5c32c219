"""Recommendations from a trained run: ``Recommender`` in your own code, ``recommend_users`` for
every user of a data set (launchers/recommend.py).

    from patchrec_dist import Recommender
    rec = Recommender.from_run("runs/pfts")            # a local folder or URL
    rec.recommend(["1193", "661", "914"], k=10)        # item ids (or titles), oldest first
    rec.recommend_batch([history_a, history_b], k=10)

The history is laid out as the run trained (its stage, g, item_len, budget; the last
``max_history`` items), and the next title is generated under the constraint to catalog titles
with the same KV-cache beam search as ``launchers/evaluate.py`` (:func:`load_for_generation` is
the set-up both use), so the same history gives the same titles and scores. Loads once, runs in
one process, no DeepSpeed.

Batch output (:func:`recommend_users`), a local folder or URL::

    OUTPUT/part-00000.parquet ...   one part per data shard: user, rank, item_id, items, title,
                                    score (the run, data set and settings in the file metadata)
    OUTPUT/recommendations.json     written last, once every part exists: the parts and counts

Shards are split over ranks (shard i on rank i % world); a part is written whole (atomically),
so a job started again after a stop or kill skips the parts it finds (written with the same
settings) and does the rest; readers read the parts that recommendations.json lists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from patchrec_dist.data import storage
from patchrec_dist.data.catalog import load_catalog
from patchrec_dist.data.manifest import load_manifest
from patchrec_dist.data.stream import Example, read_shard
from patchrec_dist.evaluate.generate import GenerationCollator, generate_topk
from patchrec_dist.evaluate.trie import TitleTrie
from patchrec_dist.model.load import local_model_dir, resize_for_tokenizer, with_patchrec_vocabulary
from patchrec_dist.patching.features import Patcher
from patchrec_dist.patching.layouts import LayoutSpec
from patchrec_dist.patching.prompt import PromptTemplate, PromptTokens, build_prompt_tokens
from patchrec_dist.train.config import flag, read_run_config, section


@dataclass
class GenerationModel:
    """A causal LM ready for constrained generation over a catalog."""

    model: Any
    tokenizer: Any
    tokens: PromptTokens
    trie: TitleTrie
    device: torch.device


def load_prompt_tokens(model_dir: str, titles: list[str], template: PromptTemplate) -> tuple[Any, PromptTokens]:
    """MODEL_DIR's tokenizer with the PatchRec tokens, and the prompt pieces and TITLES in its ids
    (what a layout is built from; no model is loaded)."""
    from transformers import AutoTokenizer

    tokenizer = with_patchrec_vocabulary(AutoTokenizer.from_pretrained(model_dir))
    return tokenizer, build_prompt_tokens(tokenizer, template, titles)


def load_for_generation(model_dir: str, titles: list[str], template: PromptTemplate, device: torch.device,
                        dtype: torch.dtype, attn_implementation: str = "sdpa") -> GenerationModel:
    """MODEL_DIR (a local HF folder) with the PatchRec tokens (a base model meets them here, with the
    mean-initialised rows training gives it), the prompt pieces and the title trie of TITLES."""
    from transformers import AutoModelForCausalLM

    tokenizer, tokens = load_prompt_tokens(model_dir, titles, template)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn_implementation)
    resize_for_tokenizer(model, len(tokenizer), zero3=False)
    return GenerationModel(model.to(device).eval(), tokenizer, tokens, TitleTrie.from_prompt_tokens(tokens), device)


def layout_for(run_cfg: dict[str, Any], overrides: dict[str, Any] | None = None) -> LayoutSpec:
    """The layout the model was trained with (all text for a base model without a run), changed
    where OVERRIDES (the layout flags given) say so. PPT trains on random layouts; its
    deterministic evaluation is all text (p = 0), which its paired copies train."""
    trained = run_cfg.get("layout") or {"stage": "text"}
    if "layout" not in run_cfg and "stage" in run_cfg:  # a run saved before the layout section: flat keys
        trained = {f.name: run_cfg[f.name] for f in dataclasses.fields(LayoutSpec) if f.name in run_cfg}
    if trained.get("stage") == "ppt":
        trained = {**trained, "stage": "text"}
    try:
        return LayoutSpec(**{**trained, **(overrides or {})})
    except ValueError as exc:
        raise ValueError(f"layout {dict(trained, **(overrides or {}))}: {exc}") from None


def eval_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: auto is bf16 on GPUs (half the memory and twice the speed of fp32; what training
    ran in there) and fp32 on CPU, where bf16 matmuls are slow."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


@dataclass
class Recommendation:
    """One recommended title: the catalog items with that title (most titles name one item), its
    log-probability under the model, best first in a list."""

    items: list[str]  # item ids, as in the data set's catalog
    title: str
    score: float


@dataclass
class Recommender:
    loaded: GenerationModel
    spec: LayoutSpec
    item_ids: list[str]
    titles: list[str]
    max_history: int | None = 100
    beams: int = 20
    def __post_init__(self) -> None:
        self._index = {item: i for i, item in enumerate(self.item_ids)}
        self._title_index: dict[str, int] = {}
        for i, title in enumerate(self.titles):
            self._title_index.setdefault(title, i)  # a shared title stands for its first item
        self._patcher = Patcher(self.loaded.tokens, self.spec)
        self._collate = GenerationCollator(self.loaded.tokens)

    @classmethod
    def from_run(cls, run: str, data: str | None = None, device: str | torch.device | None = None,
                 dtype: str = "auto", beams: int = 20, max_history: int | None = 100,
                 layout: dict[str, Any] | None = None) -> Recommender:
        """A finished run (folder or URL: its final/ export, config and data set); DATA overrides
        the data set whose catalog is recommended from, LAYOUT the run's layout (as evaluation's
        layout flags do)."""
        from patchrec_dist.patching.prompt import resolve_template
        from patchrec_dist.train.distributed import local_device

        run_cfg = read_run_config(run)
        manifest = load_manifest(data or run_cfg["data"])
        catalog = load_catalog(manifest)
        titles = catalog["title"].to_list()
        template = resolve_template(manifest.prompt, run_cfg.get("prompt_file"), run_cfg.get("domain"))
        device = torch.device(device) if device is not None else local_device()
        final = storage.join(run, "final")
        if not storage.exists(storage.join(final, "config.json")):
            raise FileNotFoundError(f"{final}: no exported model (python tools/export_hf.py {run} {final})")
        loaded = load_for_generation(local_model_dir(final), titles, template, device, eval_dtype(dtype, device))
        return cls(loaded, layout_for(run_cfg, layout), catalog["item_id"].cast(str).to_list(), titles,
                   max_history=max_history, beams=beams)

    def catalog_indices(self, history: Sequence[str | int]) -> np.ndarray:
        """HISTORY's items (item ids, or titles) as catalog indices; ValueError naming unknown ones."""
        out, unknown = [], []
        for item in history:
            key = str(item)
            index = self._index.get(key, self._title_index.get(key))
            if index is None:
                unknown.append(key)
            else:
                out.append(index)
        if unknown:
            raise ValueError(f"not in the catalog (neither an item id nor a title): {unknown[:10]}"
                             + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
        if not out:
            raise ValueError("empty history: a recommendation needs at least one item")
        return np.asarray(out, dtype=np.int32)

    def recommend(self, history: Sequence[str | int], k: int = 10, exclude_seen: bool = False) -> list[Recommendation]:
        return self.recommend_batch([history], k=k, exclude_seen=exclude_seen)[0]

    @torch.no_grad()
    def recommend_batch(self, histories: Sequence[Sequence[str | int]], k: int = 10, batch_size: int = 8,
                        exclude_seen: bool = False) -> list[list[Recommendation]]:
        """Top-K titles for each history (its last max_history items fed), batch_size histories per
        generation call. EXCLUDE_SEEN: no item of the whole history comes back, and still K titles
        do while the catalog has K unseen ones (the generation is constrained away from the seen
        titles, not filtered afterwards)."""
        indices = [self.catalog_indices(h) for h in histories]  # every history checked before any work
        out: list[list[Recommendation]] = []
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            feats = [f for i, h in enumerate(chunk) for f in self._patcher(history_example(self._window(h), i))]
            batch = self._collate(feats).to(self.loaded.device)
            hits = generate_topk(self.loaded.model, self.loaded.model.get_input_embeddings(), batch,
                                 self.loaded.trie, num_beams=max(self.beams, k), top_k=k,
                                 exclude=[set(h.tolist()) for h in chunk] if exclude_seen else None)
            out.extend([Recommendation([self.item_ids[i] for i in sorted(hit.items)], self.titles[min(hit.items)],
                                       float(hit.score)) for hit in row] for row in hits)
        return out


    def _window(self, history: np.ndarray) -> np.ndarray:
        return history[-self.max_history:] if self.max_history else history


def history_example(history: np.ndarray, index: int) -> Example:
    """A generation example for HISTORY (catalog indices): the target is not read by generation,
    so the history's last item stands in."""
    return Example(user="", position=len(history), target=int(history[-1]), history=history, times=None,
                   target_time=None, index=index, epoch=0)


# ---------------------------------------------------------------------------------------------
# every user of a data set: launchers/recommend.py
MANIFEST_FILE = "recommendations.json"


@dataclass
class RecommendConfig:
    run: str = flag("", "the trained run, a folder or URL (its final/ export and config)")
    output: str = flag("", "where the Parquet parts and recommendations.json go (a folder or URL)")
    data: str | None = flag(None, "data set whose users and catalog to use (default: the run's)")
    users: str | None = flag(None, "a text file of user ids, one a line: only those users")
    top_k: int = flag(20, "titles per user")
    beams: int = flag(20, "beam width (>= --top-k)")
    batch_size: int = flag(8, "users per generation batch on each rank")
    max_history: int | None = flag(100, "most recent history items fed (the training window); 0 keeps all")
    dtype: str = flag("auto", "auto (bfloat16 on GPUs, float32 on CPU), bfloat16, float16 or float32",
                          choices=("auto", "bfloat16", "float16", "float32"))
    exclude_seen: bool = flag(False, "never recommend an item of the user's history (K titles still come back)")
    dist_timeout_s: int = flag(600, "collective timeout")
    layout: dict = section(LayoutSpec, "prompt layout (default: the run's; these flags change it)", overrides=True)

    def check(self) -> None:
        if not self.run:
            raise ValueError("--run is required: a trained run (folder or URL)")
        if not self.output:
            raise ValueError("--output is required: a folder or URL for the recommendations")
        if self.top_k < 1 or self.batch_size < 1:
            raise ValueError("--top-k and --batch-size must be >= 1")
        if self.beams < self.top_k:
            raise ValueError(f"--beams ({self.beams}) must be >= --top-k ({self.top_k})")

    def identity(self, data: str, generation: str) -> dict[str, Any]:
        """What the parts depend on: a part written under another identity is not reused."""
        keep = {k: v for k, v in asdict(self).items() if k in ("run", "users", "top_k", "beams", "max_history", "dtype",
                                                                 "exclude_seen", "layout")}
        return {**keep, "data": data, "generation": generation}


def recommend_users(cfg: RecommendConfig) -> dict[str, Any]:
    """Collective over the launcher's ranks: the top-K titles for every user (or --users) from the
    whole history, as Parquet parts plus recommendations.json (rank 0, last)."""
    import torch.distributed as dist
    from tqdm import tqdm

    from patchrec_dist.train.distributed import init_distributed

    rank, world, device = init_distributed(cfg.dist_timeout_s, deepspeed_comm=False)
    run_cfg = read_run_config(cfg.run)
    data = cfg.data or run_cfg["data"]
    manifest = load_manifest(data)
    wanted = _read_users(cfg.users) if cfg.users else None
    identity = cfg.identity(data, manifest.generation)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    rec = Recommender.from_run(cfg.run, data=data, device=device, dtype=cfg.dtype, beams=cfg.beams,
                               max_history=cfg.max_history or None, layout=cfg.layout)
    mine = [i for i in range(len(manifest.shards)) if i % world == rank]
    parts, present, t0, users_done = [], set(), time.perf_counter(), 0
    bar = tqdm(total=len(mine), unit="part", disable=rank != 0, desc="recommending")
    for shard in mine:
        url = storage.join(cfg.output, f"part-{shard:05d}.parquet")
        found = _part_info(url, key)
        if found is None:
            records = [r for r in read_shard(manifest, shard) if wanted is None or r.user in wanted]
            found = _write_part(url, rec, records, cfg, identity, key)
            users_done += found["users"]
        if wanted is not None:
            present |= _part_users(url)
        parts.append({"path": f"part-{shard:05d}.parquet", **found})
        bar.update(1)
        bar.set_postfix(users_per_s=f"{users_done / max(time.perf_counter() - t0, 1e-9):.1f}")
    bar.close()
    gathered = [(parts, present)]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (parts, present))
    result: dict[str, Any] = {}
    if rank == 0:
        every = sorted((p for ps, _ in gathered for p in ps), key=lambda p: p["path"])
        result = {**identity, "layout": asdict(rec.spec), "parts": every, "users": sum(p["users"] for p in every),
                  "rows": sum(p["rows"] for p in every), "ranks": world, "seconds": round(time.perf_counter() - t0, 1)}
        if wanted is not None:
            result["users_not_found"] = sorted(wanted.difference(*(users for _, users in gathered)))[:100]
        storage.write_bytes_atomic(storage.join(cfg.output, MANIFEST_FILE), (json.dumps(result, indent=1) + "\n").encode())
        print(f"{result['users']:,} users, {result['rows']:,} rows in {len(every)} parts; wrote {cfg.output}")
    if world > 1:
        dist.barrier()
    return result


def _read_users(path: str) -> set[str]:
    users = {line.strip() for line in storage.read_bytes(path).decode().splitlines() if line.strip()}
    if not users:
        raise ValueError(f"--users {path}: no user ids in it")
    return users


def _part_info(url: str, key: str) -> dict[str, Any] | None:
    """A finished part's counts if URL holds one written with KEY; ValueError for another key."""
    if not storage.exists(url):
        return None
    import pyarrow.parquet as pq

    fs, path = storage.filesystem_for(url)
    with fs.open(path, "rb") as f:
        meta = json.loads(pq.read_schema(f).metadata[b"patchrec"])
    if meta["key"] != key:
        raise ValueError(f"{url} was written with other settings ({meta['identity']}); use a new --output")
    return {"users": meta["users"], "rows": meta["rows"]}


def _part_users(url: str) -> set[str]:
    """The users a part holds (its user column)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem_for(url)
    with fs.open(path, "rb") as f:
        return set(pq.read_table(f, columns=["user"])["user"].to_pylist())


def _write_part(url: str, rec: Recommender, records: list, cfg: RecommendConfig, identity: dict[str, Any],
                key: str) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [r for r in records if len(r.items)]
    histories = [[rec.item_ids[i] for i in r.items] for r in records]
    results = rec.recommend_batch(histories, k=cfg.top_k, batch_size=cfg.batch_size, exclude_seen=cfg.exclude_seen)
    rows = [(record.user, k, r.items[0], r.items, r.title, r.score)
            for record, recs in zip(records, results) for k, r in enumerate(recs, start=1)]
    types = {"user": pa.string(), "rank": pa.int16(), "item_id": pa.string(), "items": pa.list_(pa.string()),
             "title": pa.string(), "score": pa.float32()}
    columns = list(zip(*rows)) if rows else [()] * len(types)
    table = pa.table({name: pa.array(list(col), t) for (name, t), col in zip(types.items(), columns)})
    meta = {"key": key, "identity": identity, "users": len(records), "rows": len(rows)}
    table = table.replace_schema_metadata({b"patchrec": json.dumps(meta).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(url, buf.getvalue())
    return {"users": len(records), "rows": len(rows)}


__all__ = ["GenerationModel", "RecommendConfig", "Recommendation", "Recommender", "load_for_generation",
           "recommend_users"]
