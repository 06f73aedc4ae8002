#!/usr/bin/env bash
# Start a single-node SLURM "cluster" on this machine (for CI and for trying the SLURM
# routes of dmriharmony; see scripts/slurm/participant_array.sbatch and tests/test_slurm.py).
#
#   sudo bash scripts/slurm/start_local_slurm.sh
#
# Root only, Debian/Ubuntu (apt-get) only, no systemd needed (containers). Idempotent: a second
# run finds the daemons up and only re-checks that a job runs. It
#   1. installs the Debian packages slurm-wlm and munge when missing (Debian 12: Slurm 22.05),
#   2. creates /etc/munge/munge.key when missing and starts munged (as user munge),
#   3. writes /etc/slurm/slurm.conf: one node (this host, all its CPUs, 90 % of its memory),
#      one partition "debug" (default), select/cons_tres with CR_Core (memory is not a
#      consumable, so jobs without --mem run side by side), proctrack/linuxproc, task/none,
#      no accounting, no cgroups; state in /var/spool/slurmctld and /var/spool/slurmd,
#      logs in /var/log/slurm,
#   4. starts slurmctld and slurmd as daemons, resumes the node if it came up down/drained,
#   5. waits (at most SLURM_START_TIMEOUT seconds, default 60) until sinfo shows the node idle
#      and `srun hostname` works.
# Exit status 0 when a job ran; otherwise 1 with one line "start_local_slurm: error: ..." on
# stderr (the daemons' logs are in /var/log/slurm and /var/log/munge).
# An /etc/slurm/slurm.conf not written by this script is left alone (set
# SLURM_LOCAL_FORCE=1 to replace it; the old file is kept as slurm.conf.orig).
set -uo pipefail

TIMEOUT=${SLURM_START_TIMEOUT:-60}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARKER="# written by dmriharmony scripts/slurm/start_local_slurm.sh"
LOG_DIR=/var/log/slurm

die() { echo "start_local_slurm: error: $*" >&2; exit 1; }
say() { echo "start_local_slurm: $*"; }

[ "$(id -u)" = 0 ] || die "must run as root (installs packages and starts daemons)"

# --- 1. packages --------------------------------------------------------------------------
missing=""
for p in slurm-wlm munge; do
  [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] \
    || missing="$missing $p"
done
if [ -n "$missing" ]; then
  command -v apt-get >/dev/null 2>&1 || die "packages missing:$missing and no apt-get"
  say "installing Debian packages:$missing"
  log=$(mktemp)
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
           --no-install-recommends $missing; } >"$log" 2>&1; then
    die "apt-get install$missing failed: $(grep -E '^(E|Err):' "$log" | head -1)"
  fi
  rm -f "$log"
fi
for b in munged slurmctld slurmd sinfo srun sbatch scontrol; do
  command -v "$b" >/dev/null 2>&1 || die "$b not found after installing slurm-wlm and munge"
done

# --- 2. munge -----------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  say "creating /etc/munge/munge.key"
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none \
    || die "cannot write /etc/munge/munge.key"
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "starting munged"
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock 2>/dev/null
  out=$(runuser -u munge -- /usr/sbin/munged 2>&1) || die "munged did not start: $out"
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.5
  done
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 \
    || die "munge credentials do not work: $(munge -n 2>&1 | tail -1)"
fi

# --- 3. slurm.conf ------------------------------------------------------------------------
host=$(hostname -s)
getent hosts "$host" >/dev/null 2>&1 || die "host name $host does not resolve (add it to /etc/hosts)"
cpus=$(nproc --all)
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
real_mem=$((mem_mb * 9 / 10))
[ "$real_mem" -ge 1 ] || real_mem=1
new_conf=$(cat <<CONF
$MARKER
ClusterName=localcluster
SlurmctldHost=$host
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
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=60
KillWait=5
Waittime=0
NodeName=$host CPUs=$cpus RealMemory=$real_mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
)
mkdir -p "$CONF_DIR"
changed=0
if [ -f "$CONF" ] && ! grep -qxF "$MARKER" "$CONF"; then
  [ "${SLURM_LOCAL_FORCE:-0}" = 1 ] \
    || die "$CONF exists and was not written by this script (SLURM_LOCAL_FORCE=1 replaces it)"
  cp -p "$CONF" "$CONF.orig"
fi
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
  printf '%s\n' "$new_conf" >"$CONF"
  chmod 0644 "$CONF"
  changed=1
  say "wrote $CONF (node $host, $cpus CPUs, RealMemory=$real_mem MB, partition debug)"
fi
# Debian's plugstack.conf includes plugstack.conf.d/*; keep it, it is harmless.

mkdir -p /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"
chown slurm:slurm /var/spool/slurmctld "$LOG_DIR"
chmod 0755 /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"

# --- 4. daemons ---------------------------------------------------------------------------
running() {  # running PIDFILE NAME
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null \
    && grep -q "$2" "/proc/$(cat "$1")/comm" 2>/dev/null
}
if [ "$changed" = 1 ]; then  # a new configuration: restart what runs with the old one
  for d in slurmd:/run/slurmd.pid slurmctld:/run/slurmctld.pid; do
    if running "${d#*:}" "${d%%:*}"; then
      say "restarting ${d%%:*} (configuration changed)"
      kill "$(cat "${d#*:}")" 2>/dev/null
      for _ in $(seq 20); do running "${d#*:}" "${d%%:*}" || break; sleep 0.5; done
    fi
  done
fi
if ! running /run/slurmctld.pid slurmctld; then
  say "starting slurmctld"
  out=$(slurmctld 2>&1) || die "slurmctld did not start: $out (see $LOG_DIR/slurmctld.log)"
fi
if ! running /run/slurmd.pid slurmd; then
  say "starting slurmd"
  out=$(slurmd 2>&1) || die "slurmd did not start: $out (see $LOG_DIR/slurmd.log)"
fi

# --- 5. wait for the node and run a job ---------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
state=""
resumed=0
while [ "$SECONDS" -lt "$deadline" ]; do
  running /run/slurmctld.pid slurmctld \
    || die "slurmctld exited: $(tail -1 "$LOG_DIR/slurmctld.log" 2>/dev/null)"
  running /run/slurmd.pid slurmd \
    || die "slurmd exited: $(tail -1 "$LOG_DIR/slurmd.log" 2>/dev/null)"
  state=$(timeout 10 sinfo -h -n "$host" -o %t 2>/dev/null | head -1)
  case "$state" in
    idle|mix|alloc) break ;;
    down*|drain*|drng*|inval*|fail*)
      if [ "$resumed" = 0 ]; then
        timeout 10 scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1
        resumed=1
      fi ;;
  esac
  sleep 1
done
case "$state" in
  idle|mix|alloc) ;;
  *) reason=$(timeout 10 sinfo -h -R -n "$host" -o %E 2>/dev/null | head -1)
     die "node $host not idle after ${TIMEOUT} s (state '${state:-none}'${reason:+, reason: $reason})" ;;
esac
left=$((deadline - SECONDS))
[ "$left" -ge 5 ] || left=5
if ! out=$(cd /tmp && timeout "$left" srun -N1 -n1 -p debug hostname 2>&1); then
  die "srun hostname failed: $(echo "$out" | tail -1)"
fi
say "SLURM is up: node $host ($state), partition debug, srun ran on $out"
