#!/usr/bin/env bash
# A real single-node Slurm cluster (munged + slurmctld + slurmd) for the workflow's Slurm tests.
#
#   bash ci/start-slurm.sh          install if needed, configure, start, wait for the node, smoke srun
#   bash ci/start-slurm.sh stop     stop the daemons this script started (by their pid files)
#   bash ci/start-slurm.sh status   show the daemons and the node state
#
# Options (environment): SLURM_FAKE_GPUS=1 declares one GPU (gres with File=/dev/null, no real device
# behind it) so rules that request `gpu` or `gres` can be scheduled; SLURM_KILL_WAIT (default 120)
# is the seconds between SIGTERM and SIGKILL when a job is cancelled or pre-empted.
#
# Needs root and Debian/Ubuntu packages; works without systemd. Re-running is safe: with the same
# configuration and everything up it does nothing, otherwise it restarts the daemons cleanly.
# Why each slurm.conf line is there: the comments in the configuration below.
set -euo pipefail

ACTION="${1:-start}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
NODE="$(hostname -s)"
FAKE_GPUS="${SLURM_FAKE_GPUS:-0}"
KILL_WAIT="${SLURM_KILL_WAIT:-120}"
PIDFILES=(/run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid)
DAEMONS=(slurmd slurmctld munged)

log() { echo "start-slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and writes /etc/slurm)"

# A pid file counts only if the process is alive and is the daemon we expect (stale pid files
# survive in /run when a container is restarted, and the pid may now belong to something else).
running_pid() { # pidfile name
  local pid
  [ -s "$1" ] || return 1
  pid="$(cat "$1")"
  [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ] && echo "$pid"
}

stop_daemons() {
  local i pid
  for i in "${!PIDFILES[@]}"; do
    if pid="$(running_pid "${PIDFILES[$i]}" "${DAEMONS[$i]}")"; then
      log "stopping ${DAEMONS[$i]} (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
      if [ -d "/proc/$pid" ]; then
        log "${DAEMONS[$i]} ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
      fi
    fi
    rm -f "${PIDFILES[$i]}"
  done
}

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1; }

if [ "$ACTION" = stop ]; then
  stop_daemons
  exit 0
elif [ "$ACTION" = status ]; then
  for i in "${!PIDFILES[@]}"; do
    pid="$(running_pid "${PIDFILES[$i]}" "${DAEMONS[$i]}")" && s="running (pid $pid)" || s="not running"
    echo "${DAEMONS[$i]}: $s"
  done
  echo "node $NODE: $(node_state || true)"
  exit 0
elif [ "$ACTION" != start ]; then
  die "unknown action '$ACTION' (start, stop or status)"
fi

install_packages() {
  local added_policy=0
  # Debian's postinst scripts would start the daemons through invoke-rc.d; we start them ourselves.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    added_policy=1
  fi
  log "installing munge slurmctld slurmd slurm-client"
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
    munge slurmctld slurmd slurm-client >/dev/null
  [ "$added_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

for exe in munged slurmctld slurmd sinfo srun; do
  if ! command -v "$exe" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$exe" ]; then
    install_packages
    break
  fi
done
export PATH="$PATH:/usr/sbin"

# The node as it really is: all cores, 85% of the memory (the rest for the daemons and the OS).
CPUS="$(nproc --all)"
MEM_MB="$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.85}' /proc/meminfo)"
GRES_NODE=""
GRES_TYPES=""
if [ "$FAKE_GPUS" = 1 ]; then
  GRES_NODE=" Gres=gpu:1"
  GRES_TYPES="GresTypes=gpu"
fi

NEW_CONF="$(cat <<EOF
# Single-node test cluster written by ci/start-slurm.sh (do not edit: it is rewritten)
ClusterName=localcluster
SlurmctldHost=$NODE(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# no cgroups in a container: plain /proc process tracking (it still signals every process of a
# step, so the training process itself receives SIGTERM), no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# a cancelled or pre-empted job gets SIGTERM, then SIGKILL only after KillWait seconds: time for
# a training loop to write its checkpoint
KillWait=$KILL_WAIT
SchedulerType=sched/backfill
# start batch jobs at submit time instead of up to 3 s later
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default a job with no --mem takes the whole node and jobs run one at a time
DefMemPerCPU=1000
ReturnToService=2
# keep finished jobs visible to squeue for an hour: the Snakemake plugin checks status with squeue
# (no accounting database here) and uses it only if MinJobAge >= 3 x its first-check delay; the
# tests also read finished jobs back with scontrol
MinJobAge=3600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
$GRES_TYPES

NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB$GRES_NODE State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)"
NEW_GRES="AutoDetect=off
NodeName=$NODE Name=gpu File=/dev/null"

all_running() {
  local i
  for i in "${!PIDFILES[@]}"; do running_pid "${PIDFILES[$i]}" "${DAEMONS[$i]}" >/dev/null || return 1; done
}

if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$NEW_CONF" ] && all_running; then
  case "$(node_state)" in
    idle | mixed | allocated)
      log "already running with this configuration; node $NODE is $(node_state)"
      exit 0 ;;
  esac
fi

stop_daemons
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
printf '%s\n' "$NEW_CONF" > "$CONF"
if [ "$FAKE_GPUS" = 1 ]; then
  printf '%s\n' "$NEW_GRES" > "$CONF_DIR/gres.conf"
else
  rm -f "$CONF_DIR/gres.conf"
fi

# munge: the package creates the key on install, but not when /etc was reset since
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating /etc/munge/munge.key"
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge /etc/munge/munge.key /var/lib/munge /var/log/munge /run/munge
chmod 700 /etc/munge
chmod 400 /etc/munge/munge.key
# --force: start even if a stale socket from a previous run is left in /run/munge
runuser -u munge -- /usr/sbin/munged --force
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"

/usr/sbin/slurmctld
/usr/sbin/slurmd

for _ in $(seq 300); do
  state="$(node_state || true)"
  case "$state" in
    idle) break ;;
    down* | drain* | inval* | fail*)
      # state saved by an earlier run; the node is fine, tell slurmctld so
      scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.1
done
[ "$(node_state)" = idle ] || die "node $NODE is '$(node_state)', not idle after 30 s (see /var/log/slurm/)"
log "node $NODE idle ($CPUS CPUs, ${MEM_MB} MB$GRES_NODE)"

out="$(timeout 60 srun -N1 -n1 -t 1 hostname)" || die "smoke srun failed"
[ "$out" = "$(hostname)" ] || die "smoke srun printed '$out'"
log "smoke srun ok"
