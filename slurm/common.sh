#!/usr/bin/env bash
# Shared by slurm/pretrain.sh and slurm/finetune.sh (sourced), and run by `srun` once per node
# (`bash slurm/common.sh node LAUNCHER ARGS...`).
#
# How a job runs (one code path for 1 or N nodes):
#
#   batch shell (pretrain.sh / finetune.sh, on the first node)
#     `-- srun --ntasks-per-node=1  bash common.sh node ...      (one task per node)
#           `-- python -m deepspeed.launcher.launch --world_info=... --node_rank=$SLURM_NODEID
#                 `-- NPROC_PER_NODE rank processes (launchers/pretrain.py ... --local_rank=i)
#
# The per-node launcher is DeepSpeed's own (`deepspeed.launcher.launch`, what the `deepspeed`
# command runs on every node), given the world by hand instead of a hostfile + pdsh: the rank
# environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_SIZE) is exactly the
# one `deepspeed --num_gpus N` gives in the tests. MASTER_ADDR is the job's first node
# (`scontrol show hostnames`), MASTER_PORT is derived from the job id (overrides:
# PATCHREC_MASTER_ADDR, PATCHREC_MASTER_PORT), the node rank is SLURM_NODEID, the world
# SLURM_NNODES * NPROC_PER_NODE. A rank that dies makes its node's launcher stop that node's
# ranks; the other nodes fail at their next collective (bounded by --dist-timeout-s). srun runs
# with --kill-on-bad-exit=0 on purpose: with it, the first node to exit 75 would get the others
# killed while they exit 75 too, and the job would fail instead of requeueing.
#
# Signals. The trainer saves at the next step boundary and exits 75 on SIGUSR1/SIGTERM; only the
# rank processes need to see it (the ranks agree through an all-reduce). SLURM's
# `--signal=B:USR1@120` and `scancel --signal=USR1 --batch JOBID` signal the batch shell only,
# which forwards USR1 to `srun`; srun passes it to every process of the step (tested: it reaches
# the whole process tree). The DeepSpeed launcher has no USR1 handler (it would die of it), so it
# is started with USR1 ignored; the ranks install their own handler over that. The per-node
# wrapper also forwards USR1/TERM to the rank processes (children of the launcher) itself, so the
# stop arrives even where srun signals only the task. A TERM to the batch shell is forwarded as
# USR1 (same meaning for the trainer): srun turns a TERM it receives into SIGKILL for the step.
# A TERM to the job's steps (`scancel --signal=TERM JOBID`, what a preemption sends) reaches the
# ranks directly; DeepSpeed's launcher runs with its own TERM handler left out (_PATCHREC_LAUNCH_PY
# below), so the ranks save, exit 75 and the job requeues (tested). A TERM to srun as well
# (`scancel --signal=TERM --full JOBID`) cannot end in a save: srun kills the step at once
# ("training exited with 137").
#
# Exit codes: 75 from the step -> `scontrol requeue $SLURM_JOB_ID`, exit 0 (the requeued job
# resumes from the newest checkpoint: --resume auto is the trainer's default). Anything else is
# passed through.

# ------------------------------------------------------------------------------------------------
# paths and settings

patchrec_log() { echo "[patchrec $(date '+%F %T')] $*" >&2; }

patchrec_die() { patchrec_log "ERROR: $*"; exit 2; }

# The repository: the folder above this file (the sbatch scripts find this file first).
patchrec_find_repo() {
    (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
}

# Sets and exports: PATCHREC_REPO, PYTHON, PATCHREC_CPU, DS_ACCELERATOR (CPU mode),
# NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT.
patchrec_setup_env() {
    PATCHREC_REPO=$(patchrec_find_repo)
    export PATCHREC_REPO
    if [[ -z ${PYTHON:-} ]]; then
        if [[ -x $PATCHREC_REPO/.venv/bin/python ]]; then PYTHON=$PATCHREC_REPO/.venv/bin/python; else PYTHON=python3; fi
    fi
    export PYTHON

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

    # Not MASTER_ADDR/MASTER_PORT from the environment: sbatch exports the submitting shell's,
    # which may be stale. Overrides: PATCHREC_MASTER_ADDR, PATCHREC_MASTER_PORT.
    if [[ -n ${PATCHREC_MASTER_ADDR:-} ]]; then
        MASTER_ADDR=$PATCHREC_MASTER_ADDR
    elif [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    else
        MASTER_ADDR=127.0.0.1
    fi
    # Same job id (also after a requeue) -> same port; spread over 20000-39999.
    MASTER_PORT=${PATCHREC_MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-$$} % 20000))}
    export MASTER_ADDR MASTER_PORT
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
# waiting on a child while traps fire

