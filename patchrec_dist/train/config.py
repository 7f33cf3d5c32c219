"""Training configuration: one dataclass, one override syntax.

Every field is a flag (`--micro-batch 8` for `micro_batch`); `--config run.yaml` (or .json) sets
any of them first, and flags on the command line win. The resolved config is saved beside every
checkpoint; its hash (over the fields that change what a checkpoint means) guards resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from patchrec_dist.monitor.profile import parse_profile_steps
from patchrec_dist.patching.layouts import LayoutSpec

ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")


def flag(default: Any, help: str, **kw: Any) -> Any:
    """A config field that is also a command-line flag: its default, its --help text, argparse extras
    (choices). Every config dataclass (training, evaluation, recommendation, baselines, demo) uses it."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def section(cls: type, help: str, overrides: bool = False) -> Any:
    """A config field holding a whole dataclass (the `layout` section): its fields are flags of
    the config's command line under their own names, and a nested mapping (or those flat keys) in
    a --config file. OVERRIDES: the field is a dict of only the values given (evaluation and
    recommendation start from the run's own layout and change what the flags say)."""
    return field(default_factory=dict if overrides else cls,
                 metadata={"help": help, "section": cls, "overrides": overrides})


@dataclass
class TrainConfig:
    # data
    data: str = flag("", "data set folder or URL (the folder with manifest.json)")
    split: str = flag("train", "split to train on")
    max_history: int | None = flag(100, "most recent history items per example (the paper: 100); 0 keeps all")
    num_workers: int = flag(2, "DataLoader workers per rank (patching runs there)")
    window_shards: int = flag(2, "shards shuffled together (the shuffle buffer)")
    prompt_file: str | None = flag(None, "two-line prompt file (system, instruction); default: the data set's")
    domain: str | None = flag(None, "movie or book: the paper's prompt for that domain")
    # model
    model: str = flag("tiny", "HF folder or hub id, a .gguf file, 'smollm2' or 'tiny' (random, for tests)")
    init: str | None = flag(None, "start from a previous run (its final export) or an HF folder; a path or URL")
    tiny_hidden: int = flag(64, "tiny model: hidden size")
    tiny_layers: int = flag(2, "tiny model: layers")
    tiny_vocab: int = flag(1024, "tiny model: tokenizer vocabulary trained on the catalog titles")
    lora: bool = flag(False, "train LoRA adapters (peft) instead of all weights")
    lora_rank: int = flag(8, "LoRA rank")
    lora_alpha: int = flag(16, "LoRA alpha")
    lora_targets: str = flag("q_proj,k_proj,v_proj,o_proj", "comma-separated module names for LoRA")
    bf16: bool | None = flag(None, "bf16 weights and activations (default: on with CUDA, off on CPU)")
    attn_implementation: str = flag("sdpa", "attention kernel: sdpa, flash_attention_2 (needs flash-attn) or eager",
                                  choices=ATTN_IMPLEMENTATIONS)
    grad_checkpointing: bool = flag(False, "recompute activations in backward")
    packing: bool | None = flag(None, "pack each micro-batch's examples into one row, attention kept within each "
                                "example (no padded position computed; the same loss and gradients as padding). "
                                "Default: on for CPU ranks and flash_attention_2, off on CUDA with sdpa (its "
                                "per-example loop ran 2.6x slower than padding on an H200)")
    # the prompt layout: --stage, --group-size, --item-len, ... (patching/layouts.py: LayoutSpec)
    layout: LayoutSpec = section(LayoutSpec, "prompt layout")
    ppt_schedule: str = flag("linear", "ppt: p over training (linear, cosine, constant)")
    ppt_p_max: float = flag(1.0, "ppt: the largest patch probability")
    ppt_pair_text: bool = flag(True, "ppt: also train each example all-text in the same batch")
    # optimisation
    max_steps: int = flag(0, "optimizer steps (0: --epochs over the data)")
    epochs: float = flag(1.0, "passes over the split when --max-steps is 0")
    schedule_change: str = flag("refuse", "a resume with other --max-steps/--epochs: refuse, or stretch the LR and "
                              "PPT schedules over the new length from the resumed step",
                              choices=("refuse", "stretch"))
    ds_config_change: str = flag("refuse", "a resume with another DeepSpeed config (outside speed and memory "
                               "settings): refuse, or accept it from the resumed step on",
                               choices=("refuse", "accept"))
    micro_batch: int = flag(16, "examples per rank per micro-step")
    grad_accum: int = flag(1, "micro-steps per optimizer step")
    lr: float = flag(8e-6, "peak learning rate")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    warmup_ratio: float = flag(0.05, "share of steps warming up linearly; then cosine decay")
    grad_clip: float = flag(0.3, "gradient norm clip")
    seed: int = flag(42, "seed for data order, layouts and model init")
    ds_config: str = flag("ds_configs/zero3.json", "DeepSpeed JSON config (batch sizes, lr are filled in)")
    # checkpoints and output
    output: str = flag("runs/run", "run folder or URL (s3://...): checkpoints, tb, config, final export")
    save_every: int = flag(0, "save every N optimizer steps (0: only at the end and on signals)")
    keep_last: int = flag(2, "checkpoints kept")
    resume: str = flag("auto", "auto (newest complete checkpoint), never, or a checkpoint path")
    universal: bool = flag(False, "allow resuming with another world size (DeepSpeed universal checkpoint)")
    export: bool = flag(True, "write OUTPUT/final (an HF folder) at the end")
    # monitoring
    log_every: int = flag(1, "progress line every N steps (rank 0)")
    log_examples: bool = flag(False, "write OUTPUT/examples/rank*.jsonl: the examples of every step (audit)")
    profile_steps: str = flag("", "torch.profiler over optimizer steps A-B (e.g. 3-4) on rank 0: OUTPUT/profile/"
                              "ops.txt (operators by self time), ops.json and trace.json (Chrome trace)")
    eval_every: int = flag(0, "validation loss every N steps (0: never)")
    eval_batches: int = flag(8, "validation micro-batches per evaluation")
    dist_timeout_s: int = flag(300, "collective timeout: a dead rank fails the job after this long")

    def check(self) -> None:
        """Refuse values that cannot work, naming the flag."""
        if not self.data:
            raise ValueError("--data is required: a data set folder or URL (tools/shard_histories.py makes one)")
        for name, minimum in (("micro_batch", 1), ("grad_accum", 1), ("max_steps", 0), ("num_workers", 0),
                              ("window_shards", 1), ("keep_last", 1), ("save_every", 0), ("eval_every", 0)):
            if getattr(self, name) < minimum:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}; got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0; got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1); got {self.warmup_ratio}")
        if self.max_steps == 0 and not self.epochs > 0:
            raise ValueError("--epochs must be > 0 when --max-steps is 0")
        if self.max_history is not None and self.max_history < 0:
            raise ValueError(f"--max-history must be >= 0; got {self.max_history}")
        check_attn_implementation(self.attn_implementation)
        parse_profile_steps(self.profile_steps)
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"--split {self.split!r}: expected train, val or test")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hash(self, ignore: set[str] = frozenset()) -> str:
        d = {k: v for k, v in self.to_dict().items() if k not in ignore}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Fields that may differ between an interrupted run and its resumption.
