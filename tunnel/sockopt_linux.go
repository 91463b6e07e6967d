package tunnel

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// availableCongestion lists the congestion controls the kernel offers.
func availableCongestion() []string {
	b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_available_congestion_control")
	if err != nil {
		return nil
	}
	return strings.Fields(string(b))
}

// checkCongestion reports a congestion control name the kernel lacks.
func checkCongestion(name string) error {
	if name == "" || name == CongestionKernel {
		return nil
	}
	have := availableCongestion()
	if !slices.Contains(have, name) {
		return fmt.Errorf("tunnel: TCP congestion control %q is not available (the kernel has: %s; modprobe tcp_%s)",
			name, strings.Join(have, " "), name)
	}
	return nil
}

// tcpControl returns the net.Dialer and net.ListenConfig Control function
// that applies c's congestion control and socket buffers to a tunnel TCP
// socket before it connects or listens; accepted connections inherit both
// from the listening socket. Buffers set before connect also size the
// window scale the peers agree on in the handshake.
func (c *Config) tcpControl() func(network, address string, rc syscall.RawConn) error {
	cc := c.Congestion
	if cc == "" && slices.Contains(availableCongestion(), "bbr") {
		cc = "bbr"
	}
	if cc == CongestionKernel {
		cc = ""
	}
	buf := c.SocketBuffer
	// Read once, at the first socket that cannot force its buffers, not
	// at every connection.
	limits := sync.OnceValue(readBufferLimits)
	return func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if cc != "" {
				if err := syscall.SetsockoptString(int(fd), syscall.IPPROTO_TCP, syscall.TCP_CONGESTION, cc); err != nil && c.Congestion != "" {
					serr = fmt.Errorf("setting TCP congestion control %s: %w", cc, err)
				}
			}
			if buf > 0 {
				setBuffer(int(fd), syscall.SO_SNDBUFFORCE, syscall.SO_SNDBUF, buf, limits)
				setBuffer(int(fd), syscall.SO_RCVBUFFORCE, syscall.SO_RCVBUF, buf, limits)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}
}

// setBuffer sets a socket buffer of n bytes with the forcing option, which
// goes past net.core.wmem_max and rmem_max but needs CAP_NET_ADMIN. Without
// it, the plain option is capped at those limits and also switches off the
// kernel's autotuning for the socket, so it is used only when the capped
// buffer is no smaller than what autotuning would reach (see plainBuffer).
func setBuffer(fd, force, plain, n int, limits func() bufferLimits) {
	if syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, force, n) == nil {
		return
	}
	l := limits()
	limit, auto := l.sendMax, l.sendAuto
	if plain == syscall.SO_RCVBUF {
		limit, auto = l.recvMax, l.recvAuto
	}
	if plainBuffer(n, limit, auto) {
		_ = syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, plain, n)
	}
}

// plainBuffer says whether a buffer of n bytes set without the forcing
// option is worth it, when the kernel caps it at limit and autotuning
// would grow an unset buffer to auto: a buffer within the limit is set as
// asked; a capped one is locked at twice the limit (the kernel doubles
// what it grants, for its bookkeeping), which beats autotuning only when
// that is no less than auto. Unknown limits (0) set it.
func plainBuffer(n, limit, auto int) bool {
	if limit <= 0 || auto <= 0 || n <= limit {
		return true
	}
	return 2*limit >= auto
}

// plainGranted is the buffer a process without CAP_NET_ADMIN ends up
// with when it asks for n bytes (see plainBuffer).
func plainGranted(n, limit, auto int) int {
	switch {
	case limit <= 0 || n <= limit:
		return n
	case 2*limit >= auto:
		return 2 * limit
	}
	return auto
}

// bufferLimits are the kernel's socket buffer limits: the caps of the
// plain options (net.core.wmem_max, rmem_max) and the most autotuning
// grows a TCP buffer to (the last field of net.ipv4.tcp_wmem, tcp_rmem).
type bufferLimits struct {
	sendMax, recvMax, sendAuto, recvAuto int
}

// readBufferLimits reads the limits of this network namespace; a value it
// cannot read is 0.
func readBufferLimits() bufferLimits {
	last := func(path string) int {
		b, err := os.ReadFile(path)
		if err != nil {
			return 0
		}
		f := strings.Fields(string(b))
		if len(f) == 0 {
			return 0
		}
		n, _ := strconv.Atoi(f[len(f)-1])
		return n
	}
	return bufferLimits{
		sendMax: last("/proc/sys/net/core/wmem_max"), recvMax: last("/proc/sys/net/core/rmem_max"),
		sendAuto: last("/proc/sys/net/ipv4/tcp_wmem"), recvAuto: last("/proc/sys/net/ipv4/tcp_rmem"),
	}
}

// BufferWarning says, when it matters, that the tunnel's TCP connections
// cannot get socket buffers of n bytes on this host: a process without
// CAP_NET_ADMIN is held to net.core.wmem_max and rmem_max (or to
// autotuning's maximum when that is more). It returns "" when n is granted
// or not asked for (n <= 0).
func BufferWarning(n int) string {
	if n <= 0 || canForceBuffers() {
		return ""
	}
	l := readBufferLimits()
	send, recv := plainGranted(n, l.sendMax, l.sendAuto), plainGranted(n, l.recvMax, l.recvAuto)
	if send >= n && recv >= n {
		return ""
	}
	return fmt.Sprintf("TCP socket buffers of %d bytes asked (--tcp-buffer), but without CAP_NET_ADMIN this host grants %d to send and %d to receive "+
		"(net.core.wmem_max %d, rmem_max %d; autotuning up to %d and %d): one connection then moves at most that much per round trip. "+
		"Raise net.core.wmem_max and rmem_max to %d (sysctl), grant CAP_NET_ADMIN, or stripe each stream over several connections (--stripes 4, both hosts of this release)",
		n, send, recv, l.sendMax, l.recvMax, l.sendAuto, l.recvAuto, n)
}

// quicSocketBuffer is the UDP socket buffer quic-go asks for, each way
// (its DesiredReceiveBufferSize and DesiredSendBufferSize).
const quicSocketBuffer = 7 << 20

// QUICBufferWarning says, when it matters, that the UDP sockets of QUIC
// cannot get the buffers quic-go asks for on this host: without them a
// burst of packets overflows the socket and is lost, and quic-go's
// congestion control, which treats every loss as congestion, slows down.
// It returns "" when they are granted.
func QUICBufferWarning() string {
	if canForceBuffers() {
		return ""
	}
	l := readBufferLimits()
	if (l.recvMax <= 0 || 2*l.recvMax >= quicSocketBuffer) && (l.sendMax <= 0 || 2*l.sendMax >= quicSocketBuffer) {
		return ""
	}
	return fmt.Sprintf("QUIC's UDP sockets want %d-byte buffers, but without CAP_NET_ADMIN this host grants at most %d to receive and %d to send "+
		"(net.core.rmem_max, wmem_max, doubled): bursts will be dropped and QUIC will slow down. Raise both to %d (sysctl), grant CAP_NET_ADMIN, or use --transport tls",
		quicSocketBuffer, 2*l.recvMax, 2*l.sendMax, quicSocketBuffer)
}

// canForceBuffers reports whether this process may set socket buffers
// beyond the kernel's limits (SO_SNDBUFFORCE needs CAP_NET_ADMIN).
func canForceBuffers() bool {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer syscall.Close(fd)
	return syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_SNDBUFFORCE, 1<<20) == nil
}
