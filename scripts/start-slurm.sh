#!/usr/bin/env bash
# start-slurm.sh - a real single-node SLURM (munged + slurmctld + slurmd) for wsi-prune's tests.
#
# For Debian 12 machines and containers without systemd, as root. It installs the Debian packages
# when they are missing (munge, slurmctld, slurmd, slurm-client), writes /etc/slurm/slurm.conf
# from what `slurmd -C` reports, starts the daemons itself and waits until the node is idle, then
# runs one `srun` as a smoke test. Running it again with everything up does nothing (< 1 s).
#
#   scripts/start-slurm.sh          start (or check) the cluster
#   scripts/start-slurm.sh --stop   stop the daemons this script started (by PID file, never by name)
#
# Exit status 0: `sbatch` works. 1: it could not start (the message says why; the tests skip with
# it). Environment: WSI_SLURM_PARTITION (debug), WSI_SLURM_WAIT_S (60),
# WSI_SLURM_DEF_MEM_PER_CPU (1024 MB; without it every job takes the whole node's memory and
# array tasks run one at a time).
#
# Choices, and why:
#   - no cgroups and no accounting daemon (proctrack/linuxproc, task/none, accounting_storage/none):
#     CI containers have neither; wait for jobs with `squeue` or `sbatch --wait`, not `sacct`.
#   - controller and node both at 127.0.0.1, named after `hostname -s`: no DNS needed.
#   - RealMemory is 90 % of what slurmd measures, so the node never registers as INVALID.
#   - daemons are recorded in $STATE/started; --stop and restarts touch only those.
set -euo pipefail

PARTITION="${WSI_SLURM_PARTITION:-debug}"
WAIT_S="${WSI_SLURM_WAIT_S:-60}"
DEF_MEM_PER_CPU="${WSI_SLURM_DEF_MEM_PER_CPU:-1024}"

CONF=/etc/slurm/slurm.conf
MUNGE_DIR=/run/munge
CTLD_DIR=/var/spool/slurmctld
SLURMD_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
STATE=/var/spool/wsi-prune-slurm
STARTED=$STATE/started

T0=$SECONDS
say() { printf '[start-slurm %3ds] %s\n' "$((SECONDS - T0))" "$*"; }
fail() {
  printf '[start-slurm] cannot start SLURM: %s\n' "$*" >&2
  for f in "$MUNGE_DIR/munged.log" "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"; do
    if [[ -s $f ]]; then printf -- '--- tail %s ---\n' "$f" >&2; tail -n 10 "$f" >&2; fi
  done
  exit 1
}
trap 'fail "line $LINENO: $BASH_COMMAND"' ERR

