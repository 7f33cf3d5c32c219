"""DeepSpeed checkpoints to a local path or an fsspec URL, with a rank-independent state file.

Layout under the run's output (a local directory or e.g. ``s3://bucket/run``)::

    OUTPUT/checkpoints/
        latest                       text: the tag of the newest complete checkpoint
        step_00000120/               one checkpoint ("tag" = step_%08d)
            zero_pp_rank_0_mp_rank_00_model_states.pt   } DeepSpeed's engine.save_checkpoint
            zero_pp_rank_0_mp_rank_00_optim_states.pt   }  (ZeRO-3: one pair per rank,
            zero_pp_rank_1_mp_rank_00_model_states.pt   }   plus zero_to_fp32.py)
            ...
            rng_rank0.pt, rng_rank1.pt   per-rank RNG states (python, numpy, torch, cuda)
            state.json                   rank-independent training state; written LAST
            universal/, latest_universal only after convert_to_universal()
        zero_to_fp32.py, zero_to_torch.py   DeepSpeed writes these beside the tags, not inside

``latest`` has DeepSpeed's own format (the tag as text), so the directory also works with plain
DeepSpeed tools: ``engine.load_checkpoint(OUTPUT/checkpoints)`` and
``python OUTPUT/checkpoints/zero_to_fp32.py OUTPUT/checkpoints out_dir`` (local copies).

Commit protocol (what makes an interrupted save harmless):

1. rank 0 removes any earlier content of the tag (a re-save replaces it), then all ranks agree;
2. every rank calls ``engine.save_checkpoint`` and writes its RNG file, each file straight to its
   place in the output (:class:`RankFileWriter`: a URL output streams each file into the object
   store as torch serialises it; nothing is staged on local disk, no rank uploads for another);
3. every rank reports the files it wrote and their sizes (one all_gather); rank 0 writes
   ``state.json`` listing the union, then ``latest`` (atomic: temp file + rename locally, a
   single PUT on S3);
4. rank 0 deletes old checkpoints beyond ``keep_last`` (their ``state.json`` first).

A checkpoint is *complete* when its ``state.json`` exists and every file it lists exists with
the listed size. A crash anywhere before step 3 leaves ``latest`` on the previous checkpoint and
the new directory without ``state.json``, i.e. incomplete, never loaded and pruned later.

Loading reads only what a rank needs (:func:`read_by_rank`): under ZeRO-3 each rank fetches its
own partition files (and its RNG file) from a URL output into its own staging folder, in
parallel with the others; the rank-independent state is read once, by rank 0. Staging lives
under the ``staging_dir`` argument, else ``$PATCHREC_STAGING``, else
``<system temp>/patchrec_dist-staging``. A universal checkpoint (every rank reads every
parameter's fp32 file) is downloaded once per node instead.

Collectives. :meth:`CheckpointManager.save`, :meth:`~CheckpointManager.load`,
:meth:`~CheckpointManager.resolve_resume` and :meth:`~CheckpointManager.convert_to_universal`
must be called on every rank (same arguments) once ``torch.distributed`` is initialised: rank 0
decides (reads ``latest``/``state.json``) and broadcasts, so all ranks agree and all ranks
raise the same :class:`CheckpointError`. Without a process group they run locally.

World-size changes. ZeRO's optimizer state is partitioned per rank; DeepSpeed refuses to
load it with a different data-parallel size. :meth:`~CheckpointManager.load` refuses with a
message pointing at ``--universal``; with ``universal=True`` it converts the checkpoint with
DeepSpeed's ``ds_to_universal`` (once; result kept under ``<tag>/universal``) and loads that with
the ``"checkpoint": {"load_universal": true}`` behaviour switched on for the call.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import posixpath
import random
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar

import torch

from patchrec_dist.data.storage import (
    download_files,
    file_infos,
    filesystem_for,
    is_local,
    join,
    read_bytes,
    remove,
    with_retries,
    write_bytes_atomic,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "state.json"
UNIVERSAL_DIR = "universal"
UNIVERSAL_MARKER = "latest_universal"  # ds_to_universal writes it beside its output folder, last
RNG_FILE = "rng_rank{rank}.pt"
STATE_FORMAT = 1
TAG_RE = re.compile(r"^step_(\d{8,})$")
_TOKENS_DIR = ".ranks"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, incomplete, incompatible); names the path."""


# ---------------------------------------------------------------------------------------------
# tags and config hashes
def tag_for_step(step: int) -> str:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{int(step):08d}"


