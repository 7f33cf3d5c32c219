#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, from Debian's packages (munge, slurmctld,
# slurmd, slurm-client; 22.05 on bookworm), for the tests and for trying the sbatch scripts.
#
#   slurm/local_cluster.sh          install if needed, configure, start; wait until the node is idle
#   slurm/local_cluster.sh stop     stop slurmd, slurmctld and munged (started by this script)
#   slurm/local_cluster.sh restart  stop, then start with a freshly written slurm.conf
#   slurm/local_cluster.sh status   sinfo, or exit 1 if the controller does not answer
#
# Idempotent: does nothing when `sinfo` already answers. Needs root (apt-get, /etc, daemons
# running as root: SlurmUser=root, no systemd needed). No accounting database: sacct does not
# work here; use `scontrol show job ID` (Restarts=, JobState=) and the job's log instead.
#
# Environment: SLURM_LOCAL_WAIT_S (default 90) bounds the wait for the node to become idle;
# SLURM_LOCAL_MEM_MARGIN_MB (default 1024) is kept out of RealMemory; SLURM_LOCAL_PARTITION
# (default "local") names the one default partition; SLURM_LOCAL_CRED_EXPIRE_S (default 15) is
# AuthInfo=cred_expire, which is also the delay before a requeued job may start again.
set -euo pipefail

ACTION=${1:-start}
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

do_stop() {
    stop_pidfile $RUN_DIR/slurmd.pid slurmd
    stop_pidfile $RUN_DIR/slurmctld.pid slurmctld
    stop_pidfile /run/munge/munged.pid munged
    log "stopped"
}

install_packages() {
    local missing=()
    command -v munged >/dev/null 2>&1 || missing+=(munge)
    command -v slurmctld >/dev/null 2>&1 || missing+=(slurmctld)
    command -v slurmd >/dev/null 2>&1 || missing+=(slurmd)
    command -v sbatch >/dev/null 2>&1 || missing+=(slurm-client)
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

write_conf() {
    local host cpus mem_total mem
    host=$(hostname)
    cpus=$(nproc --all)
    mem_total=$(free -m | awk '/^Mem:/ {print $2}')
    mem=$((mem_total - MEM_MARGIN_MB))
    ((mem > 256)) || mem=$((mem_total / 2))
    mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
    chmod 0755 "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR"
    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: a single-node test cluster.
ClusterName=patchrec-local
SlurmctldHost=$host
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
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
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
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    log "wrote $CONF (NodeName=$host CPUs=$cpus RealMemory=$mem)"
}

wait_idle() {
    local host deadline state
    host=$(hostname)
    deadline=$((SECONDS + WAIT_S))
    while ((SECONDS < deadline)); do
        state=$(timeout 10 sinfo -h -n "$host" -o '%T' 2>/dev/null | head -n1 || true)
        case $state in
            idle | mixed | allocated | completing) log "node $host is $state"; return 0 ;;
            down* | drain*)  # e.g. after an unclean restart: put it back
                timeout 10 scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    log "last sinfo state: '${state:-no answer}'"
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 2>/dev/null || true
    die "node $host not idle after ${WAIT_S}s (logs in $LOG_DIR)"
}

do_start() {
    if answers; then
        log "sinfo answers: cluster already up"
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "must run as root (installs packages, writes /etc/slurm, starts daemons)"
    install_packages
    start_munge
    write_conf
    # Stale daemons from an earlier start (e.g. controller died): stop them, then start fresh.
    stop_pidfile $RUN_DIR/slurmd.pid slurmd
    stop_pidfile $RUN_DIR/slurmctld.pid slurmctld
    log "starting slurmctld and slurmd"
    slurmctld -f "$CONF" || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
    slurmd -f "$CONF" || die "slurmd did not start (see $LOG_DIR/slurmd.log)"
    wait_idle
}

case $ACTION in
    start) do_start ;;
    stop) do_stop ;;
    restart) do_stop; do_start ;;
    status)
        if answers; then sinfo; else log "no answer from slurmctld"; exit 1; fi ;;
    *) die "usage: $0 [start|stop|status]" ;;
esac
