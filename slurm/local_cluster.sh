#!/usr/bin/env bash
# A real SLURM cluster on this machine, from Debian's packages (munge, slurmctld, slurmd,
# slurm-client; 22.05 on bookworm), for the tests and for trying the sbatch scripts.
#
#   slurm/local_cluster.sh [start]              one node: this host (install if needed, configure, start)
#   slurm/local_cluster.sh --nodes 2 [--private-scratch] [--s3]
#                                               N compute nodes node1..nodeN, each a network namespace
#   slurm/local_cluster.sh stop                 stop what this script started, remove what it made
#   slurm/local_cluster.sh restart [OPTIONS]    stop, then start with a freshly written slurm.conf
#   slurm/local_cluster.sh status               sinfo (and the S3 endpoint), or exit 1 if no answer
#   slurm/local_cluster.sh kill-node NODE       SIGKILL every process of a namespace node (its slurmd
#                                               and its jobs' tasks): a node failure
#   slurm/local_cluster.sh start-node NODE      start that node's slurmd again (the node comes back
#                                               empty: its old jobs are over)
#
# One node (the default): slurmctld and slurmd run on this host, NodeName=$(hostname).
#
# N nodes: slurmctld and munged stay on this host; node K is a network namespace patchrec-nodeK
# with a veth on the bridge patchrec-br0 (10.77.0.1 on the host, 10.77.0.(10+K) on the node), an
# /etc/hosts line (tagged "# patchrec-local-cluster"), its own hostname (a UTS namespace) and its
# own `slurmd -N nodeK` (per-node spool, pid and log files: %n in slurm.conf). What this needed:
# SlurmctldHost=<this host>(10.77.0.1) (another name is refused as "not a valid controller");
# slurmd entered with `nsenter --net=/run/netns/NAME` (`ip netns exec` remounts /sys and slurmd
# then fails: "No filesystem mounted on /sys/fs/cgroup"); the node's hostname resolving to its
# own address, since gloo binds to the address of the hostname. Traffic stays on the bridge and
# loopback: nothing is routed off this machine (no forwarding, no NAT).
#   --private-scratch  each node also gets a mount namespace with its own /tmp and its own
#                      ~/.cache/patchrec_dist/staging (under /var/lib/patchrec-cluster/nodeK), so
#                      nodes share no scratch disk and checkpoints travel through S3 (the usual
#                      cloud set-up). The repository (also one under /tmp), its .venv and
#                      /var/tmp stay shared.
#   --s3               a moto S3 server every node reaches: http://10.77.0.1:9077 (one node:
#                      http://127.0.0.1:9077); `status` prints it, and so does
#                      /run/patchrec-cluster/s3_endpoint.
# Running it again with other options reconfigures the cluster (the controller's job state is
# cleared then). A controller that answers but was not started by this script is left alone.
#
# Needs root (apt-get, /etc, namespaces, daemons running as root: SlurmUser=root, no systemd
# needed). No accounting database: sacct does not work here; use `scontrol show job ID`
# (Restarts=, JobState=) and the job's log instead.
#
# Environment: SLURM_LOCAL_WAIT_S (default 90) bounds the wait for the nodes to become idle;
# SLURM_LOCAL_MEM_MARGIN_MB (default 1024) is kept out of RealMemory; SLURM_LOCAL_PARTITION
# (default "local") names the one default partition; SLURM_LOCAL_CRED_EXPIRE_S (default 15) is
# AuthInfo=cred_expire, which is also the delay before a requeued job may start again;
# SLURM_LOCAL_CPUS_PER_NODE (N nodes; default: this host's cores / N, at least 1);
# SLURM_LOCAL_S3_PORT (default 9077).
set -euo pipefail

ACTION=start
case ${1:-} in
    start | stop | restart | status | kill-node | start-node) ACTION=$1; shift ;;
esac
NODES=1
PRIVATE=0
S3=0
NODE_ARG=
while (($#)); do
    case $1 in
        --nodes) NODES=${2:?--nodes needs a number}; shift 2 ;;
        --nodes=*) NODES=${1#--nodes=}; shift ;;
        --private-scratch) PRIVATE=1; shift ;;
        --s3) S3=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "local_cluster: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) NODE_ARG=$1; shift ;;
    esac
