package tunnel

import (
	"net"
	"syscall"
	"testing"

	"github.com/migtun/migtun/internal/leaktest"
)

// TestQUICSocketBuffers checks that the UDP sockets under both ends of a
// quic connection have the large buffers quic-go asks for. quic-go raises
// them only on a *net.UDPConn it is handed directly (it then also sends
// with GSO and receives with recvmmsg); a wrapped socket loses all three
// without an error. Skipped when this host would not give the test's own
// socket such buffers either (no CAP_NET_ADMIN, small net.core.rmem_max).
func TestQUICSocketBuffers(t *testing.T) {
	leaktest.Check(t)
	if !hostAllowsBuffers(t) {
		t.Skip("this host does not allow 7 MiB UDP socket buffers")
	}
	p := newPair(t, QUIC)
	bulkPair(t, p) // dials, so the dialer has its socket
	p.d.mu.Lock()
	dialerConn := p.d.udpConn
	p.d.mu.Unlock()
	listenerConn, ok := p.ln.udp.(*net.UDPConn)
	if !ok {
		t.Fatalf("the listener's UDP socket is %T, want *net.UDPConn", p.ln.udp)
	}
	for name, c := range map[string]*net.UDPConn{"listener": listenerConn, "dialer": dialerConn} {
		rcv, snd := socketBuffers(t, c)
		if rcv < quicSocketBuffer || snd < quicSocketBuffer {
			t.Errorf("%s's UDP socket: receive buffer %d KiB, send buffer %d KiB; want at least %d KiB each",
				name, rcv>>10, snd>>10, quicSocketBuffer>>10)
		}
	}
}

// hostAllowsBuffers reports whether a fresh UDP socket of this process can
// be given quic-go's buffer size the way quic-go does it.
func hostAllowsBuffers(t *testing.T) bool {
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadBuffer(quicSocketBuffer)
	_ = c.SetWriteBuffer(quicSocketBuffer)
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	_ = raw.Control(func(fd uintptr) {
		_ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUFFORCE, quicSocketBuffer)
		_ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUFFORCE, quicSocketBuffer)
	})
	rcv, snd := socketBuffers(t, c)
	return rcv >= quicSocketBuffer && snd >= quicSocketBuffer
}

// socketBuffers returns the receive and send buffer sizes of c as
// getsockopt reports them.
func socketBuffers(t *testing.T, c *net.UDPConn) (rcv, snd int) {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var rerr, serr error
	if err := raw.Control(func(fd uintptr) {
		rcv, rerr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF)
		snd, serr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF)
	}); err != nil {
		t.Fatal(err)
	}
	if rerr != nil || serr != nil {
		t.Fatalf("getsockopt: %v, %v", rerr, serr)
	}
	return rcv, snd
}
