#!/usr/bin/env bash
# Installs what the deployment tests under deploy/ need on a Debian machine:
# systemd-analyze (verify and the offline security score of the unit) from
# systemd, podman (to run the OCI image where containers can run) and strace
# (to list the system calls migtun makes, against the unit's filter).
set -euo pipefail

need=()
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v podman >/dev/null || need+=(podman)
command -v strace >/dev/null || need+=(strace)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "installing ${need[*]} from Debian packages" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
