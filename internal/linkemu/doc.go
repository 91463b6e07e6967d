// Package linkemu emulates a real network link between two network
// namespaces, for tests and benchmarks that must see latency, loss and a
// rate limit: the kernel of this machine has no netem qdisc, so the link is
// a user-space relay.
//
// Start creates two fresh network namespaces, A and B, each with a TUN
// device (10.77.0.1 in A, 10.77.0.2 in B, point to point) and loopback up.
// One relay in the calling process reads every IP packet a namespace sends
// into its TUN device and writes it into the other's, after applying, per
// direction: random loss (seeded), a rate limit with a bounded FIFO queue
// (tail drop), a one-way delay, and optional reordering (a packet held back
// by an extra delay). Nothing else connects the namespaces to each other or
// to the host, so traffic between A and B crosses only the emulated link.
//
//	l, err := linkemu.Start(ctx, linkemu.Symmetric(40*time.Millisecond, 0.001, 400e6))
//	...
//	defer l.Close()
//	cmd := exec.Command("ip", l.Exec(linkemu.B, "migtun", "serve", "--listen", l.Addr(linkemu.B)+":0")...)
//	ln, err := l.ListenTCP(linkemu.B, nil, ":0") // a listener of this process, inside B
//
// Processes run inside a namespace through "ip netns exec" (Exec); this
// process creates sockets inside one with ListenTCP, DialTCP or Do. UNIX
// sockets named by path are not namespaced, so a process in A and one in B
// still reach each other's path sockets: only IP traffic crosses the link.
//
// The link cleans up after itself: Close (or the end of Start's context)
// closes the TUN devices and deletes both namespaces, and Start deletes the
// namespaces of earlier runs whose process has died. Check measures the link
// it runs on (round trip by TCP handshakes, rate by a TCP transfer) so a
// benchmark can show that the emulator does what it says and is not itself
// the bottleneck; Stats counts packets, drops and how late the relay wrote
// packets compared with their schedule.
//
// Start needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), /dev/net/tun and the
// ip command (iproute2).
package linkemu
