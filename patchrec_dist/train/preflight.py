"""Flag and path checks that run before any process group starts.

A bad `--data`, `--init`, `--model` or `--run`, an object store that does not answer, or a resume
the checkpoint would refuse, found here, is one line naming the flag and exit status 2 (the
launchers print it on rank 0 only: `train.signals.run_job`). Found later, it would be a traceback
per rank from inside DeepSpeed's, torch's or huggingface_hub's set-up, minutes into the job.

Each check reads only small files (a manifest, a config.json, a state.json). The later code keeps
its own checks: these are the early copy of the same conditions, not a replacement.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from patchrec_dist.data import storage
from patchrec_dist.data.manifest import DataSetError, Manifest, load_manifest


class FlagError(ValueError):
    """A flag whose value cannot work: the message starts with the flag and its value."""

    def __init__(self, flag: str, value: Any, problem: str) -> None:
        super().__init__(f"{flag} {value}: {problem}")


# huggingface_hub's repo ids: "name" or "org/name" of letters, digits, '-', '_', '.'
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _reach(flag: str, url: str, probe) -> Any:
    """PROBE(), with a store that cannot be reached (DNS, refused connection, credentials) named
    as the flag's problem instead of a botocore or aiohttp traceback."""
    try:
        return probe()
    except (FlagError, DataSetError, FileNotFoundError, RuntimeError):
        raise  # RuntimeError: CheckpointError, the callers' own
    except Exception as exc:  # noqa: BLE001 - every client library raises its own types
        raise FlagError(flag, url, f"cannot read it: {type(exc).__name__}: {exc}") from None


def check_data(url: str, flag: str = "--data") -> Manifest:
    """A data set's manifest at URL (local or any fsspec store)."""
    try:
        return _reach(flag, url, lambda: load_manifest(url))
    except DataSetError as exc:
        raise FlagError(flag, url, str(exc).removeprefix(f"{url}: ")) from None


def check_model_folder(url: str, flag: str) -> None:
    """URL is a run with a final/ export, or an HF model folder (config.json)."""
    def probe() -> bool:
        return (storage.exists(storage.join(url, "final", "config.json"))
                or storage.exists(storage.join(url, "config.json")))

    if storage.is_local(url) and not os.path.exists(url):
        raise FlagError(flag, url, "no such file or folder")
    if not _reach(flag, url, probe):
        raise FlagError(flag, url, "neither a run with a final/ export (final/config.json) nor an HF model "
                                   "folder (config.json)")


def check_model(spec: str, flag: str = "--model") -> None:
    """tiny, smollm2, a .gguf file, an HF model folder (path or URL) or a hub id."""
    if spec in ("tiny", "smollm2"):
        return
    if not storage.is_local(spec):
        check_model_folder(spec, flag)
        return
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FlagError(flag, spec, "no such .gguf file")
        return
    if os.path.exists(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise FlagError(flag, spec, "not an HF model folder (no config.json)")
        return
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise FlagError(flag, spec, "no such file or folder (expected tiny, smollm2, an HF model folder or URL, "
                                    "a .gguf file, or a hub id such as HuggingFaceTB/SmolLM2-135M)")


def check_run(url: str, flag: str = "--run") -> dict[str, Any]:
    """A training run's saved config (and its final/ export)."""
    from patchrec_dist.train.config import RUN_CONFIG_FILE

    if storage.is_local(url) and not os.path.exists(url):
        raise FlagError(flag, url, "no such folder")
    if not _reach(flag, url, lambda: storage.exists(storage.join(url, RUN_CONFIG_FILE))):
        raise FlagError(flag, url, f"no {RUN_CONFIG_FILE} there: not a training run's folder")
    if not _reach(flag, url, lambda: storage.exists(storage.join(url, "final", "config.json"))):
        raise FlagError(flag, url, "the run has no final/ export (it did not finish, or ran with --export false; "
                                   "tools/export_hf.py RUN writes one from its last checkpoint)")
    import json

    try:
        return json.loads(storage.read_bytes(storage.join(url, RUN_CONFIG_FILE)))
    except ValueError as exc:
        raise FlagError(flag, url, f"unreadable {RUN_CONFIG_FILE}: {exc}") from None


def check_resume(cfg: Any) -> None:
    """The checkpoint `--resume` would load, checked as the trainer checks it before loading:
    the same configuration, the same world size (or --universal), the same length and DeepSpeed
    config (or their --*-change flags)."""
    import torch

    from patchrec_dist.train.checkpoint import CheckpointError, CheckpointManager
    from patchrec_dist.train.config import RESUME_NEUTRAL
    from patchrec_dist.train.trainer import check_resume_unchanged, make_ds_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    manager = CheckpointManager(cfg.output, keep_last=cfg.keep_last)
    def resume_state() -> tuple[str | None, dict[str, Any] | None]:
        tag = manager.resolve_resume(cfg.resume)
        return tag, (manager.check_complete(tag) if tag else None)

    try:
        tag, state = _reach("--output", cfg.output, resume_state)
        if tag is None:
            return
        resolved = cfg.bf16 if cfg.bf16 is not None else torch.cuda.is_available()  # as Trainer.setup resolves it
        probe = dataclasses.replace(cfg, bf16=resolved)
        ds_config = make_ds_config(probe, world)
        expect = {"config_hash": probe.hash(ignore=RESUME_NEUTRAL), "config": probe.to_dict(),
                  "ignore": RESUME_NEUTRAL, "check": lambda saved: check_resume_unchanged(saved, probe, ds_config, tag)}
        CheckpointManager.check_compatible(state, expect, world, tag, universal=cfg.universal)
    except CheckpointError as exc:
        raise FlagError("--resume", cfg.resume, f"refused: {exc}") from None


def check_train(cfg: Any) -> None:
    """pretrain.py / finetune.py: data, the starting weights, the DeepSpeed config, the resume."""
    check_data(cfg.data)
    if not os.path.isfile(cfg.ds_config):
        raise FlagError("--ds-config", cfg.ds_config, f"no such file (relative paths start at {os.getcwd()})")
    if cfg.init:
        check_model_folder(cfg.init, "--init")
    else:
        check_model(cfg.model)
    if cfg.resume not in (None, "", "never") and cfg.output:
        check_resume(cfg)


def check_evaluate(cfg: Any) -> None:
    check_data(cfg.data)
    if cfg.run:
        check_run(cfg.run)
    else:
        check_model(cfg.model)


def check_recommend(cfg: Any) -> None:
    run_cfg = check_run(cfg.run)
    check_data(cfg.data or run_cfg.get("data", ""), "--data" if cfg.data else "--data (the run's)")
    if cfg.users and storage.is_local(cfg.users) and not os.path.isfile(cfg.users):
        raise FlagError("--users", cfg.users, "no such file")
