#!/usr/bin/env bash
# One GPU check for a lent H100/H200 machine (the `device` tool), at most 10 minutes:
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --dry-run  # anywhere: prints every command and checks its arguments
#
# What it runs, each result with "-gpu" in the name and the device in it, under bench/results/ or
# $GPU_CHECK_RESULTS (the device tool's $OUT, so that the files come back):
#   0. tools/shard_histories.py on ml-1m (the paper's files, ../shared/data/patchrec): the data set
#      of 2 (the machine reaches no network, so no MovieLens-100K download)
#   1. pytest -m gpu: NCCL on one GPU with the rank's device set first, bf16 against fp32, the
#      answer-logits loss's memory with a 128k vocabulary on CUDA      -> gpu-tests-gpu.json (junit: gpu-tests-gpu.xml)
#   2. bench/train_step.py: SmolLM2-135M and a random Llama of Llama-3.2-1B's shape, bf16 (the CUDA
#      default), ZeRO-3, 1 GPU, packed and padded: step times, tokens/s, MFU against the chip's bf16
#      peak; and one step fp32 against one bf16 on the same batch; each run's last step profiled
#                                                                       -> train_step-gpu.json
#      before it, SmolLM2 padded under ZeRO-2, profiled too            -> train_step-zero2-gpu.json
#   3. bench/needle.py with SmolLM2 on 1 GPU, the demo's own path (fine-tune, export, constrained
#      evaluation): text(20), pft-s(5), pft-s(10), 32 needles        -> needle-smollm2-gpu.json
#
# What travels. The machine has python3 with CUDA torch, transformers, peft, safetensors, pyarrow,
# tensorboard, tqdm, rich, psutil and pytest (device/KINDS.md), and no package index. The rest is
# made here, once, by
#   bash bench/gpu_check.sh --prepare
# into .gpu-carry/1, .gpu-carry/2, ... (git-ignored), each under the 64 MiB one `run` call carries:
#   - the wheels it lacks, at this .venv's versions (pip download of manylinux cp312 wheels;
#     DeepSpeed ships only a source archive, so its wheel is built with `pip wheel`: pure Python,
#     its ops JIT-built on first use, and none is needed since training uses torch's fused AdamW);
#   - ml-1m, the paper's files (2 MB);
#   - SmolLM2-135M-Instruct's GGUF (94 MB), cut into 30 MB parts.
# --prepare prints the calls: one per folder, `carry [".gpu-carry/K"]`, back to back so that the
# machine stays warm. A carried folder does not outlive its call in the checkout there, so each call
# copies its folder to /tmp/gpu-carry; the last copies them all back, checks expected.txt and runs
# `GPU_CHECK_RESULTS=$OUT bash bench/gpu_check.sh`, which installs the wheels into /tmp/site and
# joins the GGUF parts into the model cache.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  --prepare) FETCH=1 ;;
  "") ;;
  *) echo "gpu_check.sh: unknown option $1 (use --dry-run or --prepare)" >&2; exit 2 ;;
esac

# what the GPU machine lacks, at the versions this project's .venv runs (and what they need that it lacks too)
NEED=(deepspeed polars polars-runtime-32 fsspec webdataset braceexpand s3fs aiobotocore botocore jmespath aioitertools submitit hjson
      pydantic pydantic-core annotated-types typing-inspection
      transformers huggingface-hub kernels peft accelerate gguf httpx2 httpcore2 truststore tomlkit)
