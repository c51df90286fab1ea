#!/usr/bin/env bash
# Install Slurm + MUNGE from Debian packages (Debian 12 ships Slurm 22.05).
# Needs root. Used by CI before tests/slurm/start_cluster.sh.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    echo "slurm-wlm and munge already installed" >&2
    exit 0
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq slurm-wlm munge >/dev/null
