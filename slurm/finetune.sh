#!/usr/bin/env bash
# Patch fine-tuning (PFT) under SLURM: `sbatch slurm/finetune.sh [LAUNCHER FLAGS...]`.
#
#SBATCH --job-name=patchrec-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#
# Every #SBATCH line above is a default: sbatch flags win (`sbatch --nodes=4 --gpus-per-node=8
# --cpus-per-task=64 --time=48:00:00 slurm/finetune.sh`). The log goes to logs/ under the submit
# directory: create it first (`mkdir -p logs`) or pass --output. One task per node: srun starts
# the per-node launcher (python -m patchrec_dist.launch) on every node, which starts
# NPROC_PER_NODE ranks (slurm/common.sh).
#
# Environment (sbatch exports the submitting shell's environment):
#   DATA            data set URL (required): local path or s3://...
#   OUTPUT          run folder (default runs/finetune); a requeued job resumes from its newest checkpoint
#   INIT            start from a previous run (its final/ export) or an HF folder, e.g. runs/pretrain
#   MODEL           default smollm2 (GPU) or tiny (PATCHREC_CPU=1)
#   STAGE           default: the launcher's (pft-s); pft-i, text, budget
#   DS_CONFIG       DeepSpeed JSON (default ds_configs/zero3.json)
#   NPROC_PER_NODE  ranks per node (default: GPUs on the node; 2 with PATCHREC_CPU=1)
#   EXTRA_ARGS      more launcher flags, whitespace-separated (also: arguments after the script name)
#   PATCHREC_CPU=1  CPU ranks (DS_ACCELERATOR=cpu), e.g. on slurm/local_cluster.sh's cluster
#   PYTHON          interpreter (default .venv/bin/python of the repository, else python3)
#   PATCHREC_MASTER_PORT  rendezvous port (default 20000 + job id % 20000; master: the first node)
#   PATCHREC_MAX_REQUEUES  stop requeueing after this many restarts (default 100)
#   PATCHREC_FAILURE_REQUEUES  requeue a multi-node job whose rank failed (a lost node) up to this
#                   many restarts (default 0: the job fails at once, naming the lost node)
#
# SIGUSR1 (120 s before the time limit, or `scancel --signal=USR1 --batch JOBID`) makes every
# rank save at the next step boundary and exit 75; the job then requeues itself
# (`scontrol requeue` by node 0's launcher) and the requeued run continues from that checkpoint.

set -uo pipefail
for _dir in "${PATCHREC_REPO:-}" "$(dirname "$0")/.." \
    "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n1)")/.." \
    "${SLURM_SUBMIT_DIR:-.}" .; do
    [[ -n $_dir && -f $_dir/slurm/common.sh ]] && break
done
[[ -f $_dir/slurm/common.sh ]] || { echo "cannot find slurm/common.sh: set PATCHREC_REPO" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$_dir/slurm/common.sh"

patchrec_run_job launchers/finetune.py runs/finetune "$@"
exit $?
