#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the tests in tests/test_slurm.py (needs root).
# Installs slurm-wlm and munge when missing, writes a minimal slurm.conf (one partition, `debug`, holding this
# node), starts munged, slurmctld and slurmd unless they already run, and waits until sinfo shows the node idle.
# Safe to re-run.
#   sudo bash scripts/slurm_local.sh && sinfo
#   python -m spectra.run -m hydra/launcher=slurm hydra.launcher.partition=debug model=tiny_llama data=synthetic
set -euo pipefail

say() { echo "slurm_local: $*"; }
if [ "$(id -u)" != 0 ]; then
    say "needs root (it installs packages and starts daemons); the SLURM tests will be skipped"
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

HOST=$(hostname -s)
CPUS=$(nproc)
# Below the machine's real memory: slurmd refuses a node that reports less than slurm.conf claims.
MEMORY_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
STATE=/var/spool/slurm-local
mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" /var/log/slurm

if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge

CONF=$(cat <<EOF
# Written by spectra/scripts/slurm_local.sh: a single-node test cluster.
ClusterName=spectra-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# No cgroups in a container: track job processes by their parent ids, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
# A requeued job may start again this many seconds after the requeue (the default, 120, is a long wait in tests).
AuthInfo=cred_expire=10
# ... and the scheduler looks for startable jobs every few seconds (SLURM's defaults: 30-60 s).
SchedulerParameters=sched_interval=5,bf_interval=5
# Jobs stopped at their time limit get SIGTERM, then SIGKILL this many seconds later.
KillWait=30
NodeName=$HOST CPUs=$CPUS RealMemory=$MEMORY_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)
if [ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" != "$CONF" ]; then
    echo "$CONF" >/etc/slurm/slurm.conf
    CHANGED=1
fi

pidfile() { if [ "$1" = munged ]; then echo /run/munge/munged.pid; else echo "/run/$1.pid"; fi; }
running() { [ -s "$(pidfile "$1")" ] && kill -0 "$(cat "$(pidfile "$1")")" 2>/dev/null; }
stop() {  # some settings (AuthInfo) are read only when a daemon starts
    if running "$1"; then
        kill "$(cat "$(pidfile "$1")")"
        while running "$1"; do sleep 0.2; done
    fi
}
running munged || su -s /bin/sh munge -c /usr/sbin/munged
if [ -n "${CHANGED:-}" ]; then
    stop slurmd
    stop slurmctld
fi
running slurmctld || slurmctld
running slurmd || slurmd

for _ in $(seq 60); do
    if sinfo -h -N -o '%t' 2>/dev/null | grep -qx 'idle\|mix\|alloc'; then
        say "cluster up: $(sinfo -h -o '%P %D node(s) %c CPUs %m MB %t' | head -1)"
        exit 0
    fi
    # A node left down by an earlier start (e.g. a changed configuration) is returned to service.
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sleep 1
done
say "the node did not become idle in 60 s; see /var/log/slurm/slurmctld.log and slurmd.log"
sinfo -N -l || true
exit 1
