#!/usr/bin/env bash
# local-slurm.sh - a throw-away, single-node SLURM cluster for cw's test suite.
#
#   eval "$(bash scripts/local-slurm.sh start)"   # stdout: only `export K=V`
#   pytest ...
#   bash scripts/local-slurm.sh stop
#   bash scripts/local-slurm.sh status            # "up ..." (exit 0) / "down" (exit 1)
#
# `start` (root only) installs munge + slurmctld/slurmd/slurm-client from the
# Debian packages when they are missing, writes a slurm.conf for one node
# reached over 127.0.0.1, runs munged, slurmctld and slurmd as daemons with all
# state under $CW_SLURM_DIR (default /tmp/cw-slurm), waits for the node to be
# idle and prints the environment (also saved in $CW_SLURM_DIR/env.sh). When
# the cluster recorded in $CW_SLURM_DIR/pids is already up it only re-prints
# the environment. `stop` cancels all jobs, stops our daemons by their recorded
# PIDs and deletes the state dir. Progress and errors go to stderr.
#
# Things that bit us, and what this script does about them:
#  * Daemons that inherit the caller's stdout keep `$(...)` or a CI log pipe
#    open forever: each one gets </dev/null and writes to files under log/.
#  * We advertise max(nproc, 8) CPUs so a master and several 1-CPU workers fit
#    on a 2-core box. slurmd normally reports the real CPU count and the node
#    is then marked invalid; SlurmdParameters=config_overrides makes the
#    slurm.conf numbers win.
#  * slurmd exiting does not end the jobs it launched (their slurmstepd and
#    children carry on), so `stop` cancels every job and kills whatever
#    `scontrol listpids` still reports *before* it stops slurmd.
#  * Daemons are stopped only by the PIDs we recorded, after checking that
#    /proc/PID/comm still names the daemon (PIDs get reused); no kill-by-name.
#    If slurmd crashed, a job step's slurmstepd retries forever to report
#    back; such strays are found by SLURM_CONF=<our conf> in their environment.
#  * Package postinst scripts would start the system-wide munge/slurm services;
#    a temporary policy-rc.d forbids that during the install.
# Things tests must know (not fixable here):
#  * `scancel -s SIG JOB` delivers SIG to the job's steps (srun) only; a batch
#    script that does the work itself never sees it. Use `scancel --full -s`.
#  * `squeue -o %N` prints an empty node list until the job is RUNNING; poll
#    %T first. Finished jobs leave plain squeue but `scontrol show job` keeps
#    them for MinJobAge=300 s.
#  * The first scheduling pass runs about 3 s after slurmctld starts, so a job
#    submitted right after `start` sits PENDING (Reason=None) until then;
#    later jobs start within about 1 s.
#  * Every slurm command needs SLURM_CONF (there is no /etc/slurm/slurm.conf).
set -uo pipefail
exec </dev/null
export PATH="$PATH:/usr/sbin:/sbin"
umask 022

DIR=${CW_SLURM_DIR:-/tmp/cw-slurm}
DIR=${DIR%/}
CONF=$DIR/etc/slurm.conf
PIDS=$DIR/pids
ENVF=$DIR/env.sh
MARK=$DIR/.cw-local-slurm        # only a dir holding this file is ever deleted
DAEMONS=(slurmd slurmctld munged)  # stop order
export SLURM_CONF=$CONF

say() { printf 'local-slurm: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2fs", b - a }'; }

case $DIR in
  /?*) ;;
  *) die "CW_SLURM_DIR must be an absolute path other than / (got '$DIR')" ;;
esac
[[ $DIR =~ ^[A-Za-z0-9_./+-]+$ ]] || die "CW_SLURM_DIR may only contain [A-Za-z0-9_./+-] (got '$DIR')"

# true when PID is a live (non-zombie) process whose comm is NAME
is_daemon() {
  local pid=$1 name=$2 comm state
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) && [ "$comm" = "$name" ] || return 1
  state=$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ "$state" != Z ] && [ "$state" != X ]
}
# recorded NAME: the value stored for NAME in the pids file
recorded() { [ -f "$PIDS" ] && awk -v k="$1" '$1 == k { v = $2 } END { print v }' "$PIDS"; }
# pid_of NAME: recorded PID, else whatever the daemon's own pid file says
pid_of() {
  local p; p=$(recorded "$1")
  [ -n "$p" ] || p=$(cat "$DIR/run/$1.pid" 2>/dev/null)
  echo "$p"
}
# poll SECONDS CMD...: run CMD every 0.1 s until it succeeds or time runs out
poll() {
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || return 1
    sleep 0.1
  done
}
listening() {   # listening PORT: some socket LISTENs on PORT (any address)
  local hex; hex=$(printf ':%04X' "$1")
  awk -v p="$hex" 'FNR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
free_port() {   # free_port FROM [TAKEN]: first port >= FROM, not TAKEN, not listened on
  local p=$1
  while [ "$p" = "${2:-}" ] || listening "$p"; do p=$((p + 1)); done
  echo "$p"
}
node_state() { timeout 5 sinfo -h -n "$(recorded node)" -o %T 2>/dev/null; }
node_idle() { [ "$(node_state)" = idle ]; }
cluster_up() {
  [ -f "$ENVF" ] && [ -f "$PIDS" ] || return 1
  local d
  for d in "${DAEMONS[@]}"; do is_daemon "$(recorded "$d")" "$d" || return 1; done
  case $(node_state) in idle | mixed | allocated | completing) return 0 ;; esac
  return 1
}
log_tail() {
  local f
  for f in "$DIR/log/$1".*; do
    [ -s "$f" ] && { say "--- tail of $f"; tail -n 20 "$f" >&2; }
  done
  return 0
}

