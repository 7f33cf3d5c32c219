"""Checkpoint save and load time against a plain copy of the same bytes (the limit).

    python bench/checkpoint.py [--models smollm2,llama1b] [--llama-layers 16] [--ranks 2]

For each model, 2 CPU ranks (the project's launcher, DeepSpeed ZeRO-3, torch AdamW, one optimizer
step so the optimizer state exists) save a checkpoint with CheckpointManager and load it back,
to local disk and to a moto S3 server on loopback. Beside each: rank 0 copying the same files
with a plain copy (local: shutil.copytree; S3: fsspec get of the checkpoint, and put back). Then
the end-of-training HF export (weights gathered one tensor at a time): its seconds, bytes and
rank 0's resident memory above what it held before, and AutoModelForCausalLM loading it.
Writes bench/results/checkpoint.json.

`llama1b` is a random Llama with Llama-3.2-1B's shape (hidden 2048, 32 heads, 8 KV heads, MLP
8192, 128k vocabulary, tied embeddings); --llama-layers sets its depth (16 in the real model;
the optimizer state is 12 bytes a parameter, so fewer layers fit a small machine and moto, which
keeps objects in memory). The JSON records the depth that ran.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# rank side (run under the launcher)
def build_model(name: str, layers: int):
    from transformers import AutoModelForCausalLM

    from patchrec_dist.model.tiny import llama_1b_config

    if name == "smollm2":
        from patchrec_dist.model.smollm2 import smollm2_model_dir

        return AutoModelForCausalLM.from_pretrained(smollm2_model_dir())
    return AutoModelForCausalLM.from_config(llama_1b_config(layers=layers))


def rank_main(args) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from patchrec_dist.train.checkpoint import CheckpointManager
    from patchrec_dist.train.distributed import init_distributed

    rank, world, _ = init_distributed(600)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "lr": 1e-5}},
          "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
    hf_ds = HfDeepSpeedConfig(ds)  # noqa: F841 - partitioned creation while it lives
    torch.manual_seed(0)
    model = build_model(args.model, args.llama_layers)
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    ids = torch.randint(0, model.config.vocab_size, (1, 32))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()

    results = {}
    for target in args.targets.split(","):
        mgr = CheckpointManager(target, keep_last=1)
        dist.barrier()
        t0 = time.perf_counter()
        tag = mgr.save(engine, 1, {"bench": True})
        dist.barrier()
        save_s = time.perf_counter() - t0
        files = mgr.read_state(tag)["checkpoint"]["files"]
        mgr._current_tag = None  # load for real, not "already equal"
        dist.barrier()
        t0 = time.perf_counter()
        mgr.load(engine, tag)
        dist.barrier()
        load_s = time.perf_counter() - t0
        results[target] = {"save_s": save_s, "load_s": load_s, "bytes": sum(files.values()), "files": len(files),
                           "url": mgr.tag_url(tag)}
    export = measure_export(engine, args, rank)
    if rank == 0:
        Path(args.result).write_text(json.dumps({"params": params, "world": world, "targets": results,
                                                 "export": export}))


def measure_export(engine, args, rank: int) -> dict:
    """The end-of-training export (gathered weights, one tensor at a time): seconds, bytes and rank
    0's resident memory above what it held before (sampled every 10 ms)."""
    import threading

    import psutil
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from patchrec_dist.model.smollm2 import smollm2_model_dir
    from patchrec_dist.train.export import export_from_engine

    tokenizer = AutoTokenizer.from_pretrained(smollm2_model_dir())
    proc, peak, done = psutil.Process(), [0], threading.Event()
    before = proc.memory_info().rss

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], proc.memory_info().rss)

    threading.Thread(target=sample, daemon=True).start()
    dist.barrier()
    t0 = time.perf_counter()
    out = export_from_engine(engine, args.export_dir, tokenizer, {"bf16": False}, "step_00000001", rank,
                             out=os.path.join(args.export_dir, "final"))
    seconds = time.perf_counter() - t0
    done.set()
    size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    return {"export_s": seconds, "bytes": size, "dtype": "float32",
            "rank0_rss_above_before_gb": max(0, peak[0] - before) / 1e9, "folder": out}


