#!/usr/bin/env bash
# Pre-train -> fine-tune -> evaluate as three SLURM jobs chained with --dependency=afterok.
#
#   DATA=s3://bucket/ml1m RUNS=runs/ml1m bash slurm/pipeline.sh
#
# Environment:
#   DATA            data set URL (required)
#   RUNS            folder for the three stages (default runs): RUNS/pretrain, RUNS/finetune
#   PRETRAIN_ARGS, FINETUNE_ARGS, EVAL_ARGS   extra flags for each stage's launcher
#   SBATCH_ARGS     extra sbatch flags for every job (--partition, --gpus-per-node, --time, ...)
#   everything slurm/pretrain.sh reads (MODEL, PATCHREC_CPU, NPROC_PER_NODE, DS_CONFIG, ...)
# RUNS and DATA may be s3:// URLs. A stage whose run already finished (RUNS/<stage>/DONE.json, or
# metrics.json for evaluation; `python -m patchrec_dist.pipeline finished RUNS`, the same test
# launchers/submit.py makes) is not submitted again, so the same command continues a pipeline
# after a failure. Requeued (preempted) jobs resume from their checkpoints by themselves.
#   SBATCH_ARGS="--nodes=2 --gpus-per-node=8"   every stage on 2 nodes

set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${DATA:?DATA is not set (a data set URL)}"
RUNS=${RUNS:-runs}
PRE=$RUNS/pretrain
FT=$RUNS/finetune
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=python3
mkdir -p logs
[[ $RUNS == *://* ]] || mkdir -p "$RUNS"
finished=$(PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" -m patchrec_dist.pipeline finished "$RUNS") ||
    { echo "pipeline: cannot read $RUNS" >&2; exit 2; }
is_finished() { grep -qx "$1" <<<"$finished"; }
read -r -a sbatch_extra <<<"${SBATCH_ARGS:-}"
dep=()

submit() {  # submit NAME SCRIPT VAR=VALUE... : print the job id
    local name=$1 script=$2
    shift 2
    env "$@" sbatch --parsable --job-name="patchrec-$name" "${sbatch_extra[@]}" "${dep[@]}" "$REPO/slurm/$script" |
        cut -d';' -f1
}

if is_finished pretrain; then
    echo "pretrain: finished already ($PRE)"
else
    pre=$(submit pretrain pretrain.sh OUTPUT="$PRE" INIT= EXTRA_ARGS="${PRETRAIN_ARGS:-}")
    echo "pretrain: job $pre -> $PRE"
    dep=(--dependency="afterok:$pre")
fi
if is_finished finetune; then
    echo "finetune: finished already ($FT)"
else
    ft=$(submit finetune finetune.sh OUTPUT="$FT" INIT="$PRE" EXTRA_ARGS="${FINETUNE_ARGS:-}")
    echo "finetune: job $ft -> $FT (initialised from $PRE)"
    dep=(--dependency="afterok:$ft")
fi
if is_finished evaluate; then
    echo "evaluate: finished already ($FT/eval-test/metrics.json)"
else
    ev=$(submit evaluate evaluate.sh RUN="$FT" EVAL_ARGS="${EVAL_ARGS:-}")
    echo "evaluate: job $ev -> $FT/eval-test/metrics.json"
fi
echo "watch: squeue -u ${USER:-$(id -un)}    logs: logs/    curves: tensorboard --logdir $RUNS"