# ------------------------------------------------------------------- stop
stop_daemon() {  # SIGTERM, then SIGKILL after 15 s; only if PID is still NAME
  local name=$1 pid; pid=$(pid_of "$1")
  is_daemon "$pid" "$name" || return 0
  kill -TERM "$pid" 2>/dev/null
  if ! poll 15 eval "! is_daemon $pid $name"; then
    say "$name ($pid) ignored SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null
    poll 5 eval "! is_daemon $pid $name" || { say "could not stop $name ($pid)"; return 1; }
  fi
  say "stopped $name ($pid)"
}
our_stepds() {   # slurmstepd processes started with *our* SLURM_CONF in their env
  local p
  for p in /proc/[0-9]*; do
    [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] || continue
    tr '\0' '\n' 2>/dev/null <"$p/environ" | grep -qxF "SLURM_CONF=$CONF" && echo "${p#/proc/}"
  done
}
queue_empty() { [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ]; }
cmd_stop() {
  local t0=$EPOCHREALTIME rc=0 jobs left d
  if is_daemon "$(pid_of slurmctld)" slurmctld; then
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      say "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      timeout 10 scancel $jobs 2>/dev/null
      # without slurmd nobody reports the jobs' end; listpids below cleans up
      if is_daemon "$(pid_of slurmd)" slurmd; then
        poll 30 queue_empty || say "queue not empty after 30 s; going on"
      fi
    fi
  fi
  if [ -f "$CONF" ]; then   # asks the jobs' slurmstepds directly, works without slurmd
    left=$(timeout 10 scontrol listpids 2>/dev/null | awk 'NR > 1 && $1 ~ /^[0-9]+$/ { print $1 }')
    if [ -n "$left" ]; then
      say "killing leftover job processes:" $left
      # shellcheck disable=SC2086
      kill -KILL $left 2>/dev/null
    fi
  fi
  for d in "${DAEMONS[@]}"; do stop_daemon "$d" || rc=1; done
  left=$(our_stepds)
  if [ -n "$left" ]; then   # only after slurmd died first, e.g. a crash
    say "killing orphaned slurmstepd:" $left
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null
  fi
  if [ "$rc" = 0 ] && [ -f "$MARK" ]; then
    rm -rf "$DIR" && say "removed $DIR"
  fi
  say "stop took $(since "$t0")"
  return "$rc"
}

# ------------------------------------------------------------------ start
install_packages() {
  local bin
  for bin in slurmctld slurmd sbatch srun scontrol munged munge; do
    command -v "$bin" >/dev/null || break
  done
  command -v "$bin" >/dev/null && return 0
  command -v apt-get >/dev/null || die "$bin is missing and there is no apt-get"
  say "installing slurm-wlm (slurmctld slurmd slurm-client) and munge"
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e $policy ]; then
    printf '#!/bin/sh\nexit 101\n' >$policy && chmod 755 $policy && made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get -q update >&2 || say "apt-get update failed; trying the install anyway"
  apt-get -q -o DPkg::Lock::Timeout=120 install -y --no-install-recommends \
    slurmctld slurmd slurm-client munge >&2
  local rc=$?
  [ "$made_policy" = 1 ] && rm -f $policy
  [ "$rc" = 0 ] || die "apt-get install failed"
  command -v slurmctld >/dev/null && command -v munged >/dev/null || die "packages installed but binaries missing"
}

start_failed() {  # start_failed NAME WHY: show logs, stop what we started, exit
  say "ERROR: $1 $2"
  log_tail "$1"
  local d
  for d in "${DAEMONS[@]}"; do stop_daemon "$d"; done
  rm -f "$PIDS" "$ENVF"
  die "start failed; logs kept in $DIR/log"
}