def step_of_tag(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def _normalise(obj: Any) -> Any:
    """JSON-normalised copy: dict keys as str, tuples/sets as lists, other objects via str()."""

    def default(o):
        if isinstance(o, (set, frozenset)):
            return sorted(o, key=repr)
        return str(o)

    return json.loads(json.dumps(obj, sort_keys=True, default=default))


def _drop_keys(config: Any, ignore: Iterable[str]) -> Any:
    """Copy of CONFIG without the (dotted) keys in IGNORE: "lr" drops a top-level key,
    "optimizer.params.lr" a nested one."""
    out = _normalise(config)
    for key in ignore:
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return out


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], ignore: Iterable[str] = frozenset()) -> list[str]:
    """Dotted keys whose values differ between A and B (after dropping IGNORE)."""
    out: list[str] = []

    def walk(x, y, prefix):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k, _MISSING), y.get(k, _MISSING), f"{prefix}{k}.")
        elif x != y:
            out.append(prefix[:-1] or "<root>")

    walk(_drop_keys(a, ignore), _drop_keys(b, ignore), "")
    return out


_MISSING = object()


def _json_path_of_bad_value(obj: Any, path: str = "state") -> str | None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                return f"{path}[{k!r}] (non-string key)"
            found = _json_path_of_bad_value(v, f"{path}[{k!r}]")
            if found:
                return found
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = _json_path_of_bad_value(v, f"{path}[{i}]")
            if found:
                return found
        return None
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return None
    return f"{path} ({type(obj).__name__})"


# ---------------------------------------------------------------------------------------------
# torch.distributed helpers (all no-ops without a process group)
def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def _world() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def _barrier() -> None:
    d = _dist()
    if d and d.get_world_size() > 1:
        d.barrier()


def _broadcast(obj: Any) -> Any:
    """Rank 0's OBJ on every rank."""
    d = _dist()
    if not d or d.get_world_size() == 1:
        return obj
    box = [obj if d.get_rank() == 0 else None]
    d.broadcast_object_list(box, src=0)
    return box[0]


def _on_rank0(fn: Callable[[], T]) -> T:
    """Run FN on rank 0 and broadcast its result; an exception on rank 0 is raised on every rank
    (rank 0 re-raises the original, the others a CheckpointError with its message)."""
    d = _dist()
    if not d or d.get_world_size() == 1:
        return fn()
    error: BaseException | None = None
    payload: tuple[str, Any] | None = None
    if d.get_rank() == 0:
        try:
            payload = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            error = exc
            msg = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
            payload = ("error", msg)
    kind, value = _broadcast(payload)
    if kind == "ok":
        return value
    if error is not None:
        raise error
    raise CheckpointError(value)


def _elect(directory: str) -> bool:
    """Collective. True on exactly one rank among those that see the same local DIRECTORY.

    Every rank drops a token file; after a barrier the lowest rank whose token it can see is
    elected. Ranks of one node share a node-local dir; on a shared filesystem all ranks do.
    """
    rank = _rank()
    tokens = os.path.join(directory, _TOKENS_DIR)
    os.makedirs(tokens, exist_ok=True)
    with open(os.path.join(tokens, str(rank)), "w") as f:
        f.write(str(os.getpid()))
    _barrier()
    seen = sorted(int(n) for n in os.listdir(tokens) if n.isdigit())
    return bool(seen) and seen[0] == rank


