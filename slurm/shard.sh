#!/usr/bin/env bash
# tools/shard_histories.py --engine ray on a SLURM allocation: `sbatch --nodes=4 slurm/shard.sh`.
#
#SBATCH --job-name=patchrec-shard
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%j.out
#
# Every #SBATCH line above is a default: sbatch flags win (`sbatch --nodes=4 --cpus-per-task=16
# --exclusive slurm/shard.sh`; --exclusive keeps other jobs' Ray off the nodes and their ports).
# The log goes to logs/ under the submit directory: create it first (`mkdir -p logs`) or pass
# --output.
#
# What the job does (docs/sharding_at_scale.md, "On a SLURM allocation"):
#   1. a Ray head on the allocation's first node (an srun step, `ray start --head --block`), then
#      a Ray worker on every other node (one srun step, one task per node, `ray start --block`);
#      each node advertises its own address (that of its hostname, or of RAY_IFACE);
#   2. waits until every node joined (at most RAY_WAIT_S; the job fails with status 1 otherwise);
#   3. runs `python tools/shard_histories.py --engine ray --engine-address HEAD_IP:RAY_PORT
#      SHARD_ARGS...` here, in the batch shell on the first node (the driver);
#   4. stops Ray on every node (SIGTERM to the job's steps, which are the Ray nodes only; SIGKILL
#      after RAY_STOP_S), also when the tool or Ray's start failed. The job's exit status is the
#      tool's (0 done, 1 the engine failed, 2 bad input or flags; 1 if Ray did not start).
# A TERM to the batch shell (`scancel --batch --signal=TERM JOBID`) is passed to the tool as SIGINT:
# it stops, removes what it wrote (staging folder, shards; no manifest) and exits 130; then Ray is
# stopped. SLURM logs the Ray steps as CANCELLED when they are stopped: that is the normal end.
#
# Environment (sbatch exports the submitting shell's environment):
#   SHARD_ARGS        flags for tools/shard_histories.py (required, whitespace-separated, no quoting;
#                     also: arguments after the script name), e.g. "--format table --input
#                     s3://bucket/logs/log.parquet --items s3://bucket/logs/items.parquet
#                     --user-col user --item-col item --time-col ts --output s3://bucket/ds/mylog"
#   RAY_PORT          the head's port (default 6379)
#   RAY_CPUS_PER_NODE CPUs each worker node gives Ray (default: --cpus-per-task, else the CPUs the
#                     job has on the first node)
#   RAY_HEAD_CPUS     CPUs the head gives Ray (default RAY_CPUS_PER_NODE - 1, at least 1: the
#                     driver runs on the head)
#   RAY_IFACE         network interface whose IPv4 address every node advertises (default: the
#                     address of the node's hostname, else the first of `hostname -I`)
#   RAY_START_ARGS    more `ray start` flags for every node (--object-store-memory, --temp-dir, ...)
#   RAY_WAIT_S        bound on the wait for the head, and then for every node to join (default 120)
#   RAY_STOP_S        how long Ray may take to stop after SIGTERM before it is killed (default 30)
#   PYTHON            interpreter (default .venv/bin/python of the repository, else python3); the
#                     `ray` command is the one beside it (else the one on PATH). The same Python
#                     environment must be installed on every node.
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, PATCHREC_S3_ENDPOINT
#                     read by the tool from the environment (never from flags); it hands them to
#                     its Ray tasks (docs/sharding_at_scale.md, "Storage options").

set -uo pipefail
for _dir in "${PATCHREC_REPO:-}" "$(dirname "$0")/.." \
    "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n1)")/.." \
    "${SLURM_SUBMIT_DIR:-.}" .; do
    [[ -n $_dir && -f $_dir/slurm/common.sh ]] && break