cmd_start() {
  local t0=$EPOCHREALTIME
  [ "$(id -u)" = 0 ] || die "must run as root (slurmd runs jobs as their user)"
  if cluster_up; then
    say "already up (node $(recorded node) is $(node_state))"
    cat "$ENVF"
    return 0
  fi
  if [ -f "$PIDS" ] || [ -d "$DIR/run" ]; then
    say "found a stale or half-started cluster in $DIR; stopping it"
    cmd_stop || die "could not stop the old cluster in $DIR"
  fi
  if [ -e "$DIR" ] && [ ! -f "$MARK" ] && [ -n "$(ls -A "$DIR")" ]; then
    die "$DIR is not empty and was not created by this script; set CW_SLURM_DIR"
  fi
  install_packages
  local t1=$EPOCHREALTIME

  local node cpus mem ctld_port slurmd_port bind_opt="" addr
  node=$(hostname -s) || die "hostname -s failed"
  cpus=$(nproc); ((cpus < 8)) && cpus=8
  mem=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
  ctld_port=$(free_port 6817)
  slurmd_port=$(free_port $((ctld_port + 1)) "$ctld_port")
  # NoInAddrAny makes the daemons bind to the address the host name resolves
  # to instead of 0.0.0.0; only do that when it is a loopback address.
  addr=$(getent ahostsv4 "$(hostname)" | awk 'NR == 1 { print $1 }')
  if [[ $addr == 127.* ]]; then
    bind_opt="CommunicationParameters=NoInAddrAny,NoCtldInAddrAny"
  else
    say "warning: $(hostname) resolves to '${addr:-nothing}', not 127.x; daemons will listen on all addresses"
  fi

  rm -rf "${DIR:?}"/{etc,state,spool,run,log,munge} "$PIDS" "$ENVF"
  mkdir -p "$DIR"/{etc,state,spool,run,log,munge} && touch "$MARK" || die "cannot create $DIR"
  chmod 755 "$DIR" "$DIR/munge"   # munged rejects a socket dir others cannot enter

  cat >"$CONF" <<EOF
# written by cw scripts/local-slurm.sh; everything lives in $DIR
ClusterName=cwtest
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
$bind_opt
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  echo "node $node" >"$PIDS"

  # munged: private key and socket, so the system munge (if any) is untouched
  head -c 1024 /dev/urandom >"$DIR/munge/munge.key" && chmod 400 "$DIR/munge/munge.key"
  munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket.2" \
    --pid-file="$DIR/run/munged.pid" --seed-file="$DIR/munge/munge.seed" \
    --log-file="$DIR/log/munged.log" >"$DIR/log/munged.out" 2>&1 ||
    start_failed munged "did not start"
  munge_ok() { munge -n -S "$DIR/munge/munge.socket.2" | unmunge -S "$DIR/munge/munge.socket.2"; }
  poll 15 munge_ok || start_failed munged "does not answer on its socket"
  echo "munged $(cat "$DIR/run/munged.pid")" >>"$PIDS"

  # slurmctld and slurmd fork into the background themselves (no -D)
  slurmctld -f "$CONF" >"$DIR/log/slurmctld.out" 2>&1 || start_failed slurmctld "did not start"
  poll 15 eval 'is_daemon "$(cat $DIR/run/slurmctld.pid)" slurmctld' || start_failed slurmctld "wrote no pid file or died"
  echo "slurmctld $(cat "$DIR/run/slurmctld.pid")" >>"$PIDS"
  poll 30 eval 'timeout 5 scontrol ping | grep -q "is UP"' || start_failed slurmctld "does not answer on port $ctld_port"

  slurmd -f "$CONF" -N "$node" >"$DIR/log/slurmd.out" 2>&1 || start_failed slurmd "did not start"
  poll 15 eval 'is_daemon "$(cat $DIR/run/slurmd.pid)" slurmd' || start_failed slurmd "wrote no pid file or died"
  echo "slurmd $(cat "$DIR/run/slurmd.pid")" >>"$PIDS"
  if ! poll 60 node_idle; then
    timeout 5 sinfo -N -l >&2
    start_failed slurmd "node $node is '$(node_state)', not idle, after 60 s"
  fi

  cat >"$ENVF" <<EOF
export SLURM_CONF=$CONF
export CW_SLURM_DIR=$DIR
export CW_SLURM_NODE=$node
export CW_SLURM_PARTITION=debug
export CW_SLURM_CPUS=$cpus
export CW_SLURM_JOBCOMP=$DIR/log/jobcomp.txt
EOF
  say "up: node $node, $cpus CPUs, ports $ctld_port/$slurmd_port," \
    "$(slurmctld -V); total $(since "$t0"), daemons $(since "$t1")"
  cat "$ENVF"
}

cmd_status() {
  if cluster_up; then
    echo "up: node $(recorded node) is $(node_state); SLURM_CONF=$CONF"
  else
    echo "down ($DIR)"
    return 1
  fi
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status   (state dir: \$CW_SLURM_DIR, default /tmp/cw-slurm)" >&2; exit 2 ;;
esac