# ---------------------------------------------------------------------------------------------
# RNG state
def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
class Stateful(Protocol):
    """What a component registers with the checkpoint manager (torchtitan's contract): a
    JSON-serialisable, rank-independent state and the way back to it."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class CheckpointManager:
    """Save/load DeepSpeed checkpoints under ``OUTPUT/checkpoints`` (local dir or fsspec URL).

    ``keep_last``: complete checkpoints to keep (older ones are deleted after ``latest`` moved).
    ``storage_options``: extra fsspec options for a URL output (the S3 endpoint and credentials
    come from the environment, see :mod:`patchrec_dist.data.storage`).
    ``staging_dir``: local directory for staging remote checkpoints (default
    ``$PATCHREC_STAGING`` or ``<tmp>/patchrec_dist-staging``); must be the same path on all ranks
    of a node, which it is by default.
    ``universal_workers``: worker processes for ``ds_to_universal`` (1 = in-process; forking a
    process that holds a process group is best avoided).

    ``after_engine_save``: optional ``fn(rank, tag)`` called right after this rank's
    ``engine.save_checkpoint`` returned, before the commit barrier (a test hook for crashes
    mid-save; also usable for timing).
    """

    def __init__(
        self,
        output: str,
        keep_last: int = 2,
        storage_options: dict[str, Any] | None = None,
        staging_dir: str | None = None,
        universal_workers: int = 1,
    ):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        output = str(output)
        self.output = output.rstrip("/") if "://" in output else os.path.abspath(output)
        self.root = join(self.output, CHECKPOINTS_DIR)
        self.remote = not is_local(self.output)
        self.keep_last = keep_last
        self.storage_options = storage_options
        base = staging_dir or os.environ.get("PATCHREC_STAGING") or os.path.join(
            tempfile.gettempdir(), "patchrec_dist-staging"
        )
        self.staging = os.path.join(os.path.abspath(base), hashlib.sha1(self.output.encode()).hexdigest()[:16])
        self.universal_workers = universal_workers
        self.after_engine_save: Callable[[int, str], None] | None = None
        self._current_tag: str | None = None  # the checkpoint the engine's state equals (saved or loaded)
        self._components: dict[str, Stateful] = {}

    def register(self, name: str, component: Stateful) -> None:
        """COMPONENT's state_dict() goes into every checkpoint's state.json under NAME, and a load
        gives it back through load_state_dict(), before load() returns. Register once, before
        the first save or load."""
        if name in self._components or name in ("step", "tag", "world_size", "checkpoint"):
            raise ValueError(f"checkpoint state {name!r} is taken")
        self._components[name] = component

    # -- paths and small I/O ----------------------------------------------------------------
    def _fs(self, url: str):
        return filesystem_for(url, self.storage_options)

    def tag_url(self, tag: str) -> str:
        return join(self.root, tag)

    def _resolve_ref(self, ref: str) -> str:
        """A tag ("step_00000120") or a checkpoint dir (path or URL) -> checkpoint dir URL."""
        if TAG_RE.match(ref):
            return self.tag_url(ref)
        if "://" in ref:
            return ref.rstrip("/")
        return os.path.abspath(ref)

    def _exists(self, url: str) -> bool:
        fs, path = self._fs(url)
        fs.invalidate_cache()
        return with_retries(lambda: fs.exists(path), f"checking {url}")

    def _read_text(self, url: str) -> str | None:
        try:
            return read_bytes(url, self.storage_options).decode().strip()
        except FileNotFoundError:
            return None

    def _files_with_sizes(self, url: str) -> dict[str, int]:
        """{relative path: size} of every file below URL; {} if it does not exist."""
        return {rel: int(info.get("size") or 0) for rel, info in file_infos(url, self.storage_options).items()}

    def _list_tags(self) -> list[str]:
        """Tag directories under checkpoints/, sorted by step (complete or not)."""
        fs, path = self._fs(self.root)
        fs.invalidate_cache()
        try:
            names = with_retries(lambda: fs.ls(path, detail=False), f"listing {self.root}")
        except FileNotFoundError:
            return []
        tags = {posixpath.basename(str(n).rstrip("/")) for n in names}
        return sorted((t for t in tags if TAG_RE.match(t)), key=lambda t: step_of_tag(t) or 0)

    def read_state(self, ckpt: str) -> dict[str, Any]:
        """The state.json of a checkpoint (tag or dir); CheckpointError if there is none."""
        url = self._resolve_ref(ckpt)
        raw = self._read_text(join(url, STATE_FILE))
        if raw is None:
            raise CheckpointError(f"no {STATE_FILE} in {url}: not a complete checkpoint")
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{join(url, STATE_FILE)} is not valid JSON: {exc}") from exc

    def check_complete(self, ckpt: str) -> dict[str, Any]:
        """The checkpoint's state if it is complete, else CheckpointError saying what is missing."""
        url = self._resolve_ref(ckpt)
        state = self.read_state(url)
        expected = state.get("checkpoint", {}).get("files")
        if not expected:
            raise CheckpointError(f"{join(url, STATE_FILE)} lists no files: not written by CheckpointManager?")
        present = self._files_with_sizes(url)
        missing = [f for f in expected if f not in present]
        wrong = [f for f, size in expected.items() if f in present and present[f] != size]
        if missing or wrong:
            raise CheckpointError(
                f"checkpoint {url} is incomplete: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"size mismatch {wrong[:5]}"
            )
        return state

    def is_complete(self, ckpt: str) -> bool:
        try:
            self.check_complete(ckpt)
            return True
        except CheckpointError:
            return False

    def complete_tags(self) -> list[str]:
        """Tags of the complete checkpoints, oldest first."""
        return [t for t in self._list_tags() if self.is_complete(t)]

    def latest_tag(self) -> str | None:
        """Tag of the newest complete checkpoint: the one ``latest`` names if it is complete,
        else the highest complete step (``latest`` can name a checkpoint a crashed re-save
        removed). None if there is none. Not collective."""
        tag = self._read_text(join(self.root, LATEST_FILE))
        if tag and self.is_complete(tag):
            return tag
        tags = self.complete_tags()
        if tag:
            log.warning("%s names %s, which is not complete; using %s", join(self.root, LATEST_FILE), tag,
                        tags[-1] if tags else None)
        return tags[-1] if tags else None

    # -- resume -----------------------------------------------------------------------------
    def resolve_resume(self, resume: str | None) -> str | None:
        """``--resume`` semantics; returns a checkpoint dir (path or URL) or None. Collective.

        ``auto``: newest complete checkpoint of this output, or None (start from scratch).
        ``never`` (or None/""): None.
        anything else: a checkpoint dir (``.../checkpoints/step_00000120``, local or URL), a tag
        of this output, or another run's output dir (its newest complete checkpoint);
        CheckpointError if it is missing or incomplete.
        """
        if resume in (None, "", "never"):
            return None
        if resume == "auto":
            return _on_rank0(lambda: (lambda t: self.tag_url(t) if t else None)(self.latest_tag()))
        return _on_rank0(lambda: self._resolve_path(str(resume)))

    def _resolve_path(self, ref: str) -> str:
        url = self._resolve_ref(ref)
        if self._exists(join(url, STATE_FILE)):
            self.check_complete(url)
            return url
        if self._exists(join(url, CHECKPOINTS_DIR)):  # an output dir
            other = CheckpointManager(url, storage_options=self.storage_options)
            tag = other.latest_tag()
            if tag is None:
                raise CheckpointError(f"--resume {ref}: no complete checkpoint under {other.root}")
            return other.tag_url(tag)
        if self._exists(url):
            raise CheckpointError(
                f"--resume {ref}: {url} has no {STATE_FILE}: the save was interrupted (incomplete "
                "checkpoint) or it is not a checkpoint directory"
            )
        raise CheckpointError(f"--resume {ref}: no checkpoint at {url}")

    # -- compatibility ----------------------------------------------------------------------
    @staticmethod
    def check_compatible(
        state: Mapping[str, Any],
        expect: Mapping[str, Any] | None,
        world_size: int,
        where: str,
        universal: bool = False,
    ) -> None:
        """Raise CheckpointError if STATE (a checkpoint's state.json) cannot be resumed here.

        EXPECT may hold ``config_hash`` (compared with the saved one; the trainer hashes its
        config with ``TrainConfig.hash`` minus the resume-neutral fields),
        ``config`` and ``ignore`` (only to name the differing keys in the message),
        ``world_size`` (overrides WORLD_SIZE), and ``check``: the caller's own condition on STATE
        (a callable that raises CheckpointError), run like the others before anything is loaded.
        """
        expect = dict(expect or {})
        want = expect.get("config_hash")
        if want is not None and state.get("config_hash") != want:
            detail = ""
            if isinstance(expect.get("config"), Mapping) and isinstance(state.get("config"), Mapping):
                keys = config_diff(state["config"], expect["config"], expect.get("ignore", ()))
                detail = f"; differing keys: {', '.join(keys[:20]) or '(none outside the ignored ones)'}"
            raise CheckpointError(
                f"checkpoint {where} was saved with a different configuration (config_hash "
                f"{str(state.get('config_hash'))[:12]} != {str(want)[:12]}){detail}. Use a new output "
                "directory or --resume never to start over, or restore the original configuration."
            )
        world = int(expect.get("world_size", world_size))
        saved = state.get("world_size")
        if saved is None:
            raise CheckpointError(f"checkpoint {where}: {STATE_FILE} has no world_size")
        if int(saved) != world and not universal:
            raise CheckpointError(
                f"checkpoint {where} was saved by {saved} ranks but this job has {world}: ZeRO's "
                "optimizer state is partitioned per rank and cannot be loaded directly with another "
                f"world size. Resume with --universal (converts it once with DeepSpeed's ds_to_universal "
                f"and loads the universal checkpoint) or run with {saved} ranks."
            )
        check = expect.get("check")
        if check is not None:
            check(state)

    # -- save -------------------------------------------------------------------------------
    def save(self, engine, step: int, state: Mapping[str, Any] | None = None) -> str:
        """Collective: save a checkpoint of ENGINE at STEP with the registered components' states
        and the caller's rank-independent STATE (JSON-serialisable: the resolved config and its
        ``config_hash``, what a resume is checked against). Adds ``step``, ``tag``, ``world_size``
        and bookkeeping. Returns the tag. Every rank must call it with the same step."""
        tag = tag_for_step(step)
        if tag == self._current_tag:  # the engine already equals that checkpoint (just saved/loaded)
            log.info("checkpoint %s already saved; not saving it again", tag)
            return tag
        rank, world = _rank(), _world()
        record = dict(state or {})
        record.update({name: c.state_dict() for name, c in self._components.items()})
        record.update(step=int(step), tag=tag, world_size=world)
        bad = _json_path_of_bad_value(record)
        if bad:
            raise CheckpointError(f"checkpoint state must be JSON-serialisable; {bad} is not")
        t0 = time.monotonic()
        ckpt_url = self.tag_url(tag)

        # 1. a re-save replaces the tag: rank 0 removes what is there, everyone agrees on a nonce
        def clear() -> str:
            if self._exists(ckpt_url):
                remove(join(ckpt_url, STATE_FILE), self.storage_options)
                remove(ckpt_url, self.storage_options, recursive=True)
            return uuid.uuid4().hex[:12]

        nonce = _on_rank0(clear)
        # DeepSpeed names files by local paths: a remote output's are this rank's own mirror of
        # checkpoints/, and the writer streams each file to the same place under the URL instead
        local_root = os.path.join(self.staging, f"save-{tag}-{nonce}", f"rank{rank}") if self.remote else self.root
        os.makedirs(os.path.join(local_root, tag), exist_ok=True)

        # 2. every rank writes its own files (DeepSpeed's and its RNG state) straight to the output
        writer = RankFileWriter(local_root, self.root if self.remote else None, self.storage_options)
        writer.save_engine(engine, tag)
        writer.save(_rng_state(), os.path.join(local_root, tag, RNG_FILE.format(rank=rank)))
        if self.remote and rank == 0:  # DeepSpeed copies zero_to_fp32.py & co. beside the tags
            for name in os.listdir(local_root):
                if os.path.isfile(os.path.join(local_root, name)):
                    writer.upload(os.path.join(local_root, name))
        if self.after_engine_save is not None:
            self.after_engine_save(rank, tag)
        files = _gather_files(writer.written(tag))  # every rank reports what it wrote, and its size

        # 3. commit: state.json (the union of the reports), then latest; 4. prune
        def commit() -> None:
            record["checkpoint"] = {
                "format": STATE_FORMAT,
                "files": files,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "deepspeed": _version("deepspeed"),
                "torch": torch.__version__,
            }
            data = json.dumps(record, indent=1, sort_keys=True).encode()
            write_bytes_atomic(join(ckpt_url, STATE_FILE), data, self.storage_options)
            write_bytes_atomic(join(self.root, LATEST_FILE), tag.encode() + b"\n", self.storage_options)
            self._prune(tag)

        _on_rank0(commit)
        if self.remote:
            shutil.rmtree(os.path.dirname(local_root), ignore_errors=True)
        self._current_tag = tag
        if rank == 0:
            log.info("saved checkpoint %s (%.2f GB) in %.1f s", ckpt_url, sum(files.values()) / 1e9,
                     time.monotonic() - t0)
        return tag

    def _upload_dir(self, local_dir: str, url: str) -> None:
        fs, path = self._fs(url)
        for dirpath, dirnames, filenames in os.walk(local_dir):
            dirnames[:] = [d for d in dirnames if d != _TOKENS_DIR]
            for name in filenames:
                if ".tmp-" in name:
                    continue
                src = os.path.join(dirpath, name)
                rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
                dst = posixpath.join(path, rel)
                with_retries(lambda s=src, d=dst: fs.put_file(s, d), f"uploading {src} to {url}")

    def _download_dir(self, url: str, local_dir: str, skip: Callable[[str], bool] = lambda rel: False) -> None:
        rels = [rel for rel in self._files_with_sizes(url) if not skip(rel)]
        download_files(url, rels, local_dir, self.storage_options)

    def _prune(self, current: str) -> None:
        """Rank 0: keep the newest ``keep_last`` complete checkpoints up to CURRENT; delete older
        complete ones, incomplete leftovers before CURRENT, and checkpoints after CURRENT (an
        abandoned timeline: this run resumed from an earlier checkpoint)."""
        cur = step_of_tag(current) or 0
        keep: list[str] = []
        for tag in reversed(self._list_tags()):
            step = step_of_tag(tag) or 0
            if tag == current:
                keep.append(tag)
                continue
            if step > cur:
                log.warning("deleting checkpoint %s: newer than %s, from an abandoned run", tag, current)
            elif self._exists(join(self.tag_url(tag), STATE_FILE)):
                if len(keep) < self.keep_last:
                    keep.append(tag)
                    continue
            self._delete(tag)

    def _delete(self, tag: str) -> None:
        url = self.tag_url(tag)
        remove(join(url, STATE_FILE), self.storage_options)  # first: it is no longer complete
        remove(url, self.storage_options, recursive=True)
        if not self.remote:
            shutil.rmtree(url, ignore_errors=True)

    # -- load -------------------------------------------------------------------------------
    def load(
        self,
        engine,
        tag: str | None = None,
        expect: Mapping[str, Any] | None = None,
        universal: bool = False,
        load_optimizer_states: bool = True,
    ) -> dict[str, Any] | None:
        """Collective: restore ENGINE (module, optimizer, scheduler), this rank's RNG states and
        every registered component from a checkpoint; return its saved state dict, or None when
        TAG is None and this output has no complete checkpoint.

        TAG: None (newest complete checkpoint of this output), a tag, or a checkpoint dir (path
        or URL, e.g. from :meth:`resolve_resume`). EXPECT: see :meth:`check_compatible`.
        UNIVERSAL: load through a DeepSpeed universal checkpoint (converting first if needed),
        which allows a different world size.
        """

        def locate():
            if tag is None:
                latest = self.latest_tag()
                if latest is None:
                    return None
                url = self.tag_url(latest)
            else:
                url = self._resolve_ref(tag)
            return url, self.check_complete(url)

        found = _on_rank0(locate)
        if found is None:
            return None
        url, state = found
        self.check_compatible(state, expect, _world(), url, universal=universal)
        missing = [n for n in self._components if n not in state]
        if missing:  # before anything is loaded
            raise CheckpointError(f"checkpoint {url}: {STATE_FILE} has no state for {', '.join(missing)}")
        if universal and not self._universal_ready(url):
            self.convert_to_universal(url)

        name = posixpath.basename(url.rstrip("/"))
        if is_local(url):
            local_ckpt, staged = url, None
        elif universal:  # every rank reads every parameter's fp32 file: one download per node
            staged = os.path.join(self.staging, f"load-{name}-{_broadcast(uuid.uuid4().hex[:12])}")
            local_ckpt = os.path.join(staged, name)
            os.makedirs(local_ckpt, exist_ok=True)
            if _elect(staged):
                self._download_dir(url, local_ckpt, skip=lambda rel: not _needed_for_load(rel, universal))
            _barrier()
        else:  # each rank fetches only the files it reads (its own ZeRO partition), in parallel
            staged = os.path.join(self.staging, f"load-{name}-{_broadcast(uuid.uuid4().hex[:12])}", f"rank{_rank()}")
            local_ckpt = os.path.join(staged, name)
            os.makedirs(local_ckpt, exist_ok=True)
            every_partition = bool(getattr(engine, "zero_elastic_checkpoint", lambda: False)())
            rels = [rel for rel in state["checkpoint"]["files"] if read_by_rank(rel, _rank(), every_partition)]
            download_files(url, rels, local_ckpt, self.storage_options)

        if universal:
            load_dir, load_tag = local_ckpt, UNIVERSAL_DIR
        else:
            load_dir, load_tag = os.path.dirname(local_ckpt), name
        cfg = engine._config
        old_universal = getattr(cfg, "load_universal_checkpoint", False)
        cfg.load_universal_checkpoint = bool(universal)
        try:
            load_path, _ = engine.load_checkpoint(
                load_dir,
                tag=load_tag,
                load_module_strict=True,
                load_optimizer_states=load_optimizer_states,
                load_lr_scheduler_states=True,
            )
        finally:
            cfg.load_universal_checkpoint = old_universal
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint files to load in {url}")

        rank = _rank()
        rng_path = os.path.join(local_ckpt, RNG_FILE.format(rank=rank))
        if os.path.exists(rng_path):
            _set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=False))
        else:
            log.warning("no RNG state for rank %d in %s (saved by %s ranks); RNG not restored",
                        rank, url, state.get("world_size"))
        _barrier()
        if staged is not None:
            shutil.rmtree(staged if universal else os.path.dirname(staged), ignore_errors=True)
        for component_name, component in self._components.items():
            component.load_state_dict(state[component_name])
        self._current_tag = name if url == self.tag_url(name) else None
        return state

    # -- universal checkpoints --------------------------------------------------------------
    def _universal_ready(self, url: str) -> bool:
        return _on_rank0(lambda: self._exists(join(url, UNIVERSAL_MARKER)))

    def convert_to_universal(self, ckpt: str) -> str:
        """Convert a complete checkpoint (tag or dir) with DeepSpeed's ``ds_to_universal`` into
        ``<ckpt>/universal`` (+ marker ``<ckpt>/latest_universal``, written last); returns the
        universal dir's URL. Collective when a process group exists: rank 0 converts (a remote
        checkpoint is downloaded to staging, converted, uploaded) while the others poll the output
        for the marker, not in a collective, whose timeout a large model's conversion outlasts.
        Also callable offline in a single process (convert once before a large resume)."""
        url = self._resolve_ref(ckpt)

        def work() -> str:
            self.check_complete(url)
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            t0 = time.monotonic()
            remove(join(url, UNIVERSAL_MARKER), self.storage_options)
            remove(join(url, UNIVERSAL_DIR), self.storage_options, recursive=True)
            if is_local(url):
                local_ckpt, staged = url, None
                shutil.rmtree(os.path.join(url, UNIVERSAL_DIR), ignore_errors=True)
            else:
                staged = os.path.join(self.staging, f"convert-{uuid.uuid4().hex[:12]}")
                local_ckpt = os.path.join(staged, posixpath.basename(url))
                self._download_dir(url, local_ckpt, skip=lambda rel: rel.startswith(UNIVERSAL_DIR + "/"))
            args = argparse.Namespace(
                input_folder=local_ckpt,
                output_folder=os.path.join(local_ckpt, UNIVERSAL_DIR),
                num_extract_workers=self.universal_workers,
                num_merge_workers=self.universal_workers,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=False,
            )
            ds_to_universal(args)  # writes local_ckpt/latest_universal last
            if staged is not None:
                self._upload_dir(os.path.join(local_ckpt, UNIVERSAL_DIR), join(url, UNIVERSAL_DIR))
                fs, path = self._fs(url)
                with_retries(lambda: fs.put_file(os.path.join(local_ckpt, UNIVERSAL_MARKER),
                                                 posixpath.join(path, UNIVERSAL_MARKER)), f"uploading to {url}")
                shutil.rmtree(staged, ignore_errors=True)
            log.info("converted %s to a universal checkpoint in %.1f s", url, time.monotonic() - t0)
            return join(url, UNIVERSAL_DIR)

        marker = join(url, UNIVERSAL_MARKER)
        self._rank0_while_others_poll(work, lambda: self._exists(marker), join(url, ".universal-failed"))
        return join(url, UNIVERSAL_DIR)

    def _rank0_while_others_poll(self, work: Callable[[], Any], done: Callable[[], bool], failed_url: str,
                                 poll_s: float = 2.0) -> None:
        """Rank 0 runs WORK, long single-handed work that publishes its result in the output; the
        other ranks poll DONE instead of waiting in a collective, whose timeout (--dist-timeout-s)
        the work may outlast. A failure on rank 0 is written to FAILED_URL (unique per call), so
        they raise too; a dead rank 0 ends the job through the launcher."""
        d = _dist()
        if not d or d.get_world_size() == 1:
            work()
            return
        failed_url = f"{failed_url}-{_broadcast(uuid.uuid4().hex[:12])}"
        if d.get_rank() == 0:
            try:
                work()
            except Exception as exc:
                write_bytes_atomic(failed_url, f"{type(exc).__name__}: {exc}".encode(), self.storage_options)
                raise
            return
        while not done():
            error = self._read_text(failed_url)
            if error is not None:
                raise CheckpointError(f"rank 0 failed: {error}")
            time.sleep(poll_s)


