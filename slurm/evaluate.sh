#!/usr/bin/env bash
# Evaluation under SLURM: `sbatch slurm/evaluate.sh [EVALUATE FLAGS...]`.
#
#SBATCH --job-name=patchrec-evaluate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=12:00:00
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#
# Environment (sbatch exports the submitting shell's environment):
#   DATA            data set URL (required)
#   RUN             the training run to evaluate (its final/ export and saved layout) (required)
#   SPLIT           default test
#   EVAL_ARGS       more flags for launchers/evaluate.py (--max-examples, --top-k, --scoring, ...)
#   NPROC_PER_NODE, PATCHREC_CPU, PYTHON: as in slurm/pretrain.sh
# Examples are split over the ranks of every node of the job (`sbatch --nodes=N`); metrics go to
# RUN/eval-SPLIT/metrics.json (RUN may be an s3:// URL). A stopped evaluation is run again from
# the start.

set -uo pipefail
for _dir in "${PATCHREC_REPO:-}" "$(dirname "$0")/.." \
    "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n1)")/.." \
    "${SLURM_SUBMIT_DIR:-.}" .; do
    [[ -n $_dir && -f $_dir/slurm/common.sh ]] && break
done
[[ -f $_dir/slurm/common.sh ]] || { echo "cannot find slurm/common.sh: set PATCHREC_REPO" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$_dir/slurm/common.sh"

patchrec_setup_env
[[ -n ${DATA:-} ]] || patchrec_die "DATA is not set"
[[ -n ${RUN:-} ]] || patchrec_die "RUN is not set (the training run to evaluate)"
args=(--run "$RUN" --data "$DATA" --split "${SPLIT:-test}")
if [[ -n ${EVAL_ARGS:-} ]]; then
    read -r -a extra <<<"$EVAL_ARGS"
    args+=("${extra[@]}")
fi
args+=("$@")
patchrec_run_step --not-resumable launchers/evaluate.py "${args[@]}"
exit $?
