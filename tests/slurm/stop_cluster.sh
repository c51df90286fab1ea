#!/usr/bin/env bash
# Stop what tests/slurm/start_cluster.sh started, by the PID files in
# $UMAE_SLURM_DIR (default /tmp/umae-slurm). A munged that was already running
# before start (no munged.pid written) is left alone. Logs/state are kept.
set -uo pipefail
DIR=${UMAE_SLURM_DIR:-/tmp/umae-slurm}
export SLURM_CONF=$DIR/slurm.conf

running() {  # PID exists and is not a zombie (pid 1 may be slow to reap)
    [ -n "$1" ] && [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}
stop() {  # stop PIDFILE: SIGTERM, wait up to 10 s, then SIGKILL
    local f=$DIR/$1 pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 100); do running "$pid" || break; sleep 0.1; done
        running "$pid" && { echo "stop_cluster: $1 ($pid) ignored SIGTERM, killing" >&2; kill -9 "$pid"; }
    fi
    rm -f "$f"
}

# Jobs outlive slurmd (their slurmstepd is separate), so cancel them first.
if [ -f "$DIR/slurmctld.pid" ] && running "$(cat "$DIR/slurmctld.pid")"; then
    squeue -h -o %i 2>/dev/null | xargs -r scancel --full 2>/dev/null
    for _ in $(seq 100); do   # up to 10 s for them to end
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.1
    done
fi
stop slurmd.pid
stop slurmctld.pid
stop munged.pid

# Last resort: step daemons and job processes still tied to this cluster
# (SLURM_CONF and SLURM_JOB_ID in their environment; slurmstepd has SLURM_CONF).
for p in /proc/[0-9]*; do
    [ "${p#/proc/}" = $$ ] && continue
    { env=$(tr '\0' '\n' <"$p/environ"); } 2>/dev/null || continue
    grep -qxF "SLURM_CONF=$SLURM_CONF" <<<"$env" || continue
    if grep -q '^SLURM_JOB_ID=' <<<"$env" || [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ]; then
        echo "stop_cluster: killing leftover ${p#/proc/} ($(cat "$p/comm" 2>/dev/null))" >&2
        kill -9 "${p#/proc/}" 2>/dev/null
    fi
done
rm -f "$DIR/env"
