#!/usr/bin/env bash
# Installs the newer QEMU generation beside Debian 12's own: QEMU 10.0 from
# bookworm-backports, unpacked (dpkg -x) into a prefix so that it does not
# replace the system's QEMU 7.2. It is run through the wrapper this script
# writes, $prefix/bin/qemu-system-x86_64, which gives it -L at the prefix's
# share/qemu and share/seabios (its own firmware) and QEMU_MODULE_DIR at
# its own modules: without that it loads 7.2's modules from
# /usr/lib/x86_64-linux-gnu/qemu and aborts (libvirt's capability probe
# does). The tests (internal/vmtest, FindGeneration) and libvirt's domain
# <emulator> use the wrapper.
#
#   scripts/qemu-next.sh            install into /opt/migtun/qemu-10.0
#   MIGTUN_QEMU_NEXT=DIR scripts/qemu-next.sh
#
# It adds bookworm-backports to apt's sources if no source names it yet,
# downloads the packages with apt-get download, and installs the shared
# libraries they need from Debian 12 itself. Idempotent.
set -euo pipefail

prefix=${MIGTUN_QEMU_NEXT:-/opt/migtun/qemu-10.0}
suite=bookworm-backports
# The module packages too: a module QEMU does not find in its own directory
# is looked for in the system's, whose 7.2 modules abort 10.0.
pkgs=(qemu-system-x86 qemu-system-common qemu-system-data seabios qemu-utils
	qemu-system-modules-opengl qemu-system-modules-spice)

if [ -e "$prefix/usr/lib/x86_64-linux-gnu/qemu/hw-display-qxl.so" ] &&
	"$prefix/bin/qemu-system-x86_64" --version >/dev/null 2>&1; then
	exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
	sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive

if ! grep -rqs "$suite" /etc/apt/sources.list /etc/apt/sources.list.d/; then
	echo "adding $suite to apt's sources" >&2
	$sudo tee /etc/apt/sources.list.d/migtun-backports.sources >/dev/null <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
	$sudo apt-get update -qq
elif ! apt-cache policy qemu-system-x86 | grep -q bpo; then
	$sudo apt-get update -qq
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work" # apt-get download runs as _apt where it can
(cd "$work" && apt-get download -qq "${pkgs[@]/%//$suite}" 2>/dev/null)

# The libraries the binaries link against come from Debian 12: every
# dependency that is not one of the unpacked packages themselves.
libs=()
for deb in "$work"/*.deb; do
	for dep in $(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed -E 's/\(.*\)//; s/\|.*//; s/ //g'); do
		case $dep in
		qemu-* | seabios | ipxe-qemu | libjack-0.125 | "") ;;
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
$sudo mkdir -p "$prefix.tmp/bin"
$sudo tee "$prefix.tmp/bin/qemu-system-x86_64" >/dev/null <<WRAPPER
#!/bin/sh
# QEMU from $suite, unpacked by migtun's scripts/qemu-next.sh: its own
# modules and firmware, not the system QEMU's.
QEMU_MODULE_DIR='$prefix/usr/lib/x86_64-linux-gnu/qemu' exec '$prefix/usr/bin/qemu-system-x86_64' -L '$prefix/usr/share/qemu' -L '$prefix/usr/share/seabios' "\$@"
WRAPPER
$sudo chmod 755 "$prefix.tmp/bin/qemu-system-x86_64"
$sudo rm -rf "$prefix"
$sudo mv "$prefix.tmp" "$prefix"
"$prefix/bin/qemu-system-x86_64" --version | head -1 >&2