done
[[ -f $_dir/slurm/common.sh ]] || { echo "cannot find slurm/common.sh: set PATCHREC_REPO" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$_dir/slurm/common.sh"

# No patchrec_setup_env: sharding needs no GPU and no ranks, only the interpreter and the package.
PATCHREC_REPO=$(patchrec_find_repo)
export PATCHREC_REPO
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $PATCHREC_REPO/.venv/bin/python ]]; then PYTHON=$PATCHREC_REPO/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON PYTHONUNBUFFERED=1
export PYTHONPATH=$PATCHREC_REPO${PYTHONPATH:+:$PYTHONPATH}
PATCHREC_RAY=$(dirname "$(command -v "$PYTHON")")/ray
[[ -x $PATCHREC_RAY ]] || PATCHREC_RAY=$(command -v ray) ||
    patchrec_die "no ray command beside $PYTHON or on PATH (pip install 'patchrec_dist[ray]')"
export PATCHREC_RAY
# Ray's SIGTERM handler first drains the node (up to 30 s): nothing to drain when the job is over.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}

[[ -n ${SLURM_JOB_ID:-} ]] || patchrec_die "run it with sbatch (sbatch --nodes=N slurm/shard.sh)"
args=()
[[ -n ${SHARD_ARGS:-} ]] && read -r -a args <<<"$SHARD_ARGS"
args+=("$@")
((${#args[@]})) || patchrec_die "SHARD_ARGS is not set (the flags of tools/shard_histories.py: --format, --input, --output, ...)"
RAY_PORT=${RAY_PORT:-6379}
RAY_CPUS_PER_NODE=${RAY_CPUS_PER_NODE:-${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}}
RAY_HEAD_CPUS=${RAY_HEAD_CPUS:-$((RAY_CPUS_PER_NODE > 1 ? RAY_CPUS_PER_NODE - 1 : 1))}
RAY_WAIT_S=${RAY_WAIT_S:-120}
RAY_STOP_S=${RAY_STOP_S:-30}
read -r -a ray_extra <<<"${RAY_START_ARGS:-}"
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
nnodes=${#nodes[@]}
head=${nodes[0]}

# This node's IPv4 address: RAY_IFACE's, else that of its hostname (not loopback: Debian maps the
# hostname to 127.0.1.1), else the first of `hostname -I`. Runs on every node (node_cmd below).
node_ip() {
    local ip=""
    if [[ -n ${RAY_IFACE:-} ]]; then
        ip=$(ip -4 -o addr show dev "$RAY_IFACE" 2>/dev/null | awk '{sub(/\/.*/, "", $4); print $4; exit}')
    else
        ip=$(getent ahostsv4 "$(hostname)" 2>/dev/null | awk '$1 !~ /^127\./ {print $1; exit}')
        [[ -n $ip ]] || ip=$(hostname -I 2>/dev/null | awk '{print $1}')
    fi
    [[ -n $ip ]] || { echo "shard.sh: no IPv4 address for $(hostname)${RAY_IFACE:+ on $RAY_IFACE}" >&2; return 1; }
    echo "$ip"
}

# An srun task: this node's Ray (`ray start --block` with the node's own address) until the job
# stops it with SIGTERM, which then counts as a normal end (status 0).
ray_node() {
    local ip pid rc stopping=0
    ip=$(node_ip) || return 2
    "$PATCHREC_RAY" start --block --node-ip-address="$ip" "$@" &
    pid=$!
    trap 'stopping=1; kill -TERM "$pid" 2>/dev/null' TERM
    while :; do  # a trapped signal interrupts `wait`: wait again until ray start is gone
        wait "$pid"
        rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    ((stopping)) && return 0
    return "$rc"
}
# what each srun task runs: these two functions, passed as the script of `bash -c`
node_cmd="$(declare -f node_ip ray_node)"$'\n''ray_node "$@"'
[[ -n ${RAY_IFACE:-} ]] && export RAY_IFACE

head_ip=$(node_ip) || exit 1  # the batch shell runs on the allocation's first node: the head
address=$head_ip:$RAY_PORT
step_args=(--overlap --ntasks-per-node=1 --kill-on-bad-exit=0)
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && step_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
step_pids=()
tool_pid=
rc=1

alive() { local p; for p in "$@"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }

stop_ray() {  # on exit, whatever happened: SIGTERM to the job's steps (the Ray nodes), then SIGKILL
    trap - EXIT
    if ((${#step_pids[@]})) && alive "${step_pids[@]}"; then
        patchrec_log "stopping Ray on ${nnodes} node(s) (SLURM logs its steps as CANCELLED)"
        # without --batch/--full, scancel signals the job's steps only, not this shell
        scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || kill -TERM "${step_pids[@]}" 2>/dev/null
        local deadline=$((SECONDS + RAY_STOP_S))
        while alive "${step_pids[@]}" && ((SECONDS < deadline)); do sleep 0.5; done
        if alive "${step_pids[@]}"; then
            patchrec_log "Ray still running ${RAY_STOP_S}s after SIGTERM: killing its steps"
            kill -TERM "${step_pids[@]}" 2>/dev/null  # srun turns a TERM into SIGKILL for its step
        fi
        wait "${step_pids[@]}" 2>/dev/null
        patchrec_log "Ray stopped on every node"
    fi
    exit "$rc"
}
trap stop_ray EXIT
on_signal() {  # scancel --batch, a preemption: the tool stops (SIGINT: it removes its staging folder)
    patchrec_log "batch shell got SIG$1: stopping the tool, then Ray"
    if [[ -z $tool_pid ]]; then rc=1; exit 1; fi
    _SHARD_TRAPPED=1
    kill -INT "$tool_pid" 2>/dev/null
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

patchrec_log "job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: Ray head on $head ($address, $RAY_HEAD_CPUS CPU(s))," \
    "$((nnodes - 1)) worker node(s) ($RAY_CPUS_PER_NODE CPU(s) each)"
srun "${step_args[@]}" --nodes=1 --ntasks=1 -w "$head" --job-name=ray-head \
    bash -c "$node_cmd" ray_node --head --port="$RAY_PORT" --num-cpus="$RAY_HEAD_CPUS" \
    --include-dashboard=false --disable-usage-stats "${ray_extra[@]}" &
step_pids+=($!)

deadline=$((SECONDS + RAY_WAIT_S))
until (exec 3<>"/dev/tcp/$head_ip/$RAY_PORT") 2>/dev/null; do
    alive "${step_pids[@]}" || { patchrec_log "ERROR: the Ray head did not start (its output is above)"; exit 1; }
    ((SECONDS < deadline)) || { patchrec_log "ERROR: the Ray head does not answer on $address after ${RAY_WAIT_S}s"; exit 1; }
    sleep 0.5
done
if ((nnodes > 1)); then
    srun "${step_args[@]}" --nodes=$((nnodes - 1)) --ntasks=$((nnodes - 1)) --exclude="$head" --job-name=ray-workers \
        bash -c "$node_cmd" ray_node --address="$address" --num-cpus="$RAY_CPUS_PER_NODE" \
        --disable-usage-stats "${ray_extra[@]}" &
    step_pids+=($!)
fi

# Every node joined: the addresses Ray knows them by (one per node, as the tasks will reach them).
joined=$("$PYTHON" - "$address" "$nnodes" "$RAY_WAIT_S" <<'PY'
import sys
import time

import ray

address, want, wait_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + wait_s
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
while True:
    alive = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    if len(alive) >= want or time.monotonic() > deadline:
        break
    time.sleep(1)
print(" ".join(alive))
sys.exit(0 if len(alive) >= want else 1)
PY
)
joined_rc=$?
if ((joined_rc != 0)); then
    patchrec_log "ERROR: only ${joined:-no} node(s) joined the Ray cluster at $address within ${RAY_WAIT_S}s (of $nnodes)"
    exit 1
fi
patchrec_log "Ray: $nnodes node(s) joined at $address: $joined"

patchrec_log "shard_histories.py --engine ray --engine-address $address ${args[*]}"
# `trap - INT`: bash starts background commands with SIGINT ignored, and the tool's cleanup needs it
(trap - INT; exec "$PYTHON" -u "$PATCHREC_REPO/tools/shard_histories.py" --engine ray --engine-address "$address" "${args[@]}") &
tool_pid=$!
while :; do  # a trapped signal interrupts `wait`: wait again until the tool is gone
    _SHARD_TRAPPED=0
    wait "$tool_pid"
    rc=$?
    [[ $_SHARD_TRAPPED == 1 ]] && alive "$tool_pid" && continue
    break
done
tool_pid=
patchrec_log "shard_histories.py exited with $rc"
exit "$rc"