# running NAME PIDFILE: the PID file names a live process called NAME (a stale file after a reboot
# may name some other process, so the name is checked).
running() {
  local pid
  [[ -s $2 ]] || return 1
  pid=$(tr -dc '0-9' <"$2")
  [[ -n $pid && -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$1"* ]]
}
ours() { [[ -f $STARTED ]] && grep -q "^$1 " "$STARTED"; }
remember() {
  mkdir -p "$STATE"
  touch "$STARTED"
  grep -qx "$1 $2" "$STARTED" || echo "$1 $2" >>"$STARTED"
}
stop() {  # NAME PIDFILE
  local pid i
  running "$1" "$2" || return 0
  pid=$(tr -dc '0-9' <"$2")
  say "stopping $1 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 60; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
  kill -KILL "$pid" 2>/dev/null || true
}
retry() {  # SECONDS WHAT COMMAND...
  local n=$1 what=$2 i
  shift 2
  for ((i = 0; i < n * 4; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  fail "no $what after ${n}s"
}

[[ $(id -u) -eq 0 ]] || fail "needs root (installs packages and starts daemons); run it as root"

if [[ ${1:-} == --stop ]]; then
  if [[ -f $STARTED ]]; then
    if ours slurmctld && timeout 5 scontrol ping 2>/dev/null | grep -q UP; then
      jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
      [[ -z ${jobs// /} ]] || scancel $jobs 2>/dev/null || true
    fi
    for name in slurmd slurmctld munged; do
      pidfile=$(awk -v n="$name" '$1 == n {print $2}' "$STARTED" | tail -n1)
      [[ -z $pidfile ]] || stop "$name" "$pidfile"
    done
    rm -f "$STARTED"
  fi
  say "stopped"
  exit 0
fi

# -- 1. packages ----------------------------------------------------------------------------
missing=()
for pair in munged:munge slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
  command -v apt-get >/dev/null || fail "${missing[*]} not installed and no apt-get here"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/tmp/start-slurm-apt.log 2>&1 \
    || fail "apt-get update failed (no network?), see /tmp/start-slurm-apt.log"
  # the packages' postinst scripts cannot start services without systemd: we start them below
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >>/tmp/start-slurm-apt.log 2>&1 \
    || fail "apt-get install ${missing[*]} failed, see /tmp/start-slurm-apt.log"
fi

# -- 2. munge (authentication between the daemons) ------------------------------------------
id munge >/dev/null 2>&1 && id slurm >/dev/null 2>&1 || fail "users munge/slurm missing"
if [[ ! -s /etc/munge/munge.key ]]; then
  install -d -o munge -g munge -m 0700 /etc/munge
  mungekey --create --keyfile=/etc/munge/munge.key --force
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
if ! { running munged "$MUNGE_DIR/munged.pid" && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
then
  say "starting munged"
  rm -f "$MUNGE_DIR/munged.pid" "$MUNGE_DIR/munge.socket.2" "$MUNGE_DIR/munge.socket.2.lock"
  runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_DIR/munged.pid" \
    --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" </dev/null
  retry 10 "munged PID file" running munged "$MUNGE_DIR/munged.pid"
  remember munged "$MUNGE_DIR/munged.pid"
fi
retry 10 "munge credential round trip" bash -c 'munge -n | unmunge'

# -- 3. slurm.conf --------------------------------------------------------------------------
node=$(hostname -s)
[[ -n $node ]] || fail "hostname -s is empty"
probe=$(slurmd -C | head -n1)
hardware=$(sed -E 's/^NodeName=[^ ]+ //; s/ ?RealMemory=[0-9]+//' <<<"$probe")
mem_mb=$(sed -nE 's/.*RealMemory=([0-9]+).*/\1/p' <<<"$probe")
[[ -n $hardware && -n $mem_mb ]] || fail "cannot parse 'slurmd -C': $probe"

mkdir -p /etc/slurm
cat >"$CONF.new" <<EOF
# Written by wsi-prune scripts/start-slurm.sh: one node, no cgroups, no accounting.
ClusterName=wsiprune
SlurmctldHost=$node(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEF_MEM_PER_CPU
ReturnToService=2
StateSaveLocation=$CTLD_DIR
SlurmdSpoolDir=$SLURMD_DIR
SlurmctldPidFile=$CTLD_DIR/slurmctld.pid
SlurmdPidFile=$SLURMD_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=$node NodeAddr=127.0.0.1 $hardware RealMemory=$((mem_mb * 9 / 10)) State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
changed=0
if cmp -s "$CONF.new" "$CONF"; then
  rm -f "$CONF.new"
else
  mv "$CONF.new" "$CONF"
  chmod 0644 "$CONF"
  changed=1
  say "wrote $CONF ($node: $hardware)"
fi
install -d -o slurm -g slurm -m 0755 "$CTLD_DIR" "$LOG_DIR"
install -d -o root -g root -m 0755 "$SLURMD_DIR"

# -- 4. daemons -----------------------------------------------------------------------------
daemon() {  # NAME PIDFILE PORT
  local name=$1 pidfile=$2 port=$3
  if running "$name" "$pidfile"; then
    if ((!changed)); then return 0; fi
    ours "$name" || fail "$name runs but was not started here, and slurm.conf changed: stop it"
    say "slurm.conf changed: restarting $name"
    stop "$name" "$pidfile"
  fi
  if ss -Hltn 2>/dev/null | awk '{print $4}' | grep -qE ":$port\$"; then
    fail "port $port is taken by another process; $name cannot start"
  fi
  say "starting $name"
  rm -f "$pidfile"
  "/usr/sbin/$name" </dev/null >>"$LOG_DIR/$name.stdout" 2>&1 || fail "$name exited with $?"
  retry 15 "$name PID file" running "$name" "$pidfile"
  remember "$name" "$pidfile"
}
daemon slurmctld "$CTLD_DIR/slurmctld.pid" 6817
retry 30 "answer from slurmctld" bash -c 'scontrol ping | grep -q UP'
daemon slurmd "$SLURMD_DIR/slurmd.pid" 6818

# -- 5. wait for an idle node, then run one job ---------------------------------------------
resumed=0
state=""
for ((i = 0; i < WAIT_S * 2; i++)); do
  state=$(sinfo -h -n "$node" -p "$PARTITION" -o '%t' 2>/dev/null | head -n1 || true)
  case $state in
    idle | mix | alloc) break ;;
    drain* | down | drng)  # saved state of an earlier run; slurmd is up now, so resume once
      if ((!resumed)); then
        scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
        resumed=1
      fi ;;
  esac
  sleep 0.5
done
case $state in
  idle | mix | alloc) ;;
  *) fail "node $node is '${state:-unknown}' after ${WAIT_S}s: $(scontrol show node "$node" 2>&1 \
        | grep -E 'State|Reason' | tr -s ' ' | tr '\n' ' ')" ;;
esac
smoke=$(timeout 30 srun -N1 -n1 -t 1 hostname 2>&1) || fail "srun smoke test: $smoke"
say "SLURM ready: partition $PARTITION, node $node ($state), srun ran on $smoke"
