#!/usr/bin/env bash
# Shared by slurm/pretrain.sh, finetune.sh, evaluate.sh and recommend.sh (sourced).
#
# How a job runs (one code path for 1 or N nodes, the same as a submitit stage's):
#
#   batch shell (pretrain.sh / finetune.sh / evaluate.sh / recommend.sh, on the job's first node)
#     `-- srun --ntasks-per-node=1  python -m patchrec_dist.launch --nproc NPROC_PER_NODE SCRIPT ...
#           `-- (one per node) NPROC_PER_NODE rank processes: SCRIPT ... --local_rank=i
#
# patchrec_dist/launch.py is the per-node launcher: it takes the world from SLURM (master: the
# allocation's first host; port 20000 + job id % 20000), gives each rank DeepSpeed's launcher
# environment, and decides what the job does when the ranks end: requeue it after a stop at a
# checkpoint (exit 75; node 0 runs `scontrol requeue`), end it at once when a rank failed on a job
# of several nodes (a dead node would leave srun waiting for SlurmdTimeout), or pass the exit code
# on. Why per node and not one srun task per rank: see launch.py and docs/cluster.md.
#
# Signals. The ranks save at the next step boundary and exit 75 on SIGUSR1, SIGUSR2 or SIGTERM (the
# ranks agree through an all-reduce). SLURM's `--signal=B:USR1@120` and `scancel --signal=USR1
# --batch JOBID` signal the batch shell only, which forwards USR1 to srun; srun passes it to every
# task (the per-node launchers, which forward it to their ranks). A TERM to the batch shell is
# forwarded as USR1 too: srun turns a TERM it receives into SIGKILL for the step. A TERM to the
# job's steps (`scancel --signal=TERM JOBID`, what a preemption sends) reaches the launchers and
# ranks directly; the launchers only forward it (unlike DeepSpeed's launcher and torchrun, which
# kill the ranks 30 s later).

patchrec_log() { echo "[patchrec $(date '+%F %T')] $*" >&2; }

patchrec_die() { patchrec_log "ERROR: $*"; exit 2; }

# The repository: the folder above this file (the sbatch scripts find this file first).
patchrec_find_repo() {
    (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
}

# Sets and exports: PATCHREC_REPO, PYTHON, PYTHONPATH, PATCHREC_CPU, DS_ACCELERATOR (CPU mode),
# NPROC_PER_NODE.
patchrec_setup_env() {
    PATCHREC_REPO=$(patchrec_find_repo)
    export PATCHREC_REPO
    if [[ -z ${PYTHON:-} ]]; then
        if [[ -x $PATCHREC_REPO/.venv/bin/python ]]; then PYTHON=$PATCHREC_REPO/.venv/bin/python; else PYTHON=python3; fi
    fi
    export PYTHON
    export PYTHONPATH=$PATCHREC_REPO${PYTHONPATH:+:$PYTHONPATH}

    export PATCHREC_CPU=${PATCHREC_CPU:-0}
    if [[ $PATCHREC_CPU == 1 ]]; then
        export DS_ACCELERATOR=cpu
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
        export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
        NPROC_PER_NODE=${NPROC_PER_NODE:-2}
    else
        NPROC_PER_NODE=${NPROC_PER_NODE:-$(patchrec_count_gpus)}
        ((NPROC_PER_NODE > 0)) ||
            patchrec_die "no GPU visible on this node: request GPUs (e.g. sbatch --gpus-per-node=8) or set PATCHREC_CPU=1 for CPU ranks"
    fi
    export NPROC_PER_NODE
    export PYTHONUNBUFFERED=1
}

patchrec_count_gpus() {
    local n
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        echo "$SLURM_GPUS_ON_NODE"; return
    fi
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != NoDevFiles ]]; then
        awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"; return
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        echo "${n:-0}"; return
    fi
    echo 0
}

# ------------------------------------------------------------------------------------------------
# the launcher's flags