RESUME_NEUTRAL = {"resume", "universal", "num_workers", "log_every", "log_examples", "profile_steps", "output", "save_every", "keep_last",
                  "eval_every", "eval_batches", "dist_timeout_s", "export", "ds_config", "max_steps", "epochs",
                  "schedule_change", "ds_config_change", "attn_implementation", "packing"}


def check_attn_implementation(name: str) -> None:
    """--attn-implementation flash_attention_2 without the flash-attn package fails here, naming the flag."""
    if name == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("--attn-implementation flash_attention_2 needs the flash-attn package "
                             "(pip install flash-attn, on a GPU node); use sdpa")


def _base_type(tp: Any) -> tuple[type, bool]:
    """(type, optional) from a resolved annotation such as `int | None`."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser whose error is one line naming the flag (exit 2), not the usage of every
    flag followed by it: a TrainConfig has some 60 flags, and the one that matters was lost below."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def build_parser(cls: type = TrainConfig, defaults: dict[str, Any] | None = None,
                 description: str = "") -> argparse.ArgumentParser:
    p = FlagParser(description=description, argument_default=argparse.SUPPRESS,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML or JSON file with any of the flags below (flags win)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    for f, hint, dest, default in flag_fields(cls, defaults or {}):
        add_flag(p, f, hint, dest, default)
    return p


def flag_fields(cls: type, defaults: dict[str, Any] | None = None):
    """(field, type, dest, shown default) for every flag of CLS: its own fields, and the fields
    of its sections under `section.field` dests."""
    defaults = defaults or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("section")
        if sub is None:
            yield f, hints[f.name], f.name, defaults.get(f.name, f.default)
            continue
        sub_hints, given = typing.get_type_hints(sub), defaults.get(f.name, {})
        for g in dataclasses.fields(sub):
            shown = "the run's" if f.metadata["overrides"] else given.get(g.name, g.default)
            yield g, sub_hints[g.name], f"{f.name}.{g.name}", shown


def add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field, hint: Any, dest: str, default: Any) -> None:
    """--FIELD-NAME for dataclass field F of type HINT: its help and choices (an Optional accepts none)."""
    tp, optional = _base_type(hint)
    kwargs: dict[str, Any] = {"dest": dest, "help": f"{f.metadata.get('help', '')} (default: {default})"}
    if "choices" in f.metadata:
        kwargs["choices"] = f.metadata["choices"]
    if tp is bool:
        kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
    else:
        base = tp if tp in (int, float, str) else str
        kwargs["type"] = (lambda b: (lambda s: None if s.lower() in ("none", "null") else b(s)))(base) if optional else base
    parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


RUN_CONFIG_FILE = "config.json"  # the resolved TrainConfig, saved at the top of every run's folder


def read_run_config(run: str) -> dict[str, Any]:
    """A training run's saved config (folder or URL); FileNotFoundError naming the run when it has none."""
    from patchrec_dist.data import storage

    url = storage.join(run, RUN_CONFIG_FILE)
    if not storage.exists(url):
        raise FileNotFoundError(f"--run {run}: no {RUN_CONFIG_FILE} there: not a training run's folder")
    return json.loads(storage.read_bytes(url))


