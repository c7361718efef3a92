#!/usr/bin/env bash
# Installs a single-node SLURM (slurmctld, slurmd, client tools) and munge from Debian's packages.
# A no-op when they are already installed. Needs root; nothing is started here (scripts/services.py
# starts and stops the daemons by PID, with a config of its own).
set -euo pipefail

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
   && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    msg="install_slurm.sh: SLURM is not installed and installing it needs root"
    if [ "${CI:-}" = "true" ]; then echo "$msg" >&2; exit 1; fi
    echo "$msg; the SLURM tests will be skipped" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install_slurm.sh: no apt-get here; install slurmctld, slurmd, slurm-client and munge yourself" >&2
    [ "${CI:-}" = "true" ] && exit 1 || exit 0
fi
echo "install_slurm.sh: installing slurmctld slurmd slurm-client munge from Debian's packages" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