# patchrec_train_args STAGE_DEFAULT_OUTPUT -> fills the array PATCHREC_ARGS from DATA, MODEL,
# OUTPUT, INIT, STAGE, DS_CONFIG and EXTRA_ARGS (whitespace-separated, no quoting).
patchrec_train_args() {
    local default_output=$1 extra=()
    [[ -n ${DATA:-} ]] || patchrec_die "DATA is not set (a data set URL: local path or s3://...)"
    if [[ -z ${MODEL:-} ]]; then
        if [[ $PATCHREC_CPU == 1 ]]; then MODEL=tiny; else MODEL=smollm2; fi
    fi
    OUTPUT=${OUTPUT:-$default_output}
    PATCHREC_ARGS=(--data "$DATA" --model "$MODEL" --output "$OUTPUT"
        --ds-config "${DS_CONFIG:-$PATCHREC_REPO/ds_configs/zero3.json}")
    [[ -n ${INIT:-} ]] && PATCHREC_ARGS+=(--init "$INIT")
    [[ -n ${STAGE:-} ]] && PATCHREC_ARGS+=(--stage "$STAGE")
    if [[ -n ${EXTRA_ARGS:-} ]]; then
        read -r -a extra <<<"$EXTRA_ARGS"
        PATCHREC_ARGS+=("${extra[@]}")
    fi
    return 0
}

# ------------------------------------------------------------------------------------------------
# the job

_patchrec_to_step() {  # forward a stop request to the step (srun passes USR1 on to every task)
    _PATCHREC_TRAPPED=1
    patchrec_log "batch shell got SIG$1: asking the ranks to save and stop (USR1 via srun)"
    kill -s USR1 "$_PATCHREC_SRUN_PID" 2>/dev/null || true
}

# patchrec_run_step [--not-resumable] SCRIPT ARGS...: the body of an sbatch script. Runs SCRIPT on
# NPROC_PER_NODE ranks on every node of the job (on this machine alone outside SLURM).
patchrec_run_step() {
    local launch_opts=(--nproc "$NPROC_PER_NODE")
    [[ $PATCHREC_CPU == 1 ]] && launch_opts+=(--cpu)
    if [[ ${1:-} == --not-resumable ]]; then launch_opts+=(--not-resumable); shift; fi
    local script=$1 nnodes=${SLURM_NNODES:-1} rc
    shift
    patchrec_log "job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-$(hostname)}:" \
        "$nnodes node(s) x $NPROC_PER_NODE ranks, world $((nnodes * NPROC_PER_NODE)), cpu mode $PATCHREC_CPU"
    patchrec_log "launch: $script $*"
    if [[ -z ${SLURM_JOB_ID:-} ]]; then  # not under SLURM (bash slurm/pretrain.sh): just this node
        "$PYTHON" -u -m patchrec_dist.launch "${launch_opts[@]}" "$script" "$@"
        return
    fi
    local srun_args=(--nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=0)
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    srun "${srun_args[@]}" "$PYTHON" -u -m patchrec_dist.launch "${launch_opts[@]}" "$script" "$@" &
    _PATCHREC_SRUN_PID=$!
    trap '_patchrec_to_step USR1' USR1
    trap '_patchrec_to_step TERM' TERM
    while :; do  # a trapped signal interrupts `wait`: wait again
        _PATCHREC_TRAPPED=0
        wait "$_PATCHREC_SRUN_PID"
        rc=$?
        [[ $_PATCHREC_TRAPPED == 1 ]] || break
    done
    patchrec_log "training exited with $rc"
    return "$rc"
}

# patchrec_run_job SCRIPT DEFAULT_OUTPUT [LAUNCHER ARGS...]: pretrain.sh and finetune.sh.
patchrec_run_job() {
    local script=$1 default_output=$2
    shift 2
    patchrec_setup_env
    patchrec_train_args "$default_output"
    patchrec_run_step "$script" "${PATCHREC_ARGS[@]}" "$@"
}