# patchrec_wait PID: wait until PID ended (a trapped signal interrupts `wait`: wait again);
# sets PATCHREC_RC to its exit status.
patchrec_wait() {
    local pid=$1
    while :; do
        _PATCHREC_TRAPPED=0
        wait "$pid"
        PATCHREC_RC=$?
        [[ $_PATCHREC_TRAPPED == 1 ]] || break
    done
}

# ------------------------------------------------------------------------------------------------
# per node (run by srun): DeepSpeed's launcher for this node's ranks

_patchrec_to_ranks() {  # send signal $1 to the rank processes (children of the launcher)
    _PATCHREC_TRAPPED=1
    local sig=$1 pids
    mapfile -t pids < <(pgrep -P "$_PATCHREC_LAUNCH_PID" 2>/dev/null || ps -o pid= --ppid "$_PATCHREC_LAUNCH_PID" 2>/dev/null | tr -d " ")
    patchrec_log "node ${SLURM_NODEID:-0}: SIG$sig -> ranks ${pids[*]}"
    ((${#pids[@]})) && kill -s "$sig" "${pids[@]}" 2>/dev/null
    return 0
}

# `python -m deepspeed.launcher.launch ARGS` with its SIGTERM handler left out. DeepSpeed's launcher
# answers SIGTERM with SIGTERM to the ranks, SIGKILL 30 s later and exit 1, so a TERM to the job's
# steps (`scancel --signal=TERM JOBID`, a preemption) made the ranks save and the job fail anyway
# ("Main process received SIGTERM, exiting", "training exited with 1"). Here TERM does nothing to
# the launcher: the ranks get it themselves (SLURM signals every process of the step; the wrapper
# below forwards it too), save, exit 75, and the launcher exits 75. Its handler is a Python one,
# so the ranks it starts (exec) get the default TERM disposition, as before.
_PATCHREC_LAUNCH_PY='import runpy, signal, sys
signal.signal(signal.SIGTERM, lambda *_: None)
_set = signal.signal
signal.signal = lambda sig, handler: signal.getsignal(sig) if sig == signal.SIGTERM else _set(sig, handler)
runpy.run_module("deepspeed.launcher.launch", run_name="__main__", alter_sys=True)'

# patchrec_node_main SCRIPT ARGS...: start NPROC_PER_NODE ranks of SCRIPT on this node.
patchrec_node_main() {
    local script=$1; shift
    local node_rank=${SLURM_NODEID:-0} nnodes=${SLURM_NNODES:-1} nproc=${NPROC_PER_NODE:?} ids i json world_info
    # This node's device ids: SLURM's CUDA_VISIBLE_DEVICES when it names enough, else 0..n-1
    # (the launcher sets CUDA_VISIBLE_DEVICES from them; LOCAL_RANK counts from 0 either way).
    ids=$(seq -s, 0 $((nproc - 1)))
    if [[ ${PATCHREC_CPU:-0} != 1 && -n ${CUDA_VISIBLE_DEVICES:-} ]] &&
        (($(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES") >= nproc)); then
        ids=$(cut -d, -f1-"$nproc" <<<"$CUDA_VISIBLE_DEVICES")
    fi
    json="{"
    for ((i = 0; i < nnodes; i++)); do
        ((i > 0)) && json+=", "
        if ((i == node_rank)); then json+="\"node$i\": [$ids]"; else json+="\"node$i\": [$(seq -s, 0 $((nproc - 1)))]"; fi
    done
    json+="}"
    world_info=$(printf '%s' "$json" | base64 -w0 | tr '+/' '-_')
    patchrec_log "node $node_rank/$nnodes on $(hostname): $nproc ranks, master $MASTER_ADDR:$MASTER_PORT"
    # USR1 ignored for the launcher (no handler of its own: it would die); ranks install theirs.
    # TERM does nothing to it either (_PATCHREC_LAUNCH_PY): the ranks save and exit 75 on it.
    (
        trap '' USR1
        exec "$PYTHON" -u -c "$_PATCHREC_LAUNCH_PY" --world_info="$world_info" --node_rank="$node_rank" \
            --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$script" "$@"
    ) &
    _PATCHREC_LAUNCH_PID=$!
    trap '_patchrec_to_ranks USR1' USR1
    trap '_patchrec_to_ranks TERM' TERM
    patchrec_wait "$_PATCHREC_LAUNCH_PID"
    patchrec_log "node $node_rank: launcher exited with $PATCHREC_RC"
    return "$PATCHREC_RC"
}

# ------------------------------------------------------------------------------------------------
# batch shell

_patchrec_to_step() {  # forward a stop request to the step (srun passes USR1 on to every process)
    _PATCHREC_TRAPPED=1
    patchrec_log "batch shell got SIG$1: asking the ranks to save and stop (USR1 via srun)"
    kill -s USR1 "$_PATCHREC_SRUN_PID" 2>/dev/null || true
}

# patchrec_run_job SCRIPT DEFAULT_OUTPUT [LAUNCHER ARGS...]: the body of an sbatch script.
patchrec_run_job() {
    local script=$1 default_output=$2
    shift 2
    patchrec_setup_env
    patchrec_train_args "$default_output"
    PATCHREC_ARGS+=("$@")
    local nnodes=${SLURM_NNODES:-1} srun_args
    patchrec_log "job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-$(hostname)}:" \
        "$nnodes node(s) x $NPROC_PER_NODE ranks, world $((nnodes * NPROC_PER_NODE)), cpu mode $PATCHREC_CPU"
    patchrec_log "launch: $script ${PATCHREC_ARGS[*]}"
    if [[ -z ${SLURM_JOB_ID:-} ]]; then  # not under SLURM (bash slurm/pretrain.sh): just this node
        patchrec_node_main "$PATCHREC_REPO/$script" "${PATCHREC_ARGS[@]}"
        return
    fi
    srun_args=(--nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=0)
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    srun "${srun_args[@]}" bash "$PATCHREC_REPO/slurm/common.sh" node "$PATCHREC_REPO/$script" "${PATCHREC_ARGS[@]}" &
    _PATCHREC_SRUN_PID=$!
    trap '_patchrec_to_step USR1' USR1
    trap '_patchrec_to_step TERM' TERM
    patchrec_wait "$_PATCHREC_SRUN_PID"
    local rc=$PATCHREC_RC
    if ((rc == 75)); then
        if ((${SLURM_RESTART_COUNT:-0} >= ${PATCHREC_MAX_REQUEUES:-100})); then
            patchrec_log "stopped at a checkpoint (exit 75); not requeued: ${SLURM_RESTART_COUNT} restarts already"
            return 75
        fi
        patchrec_log "stopped at a checkpoint (exit 75): scontrol requeue $SLURM_JOB_ID (resumes from it)"
        scontrol requeue "$SLURM_JOB_ID" || { patchrec_log "scontrol requeue failed"; return 75; }
        return 0
    fi
    patchrec_log "training exited with $rc"
    return "$rc"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then  # executed, not sourced
    set -uo pipefail
    case ${1:-} in
        node) shift; patchrec_node_main "$@"; exit $? ;;
        *) echo "usage: bash slurm/common.sh node SCRIPT ARGS... (run by srun; sbatch slurm/pretrain.sh instead)" >&2; exit 2 ;;
    esac
fi
