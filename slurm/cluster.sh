#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for bookgen's tests (needs root).
#   bash slurm/cluster.sh install   # Debian packages: slurmctld slurmd slurm-client munge
#   bash slurm/cluster.sh start     # writes /etc/slurm/slurm.conf, starts munged, slurmctld, slurmd x2
#   bash slurm/cluster.sh stop
#   bash slurm/cluster.sh status
# Two slurmd daemons (node1, node2) on different ports act as two nodes (this Slurm build has
# MULTIPLE_SLURMD). CPUS_PER_NODE defaults to 1, so a 2-task job spans both "nodes".
set -euo pipefail

HOST=$(hostname -s)
CPUS_PER_NODE=${CPUS_PER_NODE:-1}
STATE=/var/spool/slurmctld
LOGS=/var/log/slurm

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    mkdir -p /etc/slurm "$STATE" "$LOGS" /var/spool/slurmd-node1 /var/spool/slurmd-node2
    cat >/etc/slurm/slurm.conf <<CONF
ClusterName=bookgen
SlurmctldHost=$HOST
AuthType=auth/munge
# a requeued job may start again after the credential lifetime (default 120 s): short for quick test requeues,
# long enough for a loaded machine to launch a job step with it
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation=$STATE
SlurmctldPidFile=/run/slurmctld.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmdLogFile=$LOGS/slurmd-%n.log
ReturnToService=2
KillWait=10
MinJobAge=300
JobRequeue=1
# a requeued job becomes eligible after the credential lifetime, and only a scheduling pass starts it
# (every 30 s by default): one a second here, as a busy cluster's event-driven passes would
SchedulerParameters=nohold_on_prolog_fail,bf_interval=1,sched_interval=2
NodeName=node1 NodeHostname=$HOST Port=17001 CPUs=$CPUS_PER_NODE RealMemory=10000
NodeName=node2 NodeHostname=$HOST Port=17002 CPUs=$CPUS_PER_NODE RealMemory=10000
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

start() {
    install
    stop >/dev/null 2>&1 || true
    write_conf
    mkdir -p /run/munge
    chown munge:munge /run/munge 2>/dev/null || true
    if [ ! -s /etc/munge/munge.key ]; then
        # normally created by the package; make one if this machine's install did not
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    fi
    munged --force 2>/dev/null || munged --force
    slurmctld
    slurmd -N node1
    slurmd -N node2
    for _ in $(seq 1 30); do
        if [ "$(sinfo -h -o '%t' 2>/dev/null | sort -u | tr -d '\n')" = "idle" ]; then
            sinfo
            return 0
        fi
        sleep 1
    done
    echo "slurm did not become idle:" >&2
    sinfo >&2 || true
    tail -n 20 "$LOGS"/*.log >&2 || true
    return 1
}

stop() {
    pkill -x slurmd || true
    pkill -x slurmctld || true
    sleep 1
}

status() {
    sinfo && squeue
}

"${1:-start}"