def load_config_file(path: str) -> dict[str, Any]:
    text = Path(path).read_text()
    data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of flag names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def parse_config(argv: list[str] | None = None, defaults: dict[str, Any] | None = None,
                 cls: type = TrainConfig, description: str = "") -> Any:
    """Defaults < the launcher's DEFAULTS < --config file < command-line flags. A section's keys
    may be nested in the file (`layout: {stage: pft-i}`) or flat (`stage: pft-i`), as on the
    command line."""
    parser = build_parser(cls, defaults, description)
    args = vars(parser.parse_args(argv))
    args.pop("local_rank", None)
    values: dict[str, Any] = {}
    _merge(values, cls, dict(defaults or {}), parser, "the launcher's defaults")
    config_file = args.pop("config", None)
    if config_file:
        try:
            loaded = load_config_file(config_file)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            parser.error(f"--config: {exc}")
        _merge(values, cls, loaded, parser, f"--config {config_file}")
    for dest, value in args.items():  # flags: "name", or "section.name" for a section's
        head, _, name = dest.rpartition(".")
        (values.setdefault(head, {}) if head else values)[name] = value
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("section")
        if sub is not None and not f.metadata["overrides"]:
            try:
                values[f.name] = sub(**values.get(f.name, {}))
            except (TypeError, ValueError) as exc:
                parser.error(f"{f.metadata['help']}: {exc}")
    try:
        cfg = cls(**values)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    check = getattr(cfg, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            parser.error(str(exc))
    return cfg


def _merge(values: dict[str, Any], cls: type, given: dict[str, Any], parser: argparse.ArgumentParser,
           where: str) -> None:
    """GIVEN (flat or with nested sections) into VALUES, keyed as the dataclass CLS is."""
    own = {f.name: f for f in dataclasses.fields(cls)}
    in_section = {g.name: f.name for f in own.values() if f.metadata.get("section")
                  for g in dataclasses.fields(f.metadata["section"])}
    unknown = []
    for key, value in given.items():
        if key in own and own[key].metadata.get("section"):
            if not isinstance(value, dict):
                parser.error(f"{where}: {key} must be a mapping of its flags to values")
            for sub_key, sub_value in value.items():
                if sub_key.replace("-", "_") not in in_section:
                    unknown.append(f"{key}.{sub_key}")
                values.setdefault(key, {})[sub_key.replace("-", "_")] = sub_value
        elif key in in_section:
            values.setdefault(in_section[key], {})[key] = value
        elif key in own:
            values[key] = value
        else:
            unknown.append(key)
    if unknown:
        parser.error(f"unknown option(s) in {where}: {', '.join(sorted(unknown))}")
