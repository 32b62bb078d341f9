#!/usr/bin/env bash
# A one-node SLURM on this machine, to try the whole cluster path (train.py -m hydra/launcher=slurm, the sbatch
# files, requeue, scripts/reproduce.py --launcher slurm) on a laptop or a CI runner. Needs root and the
# distribution's packages:
#   apt-get install slurm-wlm munge          # Debian/Ubuntu
#   sudo bash scripts/slurm/local_cluster.sh start    # munged, slurmctld, slurmd; waits until the node is idle
#   sudo bash scripts/slurm/local_cluster.sh status   # the daemons, sinfo, the queue
#   sudo bash scripts/slurm/local_cluster.sh stop     # stops them; the generated config stays for the next start
# The generated /etc/slurm/slurm.conf (kept if it exists and was not written by this script) gives the node this
# machine's CPUs and memory (slurmd -C), one partition "local", requeue allowed, KillWait 10 s, a requeued job
# eligible again after 10 s (cred_expire; SLURM's default is 120 s), no accounting (that needs slurmdbd and a
# database: sacct then has nothing to say, and the launchers do not need it).
# Logs: /var/log/slurm/. Guide: docs/cluster.md.
set -euo pipefail

CONF_DIR=${SLURM_CONF_DIR:-/etc/slurm}
CONF=$CONF_DIR/slurm.conf
MARK="# written by fsam scripts/slurm/local_cluster.sh"
PARTITION=${FSAM_SLURM_PARTITION:-local}

die() { echo "error: $*" >&2; exit 2; }

need_tools() {
  [[ $(id -u) -eq 0 ]] || die "the local cluster's daemons run as root: run with sudo (or as root)"
  for tool in munged slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || die "no $tool on PATH: install the distribution's packages first (apt-get install slurm-wlm munge)"
  done
}

write_config() {
  if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    echo "keeping $CONF (not written by this script)"
    return
  fi
  local node
  node=$(slurmd -C | head -n 1)  # NodeName=<host> CPUs=... RealMemory=...: this machine as slurmd sees it
  mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat >"$CONF" <<EOF
$MARK
ClusterName=fsam-local
SlurmctldHost=$(hostname -s)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
$node State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  echo "wrote $CONF: $node, partition $PARTITION"
}

running() { pgrep -x "$1" >/dev/null; }

start() {
  need_tools
  write_config
  if ! running munged; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    [[ -f /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null || create-munge-key -f; }
    runuser -u munge -- munged
  fi
  running slurmctld || slurmctld
  running slurmd || slurmd
  local state=""
  for _ in $(seq 60); do
    state=$(sinfo -h -N -o %t 2>/dev/null | head -n 1 || true)
    [[ $state == idle* || $state == mix* || $state == alloc* ]] && { echo "local SLURM up: node $state, partition $PARTITION"; return; }
    [[ $state == down* || $state == drain* ]] && scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  die "the node did not come up within 60 s (state '${state:-none}'): see /var/log/slurm/slurmctld.log and slurmd.log"
}

stop() {
  for daemon in slurmd slurmctld; do
    running "$daemon" && pkill -x "$daemon"
  done
  for _ in $(seq 20); do running slurmd || running slurmctld || break; sleep 0.5; done
  echo "local SLURM stopped (munged left running)"
}

status() {
  for daemon in munged slurmctld slurmd; do
    if running "$daemon"; then echo "$daemon: running"; else echo "$daemon: stopped"; fi
  done
  running slurmctld || exit 3
  sinfo
  squeue
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