# ---------------------------------------------------------------------------------------------
# driver
def plain_copy(src_url: str, scratch: str) -> dict:
    """Rank 0's plain copy of a checkpoint's files: the write and the read, in one process."""
    from patchrec_dist.data import storage

    if storage.is_local(src_url):
        t0 = time.perf_counter()
        shutil.copytree(src_url, os.path.join(scratch, "copy"))
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for path in Path(scratch, "copy").rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    while f.read(1 << 24):
                        pass
        return {"write_s": write_s, "read_s": time.perf_counter() - t0, "note": "read from the page cache"}
    fs, path = storage.filesystem_for(src_url)
    local = os.path.join(scratch, "down")
    t0 = time.perf_counter()
    fs.get(path.rstrip("/") + "/", local, recursive=True)
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fs.put(local.rstrip("/") + "/", path.rstrip("/") + "-copy", recursive=True)
    return {"write_s": time.perf_counter() - t0, "read_s": read_s}


def exported(export: dict) -> dict:
    """The export's numbers, and the time AutoModelForCausalLM takes to load it (proof it loads)."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(export.pop("folder"))
    export["from_pretrained_s"] = round(time.perf_counter() - t0, 2)
    export["loaded_params"] = sum(p.numel() for p in model.parameters())
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in export.items()}


@contextlib.contextmanager
def moto_env(wanted: bool):
    """The environment for the ranks: with WANTED, a fresh moto server on loopback with a bucket
    `bench` (also set in this process, for the plain copy); stopped on the way out."""
    import socket

    from patchrec_dist.launch import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    if not wanted:
        yield env
        return
    port = free_port()
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        s3 = {"PATCHREC_S3_ENDPOINT": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
              "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        env.update(s3)
        os.environ.update(s3)
        from patchrec_dist.data import storage

        storage.filesystem_for("s3://bench")[0].mkdir("bench")
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,llama1b")
    p.add_argument("--llama-layers", type=int, default=16)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--targets", default="local,s3", help="local, s3 or both")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "checkpoint.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--export-dir", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the launcher's
    args = p.parse_args()
    if args.worker:
        rank_main(args)
        return 0

    report = {"benchmark": "checkpoint", "command": " ".join(["python", "bench/checkpoint.py", *sys.argv[1:]]),
              "machine": {"device": "CPU", "cpus": os.cpu_count(), "platform": platform.platform()}, "ranks": args.ranks,
              "note": "CPU ranks; local disk is the machine's; S3 is moto on loopback (objects in memory), a fresh "
                      "server per model", "models": {}}
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory(dir=os.environ.get("PATCHREC_BENCH_TMP")) as tmp, \
                moto_env("s3" in args.targets) as env:
            targets = ",".join({"local": os.path.join(tmp, "run"), "s3": f"s3://bench/{model}"}[t]
                               for t in args.targets.split(","))
            result = os.path.join(tmp, "result.json")
            cmd = [sys.executable, "-m", "patchrec_dist.launch", "--nproc", str(args.ranks), "--cpu",
                   "--not-resumable", "bench/checkpoint.py", "--worker", "--model", model,
                   "--llama-layers", str(args.llama_layers), "--targets", targets, "--result", result,
                   "--export-dir", os.path.join(tmp, "export")]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                raise SystemExit(f"{model} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            got = json.loads(Path(result).read_text())
            entry = {"params": got["params"], "wall_s": round(time.perf_counter() - t0, 1), "targets": {}}
            if model == "llama1b":
                entry["layers"] = args.llama_layers
            for kind, r in zip(args.targets.split(","), got["targets"].values()):
                copy = plain_copy(r["url"], tempfile.mkdtemp(dir=tmp))
                gb = r["bytes"] / 1e9
                entry["targets"][kind] = {
                    "bytes": r["bytes"], "files": r["files"],
                    "save_s": round(r["save_s"], 2), "load_s": round(r["load_s"], 2),
                    "save_GBps": round(gb / r["save_s"], 3), "load_GBps": round(gb / r["load_s"], 3),
                    "plain_copy": {"write_s": round(copy["write_s"], 2), "read_s": round(copy["read_s"], 2),
                                   "write_GBps": round(gb / copy["write_s"], 3),
                                   "read_GBps": round(gb / copy["read_s"], 3),
                                   **({"note": copy["note"]} if "note" in copy else {})},
                }
            entry["export"] = exported(got["export"])
            report["models"][model] = entry
            print(json.dumps({model: entry}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
