#!/usr/bin/env bash
# Install the system (Debian) packages that the diffim tests need.
#
# Run as root by CI before the test suite; safe to run again (idempotent):
# apt-get only installs what is missing, and the daemons that the Debian
# packages would normally start through systemd are neither enabled nor
# started here -- tests/slurm_cluster.py starts a private SLURM cluster itself.
#
#   slurmctld, slurmd, slurm-client  a single-node SLURM cluster for
#                                    tests/test_slurm.py (Snakemake's slurm executor)
#   munge                            SLURM's authentication daemon
#   graphviz                         `dot`, for `snakemake --dag | dot` in the docs/tests
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge graphviz)

if [[ "$(id -u)" -ne 0 ]]; then
    echo "install-system.sh: must run as root (apt-get install); skipping." >&2
    exit 0
fi

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} == 0)); then
    echo "install-system.sh: all system packages present: ${packages[*]}"
else
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d exit 101 keeps the package scripts from starting services in
    # a container without systemd; removed again afterwards if we created it.
    created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
    if ((created_policy)); then
        rm -f /usr/sbin/policy-rc.d
    fi
fi

# Versions, for the CI log.
dpkg-query -W -f='${Package} ${Version}\n' "${packages[@]}"
