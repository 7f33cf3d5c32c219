#!/usr/bin/env bash
# Batch recommendations under SLURM: `sbatch slurm/recommend.sh [RECOMMEND FLAGS...]`.
#
#SBATCH --job-name=patchrec-recommend
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#
# Environment (sbatch exports the submitting shell's environment):
#   RUN             the trained run (its final/ export and saved layout) (required)
#   OUTPUT          where the Parquet parts and recommendations.json go (default RUN/recommendations)
#   DATA            data set URL (default: the run's own)
#   REC_ARGS        more flags for launchers/recommend.py (--top-k, --exclude-seen, --users, ...)
#   NPROC_PER_NODE, PATCHREC_CPU, PYTHON: as in slurm/pretrain.sh
# The data set's shards are split over the ranks of every node of the job (`sbatch --nodes=N`). A
# stop (the --signal above, scancel --signal=USR1 --batch, a preemption's TERM) ends the ranks and
# requeues the job; the requeued job skips the parts already written and finishes the rest, and
# recommendations.json is written last.

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
[[ -n ${RUN:-} ]] || patchrec_die "RUN is not set (the trained run to recommend from)"
args=(--run "$RUN" --output "${OUTPUT:-${RUN%/}/recommendations}")
[[ -n ${DATA:-} ]] && args+=(--data "$DATA")
if [[ -n ${REC_ARGS:-} ]]; then
    read -r -a extra <<<"$REC_ARGS"
    args+=("${extra[@]}")
fi
args+=("$@")
# not resumable at a step boundary: a stop ends the ranks (the parts written so far stay) and
# the launcher requeues the job, which skips those parts
patchrec_run_step --not-resumable launchers/recommend.py "${args[@]}"
exit $?
