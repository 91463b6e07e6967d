package tunnel

import (
	"net"
	"syscall"
	"time"
)

// tcpUserTimeout is TCP_USER_TIMEOUT from linux/tcp.h.
const tcpUserTimeout = 0x12

// setUserTimeout bounds how long data sent on c may stay unacknowledged
// before the kernel gives the connection up: without it a sender whose peer
// vanished (a partition, a host gone) retransmits for about 15 minutes. A
// live peer that only closes its window (a slow reader) keeps acknowledging
// the kernel's window probes, so it is not affected.
func setUserTimeout(c *net.TCPConn, d time.Duration) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = raw.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, tcpUserTimeout, int(d.Milliseconds()))
	})
	if err != nil {
		return err
	}
	return serr
}
