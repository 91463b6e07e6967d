#!/usr/bin/env bash
# Installs the newer libvirt generation beside Debian 12's own: libvirt 11.3
# from bookworm-backports, unpacked (dpkg -x) into a prefix so that it does
# not replace the system's libvirt 9.0. scripts/libvirt-hosts.sh runs its
# libvirtd when LIBVIRT_PREFIX names the prefix (with LD_LIBRARY_PATH and
# LIBVIRT_DRIVER_DIR pointing into it); the libvirt end-to-end test pairs it
# with QEMU 10.0 (scripts/qemu-next.sh).
#
#   scripts/libvirt-next.sh         install into /opt/migtun/libvirt-11.3
#   MIGTUN_LIBVIRT_NEXT=DIR scripts/libvirt-next.sh
#
# Run qemu-next.sh first: it adds bookworm-backports to apt's sources.
# Idempotent.
set -euo pipefail

prefix=${MIGTUN_LIBVIRT_NEXT:-/opt/migtun/libvirt-11.3}
suite=bookworm-backports
pkgs=(libvirt0 libvirt-common libvirt-clients libvirt-daemon libvirt-daemon-common
	libvirt-daemon-log libvirt-daemon-lock libvirt-daemon-driver-qemu)

if LD_LIBRARY_PATH="$prefix/usr/lib/x86_64-linux-gnu" "$prefix/usr/sbin/libvirtd" --version >/dev/null 2>&1; then
	exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
	sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
(cd "$work" && apt-get download -qq "${pkgs[@]/%//$suite}" 2>/dev/null)

# Shared libraries from Debian 12: the dependencies that are not libvirt's
# own packages, nor the daemon's service plumbing.
libs=()
for deb in "$work"/*.deb; do
	for dep in $(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed -E 's/\(.*\)//; s/\|.*//; s/ //g'); do
		case $dep in
		libvirt* | qemu-* | logrotate | adduser | systemd-container | debconf | "") ;;
		*) libs+=("$dep") ;;
		esac
	done
done
missing=()
for l in $(printf '%s\n' "${libs[@]}" | sort -u); do
	dpkg-query -W -f '${Status}' "$l" 2>/dev/null | grep -q 'install ok installed' || missing+=("$l")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "installing ${missing[*]} from Debian packages" >&2
	$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "unpacking ${pkgs[*]} from $suite into $prefix" >&2
$sudo rm -rf "$prefix.tmp"
$sudo mkdir -p "$prefix.tmp"
for deb in "$work"/*.deb; do
	$sudo dpkg -x "$deb" "$prefix.tmp"
done
$sudo rm -rf "$prefix"
$sudo mv "$prefix.tmp" "$prefix"
LD_LIBRARY_PATH="$prefix/usr/lib/x86_64-linux-gnu" "$prefix/usr/sbin/libvirtd" --version >&2