done
[[ $NODES =~ ^[1-9][0-9]*$ ]] || { echo "local_cluster: --nodes must be a positive integer, got '$NODES'" >&2; exit 2; }
((NODES <= 200)) || { echo "local_cluster: --nodes $NODES: at most 200 (one /24 on the bridge)" >&2; exit 2; }
if ((NODES == 1 && PRIVATE)); then
    echo "local_cluster: --private-scratch needs --nodes 2 or more (one node is this host)" >&2; exit 2
fi

WAIT_S=${SLURM_LOCAL_WAIT_S:-90}
MEM_MARGIN_MB=${SLURM_LOCAL_MEM_MARGIN_MB:-1024}
PARTITION=${SLURM_LOCAL_PARTITION:-local}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
CRED_EXPIRE_S=${SLURM_LOCAL_CRED_EXPIRE_S:-15}
S3_PORT=${SLURM_LOCAL_S3_PORT:-9077}
# What this script made, so that `stop` removes exactly that.
OWN_DIR=/run/patchrec-cluster
MODE_FILE=$OWN_DIR/mode
NODE_ROOT=/var/lib/patchrec-cluster
BRIDGE=patchrec-br0
NET_PREFIX=10.77.0
HOST_ADDR=$NET_PREFIX.1
HOSTS_TAG="# patchrec-local-cluster"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { echo "local_cluster: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

answers() { command -v sinfo >/dev/null 2>&1 && timeout 10 sinfo -h >/dev/null 2>&1; }

stop_pidfile() {  # stop the daemon whose pid is in $1 (only that pid), wait up to 15 s
    local pidfile=$1 name=$2 pid
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        log "stopping $name (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$pidfile"
}

install_packages() {
    local missing=()
    command -v munged >/dev/null 2>&1 || missing+=(munge)
    command -v slurmctld >/dev/null 2>&1 || missing+=(slurmctld)
    command -v slurmd >/dev/null 2>&1 || missing+=(slurmd)
    command -v sbatch >/dev/null 2>&1 || missing+=(slurm-client)
    command -v ip >/dev/null 2>&1 || missing+=(iproute2)           # --nodes N: namespaces, veths, a bridge
    command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)    # nsenter, unshare
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]} (apt-get)"
    # No init system here: keep the packages' postinst from starting daemons (we start them).
    local made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
    ((made_policy)) && rm -f /usr/sbin/policy-rc.d
    return 0
}