if [[ "${FETCH:-0}" == 1 ]]; then
  rm -rf .gpu-carry && mkdir -p .gpu-carry/all/wheels .gpu-carry/all/ml-1m
  grep -qx '/.gpu-carry/' .git/info/exclude 2>/dev/null || echo /.gpu-carry/ >> .git/info/exclude
  mapfile -t PINS < <(.venv/bin/python - "${NEED[@]}" <<'PYEOF2'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
PYEOF2
)
  WHEELS=(); for pin in "${PINS[@]}"; do [[ $pin == deepspeed==* ]] && DS_PIN=$pin || WHEELS+=("$pin"); done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu-carry/all/wheels "${WHEELS[@]}" 2> >(grep -v "^WARNING: Location" >&2)
  .venv/bin/python -m pip wheel -q --no-deps -w .gpu-carry/all/wheels "$DS_PIN" 2> >(grep -v "^WARNING: Location" >&2)
  cp ../shared/data/patchrec/ml-1m/* .gpu-carry/all/ml-1m/
  GGUF=$(.venv/bin/python -c 'from patchrec_dist.model.smollm2 import smollm2_gguf_path; print(smollm2_gguf_path())')
  split -b 30M "$GGUF" .gpu-carry/all/gguf.part-
  # first fit, largest first, into folders of at most 60 MiB
  .venv/bin/python - <<'PYEOF2'
import os, shutil
items = [os.path.join("wheels", f) for f in os.listdir(".gpu-carry/all/wheels")] + ["ml-1m"] + \
        sorted(f for f in os.listdir(".gpu-carry/all") if f.startswith("gguf.part-"))
def size(rel):
    path = os.path.join(".gpu-carry/all", rel)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) if os.path.isdir(path) else os.path.getsize(path)
bins = []
for rel in sorted(items, key=size, reverse=True):
    fit = next((b for b in bins if b[0] + size(rel) <= 60 << 20), None)
    if fit is None:
        fit = [0, []]
        bins.append(fit)
    fit[0] += size(rel)
    fit[1].append(rel)
for k, (total, rels) in enumerate(bins, start=1):
    for rel in rels:
        dst = os.path.join(".gpu-carry", str(k), rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(os.path.join(".gpu-carry/all", rel), dst)
    last = k == len(bins)
    # a carried folder is gone from the checkout at the next call: each call stashes its own outside
    print(f"call {k}: carry [\".gpu-carry/{k}\"] ({total / 2**20:.0f} MiB), command: "
          + ("cp -r /tmp/gpu-carry/* .gpu-carry/ && set -o pipefail && GPU_CHECK_RESULTS=$OUT bash bench/gpu_check.sh "
             "2>&1 | tee $OUT/gpu_check.log" if last else f"mkdir -p /tmp/gpu-carry && cp -r .gpu-carry/{k} /tmp/gpu-carry/"))
# the last call checks that every earlier call's folder is still there (the machine stayed warm)
with open(os.path.join(".gpu-carry", str(len(bins)), "expected.txt"), "w") as fh:
    fh.writelines(f"{k}/{rel}\n" for k, (_, rels) in enumerate(bins, start=1) for rel in rels)
shutil.rmtree(".gpu-carry/all")
PYEOF2
  exit 0
fi

PY=python3
if [[ $DRY == 1 ]]; then
  PY=${PYTHON:-.venv/bin/python}
else
  if compgen -G ".gpu-carry/*/expected.txt" >/dev/null; then  # every call's folder must have stayed
    missing=$(cd .gpu-carry && while read -r rel; do [[ -e $rel ]] || echo "$rel"; done < $(ls */expected.txt))
    [[ -z $missing ]] || { echo "gpu_check.sh: missing from earlier calls (the machine went back?): $missing" >&2; exit 2; }
  fi
  if compgen -G ".gpu-carry/*/wheels/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-carry/*/wheels/*.whl
  fi
  if compgen -G ".gpu-carry/*/gguf.part-*" >/dev/null; then  # SmolLM2's GGUF where smollm2_gguf_path looks
    mkdir -p ~/.cache/patchrec_dist/gguf
    cat $(ls .gpu-carry/*/gguf.part-* | sort -t- -k3) > ~/.cache/patchrec_dist/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
  fi
  export PYTHONPATH=/tmp/site:$PWD
  $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: run this on the GPU machine'"
fi
DEVICE=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none (dry run)')")
RESULTS=${GPU_CHECK_RESULTS:-bench/results}  # the device tool passes $OUT: what is written there comes back
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1

# run NAME SECONDS CMD...: print it; in a dry run check its arguments instead of running it
run() {
  local name=$1 limit=$2; shift 2
  echo "+ [$name, at most ${limit}s] $*"
  if [[ $DRY == 1 ]]; then
    "$@" --check-args >/dev/null || { echo "gpu_check.sh: $name: bad arguments: $*" >&2; exit 2; }
  else
    timeout "$limit" "$@" || {
      echo "gpu_check.sh: $name failed or ran out of time (rc=$?)" >&2
      # timeout signals the bench alone: its launches would hold the GPU through the next step
      pkill -f "patchrec_dist.launch|launchers/(finetune|pretrain|evaluate).py" || true
      sleep 2
    }
  fi
}

# 0. the paper's ml-1m files, sharded (seconds, on the CPU; the dry run does it too, which checks the
# input and flags): the data set of steps 2 and 3, since the machine cannot download MovieLens-100K
DATA=/tmp/gpu-check-ml-1m
ML_1M=../shared/data/patchrec/ml-1m
compgen -G ".gpu-carry/*/ml-1m" >/dev/null && ML_1M=$(ls -d .gpu-carry/*/ml-1m | head -1)
echo "+ [shard, at most 60s] $PY tools/shard_histories.py --format patchrec --trust-pickle --input $ML_1M --output $DATA --split leave-one-out --overwrite --no-progress"
timeout 60 $PY tools/shard_histories.py --format patchrec --trust-pickle --input "$ML_1M" \
  --output "$DATA" --split leave-one-out --overwrite --no-progress >/dev/null

# 1. the gpu tests (the dry run collects them, which checks the marker and imports)
echo "+ [gpu-tests, at most 60s] $PY -m pytest -m gpu tests/test_gpu.py --junitxml $RESULTS/gpu-tests-gpu.xml"
if [[ $DRY == 1 ]]; then
  $PY -m pytest -q -m gpu --collect-only tests/test_gpu.py >/dev/null
else
  timeout 60 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py --junitxml "$RESULTS/gpu-tests-gpu.xml" || true
  $PY - "$DEVICE" "$RESULTS" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
device, results = sys.argv[1], sys.argv[2]
root = ET.parse(f"{results}/gpu-tests-gpu.xml").getroot()
cases = {c.get("name"): ("failed" if c.find("failure") is not None or c.find("error") is not None
                        else "skipped" if c.find("skipped") is not None else "passed") for c in root.iter("testcase")}
json.dump({"device": device, "tests": cases}, open(f"{results}/gpu-tests-gpu.json", "w"), indent=1)
print(cases)
PYEOF
fi

# 2a. SmolLM2 padded under ZeRO-2: on the first H200 run ZeRO-3 steps took 0.5 s, and on CPU ZeRO-3's
# partition bookkeeping is half of a small model's step (bench/needle.py's --ds-config note)
run train-step-zero2 75 $PY bench/train_step.py --data "$DATA" --models smollm2 --steps 5 --micro-batches 8 \
  --packing off --ds-config ds_configs/zero2.json --profile --out "$RESULTS/train_step-zero2-gpu.json"

# 2. the train step on the GPU (bf16 is the CUDA default); the JSON is rewritten after every run, so a
# run cut short by its limit still returns the runs it finished
run train-step 180 $PY bench/train_step.py --data "$DATA" --models smollm2,llama1b --steps 5 --micro-batches 8 \
  --packing on,off --compare-precision --profile --out "$RESULTS/train_step-gpu.json"

# 3. the needle task (bench/needle.py) with SmolLM2 on the GPU, through the demo's own path (fine-tune,
# export, constrained evaluation with 10 beams): 32 needles, so that HR@10 reads too (chance 0.31);
# the JSON is rewritten after every layout
run needle 200 $PY bench/needle.py --model smollm2 --cpu false --lr 2e-4 --needles 32 --steps 300 --micro-batch 32 --test-users 0.015 \
  --layouts "pft-s(5),text(20),pft-s(10)" --work /tmp/gpu-needle --results "$RESULTS" --name needle-smollm2-gpu

echo "gpu_check.sh: done on $DEVICE$([[ $DRY == 1 ]] && echo ': only the sharding ran')"