class RankFileWriter:
    """Writes one rank's checkpoint files to their place in the output and records their sizes.

    DeepSpeed writes every file through ``engine.checkpoint_engine.save(state_dict, path)``; for
    the duration of one save the engine's checkpoint engine is wrapped so that a path under
    LOCAL_ROOT goes to the same place under URL_ROOT instead (a remote output: torch.save
    streams into the fsspec file, which uploads it in parts, so no local copy and no second
    pass) or stays where it is (a local output: the wrapped engine writes it as before)."""

    def __init__(self, local_root: str, url_root: str | None, storage_options: dict[str, Any] | None = None):
        self.local_root, self.url_root, self.storage_options = local_root, url_root, storage_options
        self._sizes: dict[str, int] = {}

    def _target(self, path: str) -> str:
        rel = os.path.relpath(path, self.local_root).replace(os.sep, "/")
        if rel.startswith("../"):
            raise CheckpointError(f"DeepSpeed wrote {path}, outside the checkpoint folder {self.local_root}")
        return posixpath.join(self.url_root, rel) if self.url_root else path

    def save(self, obj: Any, path: str, save_local: Callable[[Any, str], None] | None = None) -> None:
        """torch.save OBJ as PATH (a path under LOCAL_ROOT); SAVE_LOCAL writes it for a local output."""
        target = self._target(path)
        if self.url_root is None:
            if save_local is not None:
                save_local(obj, path)
            else:  # our own files are atomic (DeepSpeed's are covered by state.json, written last)
                torch.save(obj, f"{path}.tmp-{os.getpid()}")
                os.replace(f"{path}.tmp-{os.getpid()}", path)
            size = os.path.getsize(path)
        else:
            fs, fs_path = filesystem_for(target, self.storage_options)

            def stream() -> int:
                with fs.open(fs_path, "wb") as f:
                    torch.save(obj, f)
                    return f.tell()

            size = with_retries(stream, f"writing {target}")
        self._sizes[os.path.relpath(path, self.local_root).replace(os.sep, "/")] = int(size)

    def upload(self, path: str) -> None:
        """A file that DeepSpeed copied into LOCAL_ROOT by itself (not through its checkpoint engine)."""
        fs, fs_path = filesystem_for(self._target(path), self.storage_options)
        with_retries(lambda: fs.put_file(path, fs_path), f"uploading {path}")

    def save_engine(self, engine: Any, tag: str) -> None:
        """ENGINE.save_checkpoint(LOCAL_ROOT, tag) with every file going through this writer."""
        inner = engine.checkpoint_engine
        engine.checkpoint_engine = _CheckpointEngineThrough(self, inner)
        try:
            engine.save_checkpoint(self.local_root, tag=tag, client_state={}, save_latest=False)
        finally:
            engine.checkpoint_engine = inner

    def written(self, tag: str) -> dict[str, int]:
        """{path relative to the checkpoint folder: bytes} of the files this rank wrote into TAG."""
        prefix = tag + "/"
        return {rel[len(prefix):]: n for rel, n in self._sizes.items() if rel.startswith(prefix)}