start_munge() {
    if [[ -f /run/munge/munged.pid ]] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
        return 0
    fi
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    local user=root
    id munge >/dev/null 2>&1 && user=munge
    chown "$user:" /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    chmod 0400 /etc/munge/munge.key
    log "starting munged (as $user)"
    if [[ $user == root ]]; then
        munged --force
    else
        runuser -u munge -- munged --force
    fi
    for _ in $(seq 1 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "munged does not answer (see /var/log/munge/munged.log)"
}

# ------------------------------------------------------------------------------------------------
# the nodes: names, addresses, namespaces

node_names() { local k; for ((k = 1; k <= $1; k++)); do echo "node$k"; done; }
node_index() { [[ $1 =~ ^node([1-9][0-9]*)$ ]] || die "no such node '$1' (node1, node2, ...)"; echo "${BASH_REMATCH[1]}"; }
node_addr() { echo "$NET_PREFIX.$((10 + $(node_index "$1")))"; }
node_netns() { echo "patchrec-$1"; }
node_pidfile() { echo "$RUN_DIR/slurmd-$1.pid"; }

# The mode the running cluster was started with ("nodes=N private=P s3=S"), empty if none.
running_mode() { cat "$MODE_FILE" 2>/dev/null || true; }
# With private scratch the nodes see the repository of the script that started them (see
# start_node): another checkout reconfigures.
wanted_mode() {
    local mode="nodes=$NODES private=$PRIVATE s3=$S3"
    ((PRIVATE)) && mode+=" repo=$REPO"
    echo "$mode"
}
mode_value() { sed -n "s/.*$1=\([0-9]*\).*/\1/p" <<<"$(running_mode)"; }

setup_network() {  # the bridge, and a namespace with a veth and an /etc/hosts line per node
    local n=$1 name ns addr veth
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$HOST_ADDR/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    for name in $(node_names "$n"); do
        ns=$(node_netns "$name") addr=$(node_addr "$name") veth=prc-$name
        if [[ ! -e /run/netns/$ns ]]; then
            ip netns add "$ns"
            ip link add "$veth" type veth peer name eth0 netns "$ns"
            ip link set "$veth" master "$BRIDGE" up
            ip -n "$ns" addr add "$addr/24" dev eth0
            ip -n "$ns" link set eth0 up
            ip -n "$ns" link set lo up
        fi
        grep -q "^$addr $name $HOSTS_TAG\$" /etc/hosts || echo "$addr $name $HOSTS_TAG" >>/etc/hosts
    done
}

remove_network() {
    local ns kept
    for ns in /run/netns/patchrec-node*; do
        [[ -e $ns ]] || continue
        kill_namespace "$(basename "$ns")"
        ip netns del "$(basename "$ns")" 2>/dev/null || true
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
    if grep -q "$HOSTS_TAG\$" /etc/hosts; then
        # /etc/hosts may be a bind mount: rewrite it in place, never replace the file
        kept=$(grep -v "$HOSTS_TAG\$" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
    return 0
}

namespace_pids() {  # every process whose network namespace is /run/netns/$1
    local want pid
    want=$(stat -L -c %i "/run/netns/$1" 2>/dev/null) || return 0
    for pid in /proc/[0-9]*; do
        [[ $(stat -L -c %i "$pid/ns/net" 2>/dev/null) == "$want" ]] && echo "${pid#/proc/}"
    done
    return 0
}

kill_namespace() {
    local pids
    mapfile -t pids < <(namespace_pids "$1")
    ((${#pids[@]})) && kill -9 "${pids[@]}" 2>/dev/null
    return 0
}

start_node() {  # slurmd -N NAME inside its namespaces (net; UTS; mount with --private-scratch)
    local name=$1 ns scratch mounts=""
    ns=$(node_netns "$name")
    [[ -e /run/netns/$ns ]] || die "node $name has no namespace (start the cluster with --nodes first)"
    scratch=$NODE_ROOT/$name
    mkdir -p "$SPOOL_DIR/$name" "$scratch/tmp" "$scratch/staging"
    chmod 1777 "$scratch/tmp"
    if [[ $(mode_value private) == 1 ]]; then
        mkdir -p "$HOME/.cache/patchrec_dist/staging"
        # A repository under /tmp (a CI clone) stays visible on the node: bound into its private
        # /tmp at the same path before that /tmp covers the host's.
        if [[ $REPO == /tmp/* ]]; then
            mkdir -p "$scratch$REPO"
            mounts="mount --bind $REPO $scratch$REPO && "
        fi
        mounts+="mount --rbind $scratch/tmp /tmp && mount --bind $scratch/staging $HOME/.cache/patchrec_dist/staging && "
    fi
    log "starting slurmd on $name ($(node_addr "$name"), namespace $ns${mounts:+, private /tmp and staging})"
    nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private \
        sh -c "hostname $name && ${mounts}exec slurmd -f $CONF -N $name" ||
        die "slurmd did not start on $name (see $LOG_DIR/slurmd-$name.log)"
}

# ------------------------------------------------------------------------------------------------
# S3 (moto) on the bridge address

start_s3() {
    local addr=127.0.0.1 exe
    (($(mode_value nodes) > 1)) && addr=$HOST_ADDR
    exe=$REPO/.venv/bin/moto_server
    [[ -x $exe ]] || exe=$(command -v moto_server) || die "--s3: moto_server not found (make setup installs it into .venv)"
    log "starting moto S3 on $addr:$S3_PORT"
    setsid "$exe" -H "$addr" -p "$S3_PORT" >"$LOG_DIR/moto.log" 2>&1 </dev/null &
    echo $! >"$OWN_DIR/moto.pid"
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/$addr/$S3_PORT") 2>/dev/null; then
            echo "http://$addr:$S3_PORT" >"$OWN_DIR/s3_endpoint"
            return 0
        fi
        sleep 0.2
    done
    die "moto S3 did not start on $addr:$S3_PORT (see $LOG_DIR/moto.log)"
}

# ------------------------------------------------------------------------------------------------
# configuration, start, stop

write_conf() {
    local n=$1 host cpus mem_total mem ctl_host spool pidfile logfile nodes_conf partition_nodes name
    host=$(hostname)
    mem_total=$(free -m | awk '/^Mem:/ {print $2}')
    mem=$((mem_total - MEM_MARGIN_MB))
    ((mem > 256)) || mem=$((mem_total / 2))
    mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
    chmod 0755 "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR"
    if ((n == 1)); then
        cpus=$(nproc --all)
        ctl_host=$host spool=$SPOOL_DIR pidfile=$RUN_DIR/slurmd.pid logfile=$LOG_DIR/slurmd.log
        nodes_conf="NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN"
        partition_nodes=$host
    else
        cpus=${SLURM_LOCAL_CPUS_PER_NODE:-$(($(nproc --all) / n))}
        ((cpus >= 1)) || cpus=1
        mem=$((mem / n))
        ctl_host="$host($HOST_ADDR)" spool=$SPOOL_DIR/%n pidfile=$RUN_DIR/slurmd-%n.pid logfile=$LOG_DIR/slurmd-%n.log
        nodes_conf=""
        for name in $(node_names "$n"); do
            nodes_conf+="NodeName=$name NodeAddr=$(node_addr "$name") CPUs=$cpus RealMemory=$mem State=UNKNOWN"$'\n'
        done
        partition_nodes="node[1-$n]"
    fi
    cat >"$CONF" <<CONF
# Written by slurm/local_cluster.sh: a test cluster of $n node(s).
ClusterName=patchrec-local
SlurmctldHost=$ctl_host
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default
# 120 s); shorter here so that a job stopped at a checkpoint resumes quickly.
AuthInfo=cred_expire=$CRED_EXPIRE_S
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$spool
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$pidfile
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$logfile
SlurmctldDebug=info
SlurmdDebug=info
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
# Fast turnaround for tests: a finished job's record stays 5 min for scontrol show job.
MinJobAge=300
KillWait=30
# SlurmdTimeout stays at SLURM's default (300 s): a dead node is noticed by the job itself
# (patchrec_dist/launch.py), not by waiting for the controller to mark it down.
$nodes_conf
PartitionName=$PARTITION Nodes=$partition_nodes Default=YES MaxTime=INFINITE State=UP
CONF
    log "wrote $CONF ($n node(s), CPUs=$cpus RealMemory=$mem per node)"
}

wait_idle() {
    local nodes=("$@") deadline state name pending=()
    deadline=$((SECONDS + WAIT_S))
    while ((SECONDS < deadline)); do
        pending=()
        for name in "${nodes[@]}"; do
            state=$(timeout 10 sinfo -h -n "$name" -o '%T' 2>/dev/null | head -n1 || true)
            case $state in
                idle | mixed | allocated | completing) ;;
                down* | drain*)  # e.g. after an unclean restart: put it back
                    timeout 10 scontrol update NodeName="$name" State=RESUME >/dev/null 2>&1 || true
                    pending+=("$name") ;;
                *) pending+=("$name") ;;
            esac
        done
        if ((${#pending[@]} == 0)); then
            log "node(s) ${nodes[*]} up"
            return 0
        fi
        sleep 0.5
    done
    log "not up: ${pending[*]} (last state '${state:-no answer}')"
    tail -n 20 "$LOG_DIR/slurmctld.log" >&2 2>/dev/null || true
    die "node(s) ${pending[*]} not idle after ${WAIT_S}s (logs in $LOG_DIR)"
}

do_stop() {
    local pidfile
    for pidfile in "$RUN_DIR"/slurmd-node*.pid; do
        [[ -e $pidfile ]] && stop_pidfile "$pidfile" "slurmd ($(basename "$pidfile" .pid))"
    done
    stop_pidfile $RUN_DIR/slurmd.pid slurmd
    stop_pidfile $RUN_DIR/slurmctld.pid slurmctld
    stop_pidfile "$OWN_DIR/moto.pid" "moto S3"
    remove_network  # and whatever still runs in the nodes' namespaces (their jobs' tasks)
    stop_pidfile /run/munge/munged.pid munged
    rm -rf "$OWN_DIR" "$NODE_ROOT"  # the nodes' private scratch
    log "stopped"
}

do_start() {
    local mode name names
    mode=$(running_mode)
    if answers; then
        if [[ -z $mode ]]; then
            log "sinfo answers: a cluster not started by this script is up; leaving it alone"
            return 0
        fi
        if [[ $mode == "$(wanted_mode)" ]]; then
            log "cluster already up ($mode)"
            start_dead_nodes
            return 0
        fi
        log "cluster up as '$mode': reconfiguring to '$(wanted_mode)'"
    fi
    [[ $(id -u) == 0 ]] || die "must run as root (installs packages, writes /etc/slurm, starts daemons)"
    install_packages
    # Stale or differently configured daemons from an earlier start: stop them, then start fresh.
    if [[ -n $mode || -e $RUN_DIR/slurmd.pid || -e $RUN_DIR/slurmctld.pid ]]; then do_stop; fi
    start_munge
    mkdir -p "$OWN_DIR"
    write_conf "$NODES"
    wanted_mode >"$MODE_FILE"
    log "starting slurmctld"
    # -c: no job state from a cluster of another shape (its nodes may not exist any more)
    slurmctld -c -f "$CONF" || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
    if ((NODES == 1)); then
        slurmd -f "$CONF" || die "slurmd did not start (see $LOG_DIR/slurmd.log)"
        wait_idle "$(hostname)"
    else
        setup_network "$NODES"
        for name in $(node_names "$NODES"); do start_node "$name"; done
        mapfile -t names < <(node_names "$NODES")
        wait_idle "${names[@]}"
    fi
    if ((S3)); then start_s3; fi
    return 0
}

start_dead_nodes() {  # a namespace node whose slurmd is gone (kill-node, a crash): start it again
    local name pid
    (($(mode_value nodes) > 1)) || return 0
    for name in $(node_names "$(mode_value nodes)"); do
        pid=$(cat "$(node_pidfile "$name")" 2>/dev/null || true)
        if [[ -z $pid ]] || ! kill -0 "$pid" 2>/dev/null; then
            start_node "$name"
            wait_idle "$name"
        fi
    done
}

do_status() {
    answers || { log "no answer from slurmctld"; exit 1; }
    sinfo -N
    [[ -n $(running_mode) ]] && echo "mode: $(running_mode)"
    [[ -f $OWN_DIR/s3_endpoint ]] && echo "s3: $(cat "$OWN_DIR/s3_endpoint")"
    return 0
}

case $ACTION in
    start) do_start ;;
    stop) do_stop ;;
    restart) do_stop; do_start ;;
    status) do_status ;;
    kill-node)
        [[ -n $NODE_ARG ]] || die "usage: $0 kill-node NODE"
        ns=$(node_netns "$NODE_ARG")
        [[ -e /run/netns/$ns ]] || die "no namespace node '$NODE_ARG'"
        mapfile -t pids < <(namespace_pids "$ns")
        log "kill-node $NODE_ARG: SIGKILL to ${#pids[@]} process(es): ${pids[*]}"
        kill_namespace "$ns"
        rm -f "$(node_pidfile "$NODE_ARG")" ;;
    start-node)
        [[ -n $NODE_ARG ]] || die "usage: $0 start-node NODE"
        # A restarted node runs none of its old jobs: say so (DOWN, then RESUME in wait_idle), as a
        # node's reboot does. Otherwise the controller keeps a job killed on it COMPLETING until it
        # resends TERMINATE_JOB (84 s measured here), and a requeued job waits that long.
        timeout 10 scontrol update NodeName="$NODE_ARG" State=DOWN Reason="restarted by local_cluster.sh" ||
            true
        start_node "$NODE_ARG"
        wait_idle "$NODE_ARG" ;;
esac
