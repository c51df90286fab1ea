#!/usr/bin/env bash
# Start a one-node Slurm cluster on localhost for tests (needs root, and the
# slurm-wlm + munge packages: see install.sh).
#
#   UMAE_SLURM_DIR   state/log dir            (default /tmp/umae-slurm)
#   UMAE_SLURM_PORT  slurmctld port; slurmd uses PORT+1   (default 6817)
#
# On success prints `export ...` lines on stdout (also written to
# $UMAE_SLURM_DIR/env) so callers can `eval "$(tests/slurm/start_cluster.sh)"`
# or `source $UMAE_SLURM_DIR/env`. Everything else goes to stderr.
# Running it while the cluster is already up just reprints the env.
set -euo pipefail

DIR=${UMAE_SLURM_DIR:-/tmp/umae-slurm}
PORT=${UMAE_SLURM_PORT:-6817}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONF=$DIR/slurm.conf
TIMEOUT=60

log() { echo "start_cluster: $*" >&2; }
die() {
    log "ERROR: $*"
    for f in "$DIR/slurmctld.log" "$DIR/slurmd.log"; do
        [ -r "$f" ] && { echo "----- tail $f" >&2; tail -n 30 "$f" >&2; }
    done
    [ -z "${STARTED:-}" ] || "$HERE/stop_cluster.sh" >&2   # leave nothing half-up
    exit 1
}
alive() {  # alive PIDFILE: its process exists and is not a zombie
    local pid; pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && [ -e "/proc/$pid" ] &&
        [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]
}
node_idle() { SLURM_CONF=$CONF sinfo -h -N -n localhost -o %t 2>/dev/null | grep -qx 'idle'; }
print_env() {
    printf 'export SLURM_CONF=%q\nexport PATH=%q:"$PATH"\n' "$CONF" "$HERE/bin" | tee "$DIR/env"
}

[ "$(id -u)" -eq 0 ] || die "must run as root (slurmd/munged need it)"
for b in munged munge unmunge slurmctld slurmd sinfo; do
    command -v "$b" >/dev/null || die "$b not found: run tests/slurm/install.sh"
done

# Already running (ours)? Then nothing to do.
if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && node_idle; then
    log "cluster already up in $DIR"
    print_env
    exit 0
fi
"$HERE/stop_cluster.sh" >/dev/null 2>&1 || true   # leftovers of a half-started run

# Fresh state each start: no stale jobs from earlier runs get restored.
rm -rf "$DIR/state" "$DIR/spool"
mkdir -p "$DIR/state" "$DIR/spool"
rm -f "$DIR"/*.log "$DIR/env"

STARTED=1
# --- munge: reuse a working munged (e.g. a systemd one), else start one.
if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "using already running munged"
else
    KEY=/etc/munge/munge.key
    if [ ! -s "$KEY" ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of="$KEY" bs=1024 count=1 status=none
    fi
    chown munge:munge "$KEY"; chmod 400 "$KEY"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge   # clients must reach the socket
    runuser -u munge -- munged || die "munged failed to start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    cp /run/munge/munged.pid "$DIR/munged.pid"   # marks it as ours, for stop
fi

# --- slurm.conf. Memory is not a consumable (CR_Core), RealMemory only caps --mem.
CPUS=$(nproc)
MEM=$(awk '/MemTotal/ {m = int($2 / 1024 * 0.75); print (m > 20000 ? 20000 : m)}' /proc/meminfo)
cat >"$CONF" <<EOF
ClusterName=umae
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: a requeued job may restart after 5 s instead of the default 120 s
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Finished jobs are appended here; tests/slurm/bin/sacct falls back to it
# once slurmctld has forgotten a job (MinJobAge).
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
JobRequeue=1
ReturnToService=2
MinJobAge=300
KillWait=5
OverTimeLimit=0
InactiveLimit=0
# Backfill every second: jobs start ~1 s after sbatch instead of 2-5 s.
SchedulerParameters=sched_interval=5,bf_interval=1
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# Trust the CPU count below even where the hardware topology differs.
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$CONF

# --- daemons (they fork and write their own PID files).
slurmctld || die "slurmctld failed to start"
slurmd -N localhost || die "slurmd failed to start"   # the host is not named localhost

start=$SECONDS
# Also require our own daemons alive: another cluster on the same ports would
# otherwise answer sinfo.
until node_idle && alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; do
    waited=$((SECONDS - start))
    [ $waited -lt $TIMEOUT ] || die "node not idle after ${TIMEOUT}s: $(sinfo -N 2>&1 | tail -n 2)"
    if [ $waited -ge 3 ]; then
        alive "$DIR/slurmctld.pid" || die "slurmctld is not running"
        alive "$DIR/slurmd.pid" || die "slurmd is not running"
    fi
    sleep 0.5
done
log "cluster up in $((SECONDS - start))s (dir $DIR)"
print_env