class _CheckpointEngineThrough:
    """DeepSpeed's checkpoint-engine interface, with ``save`` going through a RankFileWriter and
    the rest (create, makedirs, commit, load) left to the engine it wraps. Not decoupled: a
    file is written when ``save`` returns, so the commit that follows the save may list it."""

    def __init__(self, writer: RankFileWriter, inner: Any):
        self._writer, self._inner = writer, inner

    def save(self, state_dict: Any, path: str) -> None:
        self._writer.save(state_dict, path, save_local=self._inner.save)

    def is_decoupled(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _gather_files(mine: dict[str, int]) -> dict[str, int]:
    """Collective: the union of every rank's {file: size} report (each rank names its own files)."""
    d = _dist()
    if not d or d.get_world_size() == 1:
        return dict(mine)
    reports: list[Any] = [None] * d.get_world_size()
    d.all_gather_object(reports, mine)
    return {rel: size for report in reports for rel, size in report.items()}


_PARTITION_RE = re.compile(r"zero_pp_rank_(\d+)_")


def read_by_rank(rel: str, rank: int, every_partition: bool = False) -> bool:
    """Whether RANK's engine.load_checkpoint reads file REL of a (non-universal) checkpoint.

    DeepSpeed's ZeRO-3 load opens only the rank's own ``zero_pp_rank_<rank>_*`` files (model
    states and optimizer partition); ZeRO-1/2's model file (``mp_rank_00_model_states.pt``) is
    read by all; an elastic ZeRO-1/2 checkpoint reads every rank's optimizer partition."""
    if rel == STATE_FILE or rel.startswith(UNIVERSAL_DIR + "/") or rel == UNIVERSAL_MARKER:
        return False
    if rel.startswith("rng_rank"):
        return rel == RNG_FILE.format(rank=rank)
    m = _PARTITION_RE.search(rel)
    return m is None or every_partition or int(m.group(1)) == rank


def _needed_for_load(rel: str, universal: bool) -> bool:
    """Which files of a checkpoint a load needs: the universal tree or DeepSpeed's own files."""
    if rel == STATE_FILE or rel.startswith("rng_rank"):
        return True
    in_universal = rel.startswith(UNIVERSAL_DIR + "/") or rel == UNIVERSAL_MARKER
    return in_universal == universal


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001
        return None


__all__ = [
    "CHECKPOINTS_DIR",
    "LATEST_FILE",
    "STATE_FILE",
    "CheckpointError",
    "CheckpointManager",
    "RankFileWriter",
    "config_diff",
    "read_by_rank",
    "step_of_tag",
    "tag_for_step",
]
