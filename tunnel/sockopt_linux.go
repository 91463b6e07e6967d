package tunnel

import (
	"fmt"
	"os"
	"slices"
	"strings"
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
	return func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if cc != "" {
				if err := syscall.SetsockoptString(int(fd), syscall.IPPROTO_TCP, syscall.TCP_CONGESTION, cc); err != nil && c.Congestion != "" {
					serr = fmt.Errorf("setting TCP congestion control %s: %w", cc, err)
				}
			}
			if buf > 0 {
				setBuffer(int(fd), syscall.SO_SNDBUFFORCE, syscall.SO_SNDBUF, buf)
				setBuffer(int(fd), syscall.SO_RCVBUFFORCE, syscall.SO_RCVBUF, buf)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}
}

// setBuffer sets a socket buffer with the forcing option, which goes past
// net.core.wmem_max and rmem_max but needs CAP_NET_ADMIN, else with the
// plain one, which the kernel caps at those limits.
func setBuffer(fd, force, plain, n int) {
	if syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, force, n) != nil {
		_ = syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, plain, n)
	}
}
