#!/usr/bin/env bash
# Runs two independent libvirt QEMU daemons ("hosts" a and b) on one machine,
# each in its own mount namespace with private /etc/libvirt, /run/libvirt,
# /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt and /run/migtun, so
# that the same path (a disk image, a migration socket in /run/migtun) is a
# different file on each "host". Needs root, util-linux (unshare, nsenter) and
# libvirt-daemon-driver-qemu (libvirtd; Debian 12 has no virtqemud).
#
#   libvirt-hosts.sh start DIR      start both daemons; prints their virsh URIs
#   libvirt-hosts.sh exec DIR HOST CMD...   run CMD in HOST's mount namespace
#   libvirt-hosts.sh stop DIR       stop both daemons (and their QEMUs)
#
# Each daemon's client socket is outside the namespaces, in DIR/HOST/sock,
# so virsh in the root namespace reaches both:
#   virsh -c 'qemu+unix:///system?socket=DIR/a/sock/libvirt-sock' …
#
# With LIBVIRT_PREFIX set (e.g. /opt/migtun/libvirt-11.3, unpacked by
# libvirt-next.sh), both daemons are that prefix's libvirtd, loading its
# libraries and drivers; run that prefix's virsh the same way:
#   LD_LIBRARY_PATH=$LIBVIRT_PREFIX/usr/lib/x86_64-linux-gnu $LIBVIRT_PREFIX/usr/bin/virsh …
set -euo pipefail

libvirtd=libvirtd
virsh=virsh
if [ -n "${LIBVIRT_PREFIX:-}" ]; then
	export LD_LIBRARY_PATH="$LIBVIRT_PREFIX/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
	export LIBVIRT_DRIVER_DIR="$LIBVIRT_PREFIX/usr/lib/x86_64-linux-gnu/libvirt/connection-driver"
	libvirtd=$LIBVIRT_PREFIX/usr/sbin/libvirtd
	virsh=$LIBVIRT_PREFIX/usr/bin/virsh
fi

private=(/etc/libvirt /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt /run/migtun)

host_dirs() { # host dir -> the private directory for each path in $private
	local d=$1
	echo "$d/etc $d/run $d/lib $d/cache $d/log $d/migtun"
}

start_host() {
	local dir=$1 h=$2 uuid=$3
	local d=$dir/$h
	mkdir -p "$d"/{etc,run,lib/images,cache,log,migtun,sock}
	chmod 755 "$dir" "$d"
	cat >"$d/etc/libvirtd.conf" <<EOF
unix_sock_dir = "$d/sock"
auth_unix_rw = "none"
auth_unix_ro = "none"
host_uuid = "$uuid"
log_outputs = "3:file:$d/libvirtd.log"
EOF
	cat >"$d/etc/qemu.conf" <<EOF
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = []
cgroup_controllers = []
stdio_handler = "file"
EOF
	: >"$d/etc/libvirt.conf"
	local p
	for p in "${private[@]}"; do mkdir -p "$p"; done
	# The namespace's first process binds the private directories, writes its
	# PID (for nsenter) and becomes libvirtd.
	local dirs
	read -r -a dirs <<<"$(host_dirs "$d")"
	local script="set -e"
	local i
	for i in "${!private[@]}"; do
		script+="; mount --bind '${dirs[$i]}' '${private[$i]}'"
	done
	script+="; echo \$\$ >'$d/ns.pid'; exec '$libvirtd' -f '$d/etc/libvirtd.conf' -p '$d/libvirtd.pid'"
	rm -f "$d/ns.pid" "$d/sock/libvirt-sock"
	setsid unshare -m --propagation private -- sh -c "$script" >"$d/stdout.log" 2>&1 </dev/null &
	local n
	for n in $(seq 100); do
		[ -S "$d/sock/libvirt-sock" ] && break
		sleep 0.1
	done
	if [ ! -S "$d/sock/libvirt-sock" ]; then
		echo "libvirtd for host $h did not start; its logs:" >&2
		cat "$d/stdout.log" "$d/libvirtd.log" >&2 2>/dev/null || true
		return 1
	fi
	echo "qemu+unix:///system?socket=$d/sock/libvirt-sock"
}

stop_host() {
	local d=$1/$2
	[ -f "$d/ns.pid" ] || return 0
	local pid
	pid=$(cat "$d/ns.pid")
	# Destroy running domains first so that no QEMU outlives its daemon.
	local uri="qemu+unix:///system?socket=$d/sock/libvirt-sock"
	if [ -S "$d/sock/libvirt-sock" ]; then
		local dom
		for dom in $("$virsh" -c "$uri" list --name 2>/dev/null); do
			"$virsh" -c "$uri" destroy "$dom" >/dev/null 2>&1 || true
		done
	fi
	kill "$pid" 2>/dev/null || true
	local n
	for n in $(seq 100); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -9 "$pid" 2>/dev/null || true
	rm -f "$d/ns.pid"
}

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { sed -n '2,15p' "$0" >&2; exit 2; }
case $cmd in
start)
	# libvirtd resolves its built-in QEMU user and group (Debian: libvirt-qemu)
	# before it reads qemu.conf; libvirt-daemon-system would create them.
	getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
	getent passwd libvirt-qemu >/dev/null || useradd --system --no-create-home --home-dir /var/lib/libvirt --shell /usr/sbin/nologin --gid libvirt-qemu libvirt-qemu
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd)
	start_host "$dir" a 5d1f3a52-0000-4000-8000-00000000000a
	start_host "$dir" b 5d1f3a52-0000-4000-8000-00000000000b
	;;
exec)
	h=$3
	shift 3
	exec nsenter -t "$(cat "$dir/$h/ns.pid")" -m -- "$@"
	;;
stop)
	stop_host "$dir" b
	stop_host "$dir" a
	;;
*)
	echo "unknown command $cmd" >&2
	exit 2
	;;
esac
