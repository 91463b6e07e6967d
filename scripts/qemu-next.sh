#!/usr/bin/env bash
# Installs the newer QEMU generation beside Debian 12's own: QEMU 10.0 from
# bookworm-backports, unpacked (dpkg -x) into a prefix so that it does not
# replace the system's QEMU 7.2. The tests find it there (internal/vmtest,
# QEMUGenerations) and run it with -L at the prefix's share/qemu and
# share/seabios, so it uses its own firmware.
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
pkgs=(qemu-system-x86 qemu-system-common qemu-system-data seabios qemu-utils)

if "$prefix/usr/bin/qemu-system-x86_64" --version >/dev/null 2>&1; then
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
		qemu-* | seabios | ipxe-qemu | "") ;;
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
"$prefix/usr/bin/qemu-system-x86_64" --version | head -1 >&2
