#!/usr/bin/env bash
# Installs what migtun's demo and tests need on a Debian machine: QEMU (to
# migrate real VMs), strace (to show splice(2) at work) and socat (a
# baseline relay), stunnel (the OpenSSL baseline of migtun bench) and
# libvirt (the virsh migrate interop test), nftables and iproute2 (the
# network-namespace tests). Go modules are fetched by the go
# command itself. The newer QEMU generation (10.0, from bookworm-backports)
# is unpacked beside the system's by qemu-next.sh, and libvirt 11.3 by
# libvirt-next.sh.
set -euo pipefail

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v strace >/dev/null || need+=(strace)
command -v socat >/dev/null || need+=(socat)
command -v stunnel >/dev/null || command -v stunnel4 >/dev/null || need+=(stunnel4)
command -v libvirtd >/dev/null || command -v virtqemud >/dev/null || need+=(libvirt-daemon libvirt-daemon-driver-qemu)
command -v virsh >/dev/null || need+=(libvirt-clients)
command -v nft >/dev/null || need+=(nftables)
command -v ip >/dev/null || need+=(iproute2)
here=$(dirname "$0")
if [ ${#need[@]} -eq 0 ]; then
  "$here/qemu-next.sh"
  "$here/libvirt-next.sh"
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
"$here/qemu-next.sh"
"$here/libvirt-next.sh"
