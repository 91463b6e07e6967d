package tunnel

import (
	"context"
	"net"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"unsafe"
)

// sockopts reads the congestion control and send buffer of c.
func sockopts(t *testing.T, c *net.TCPConn) (string, int) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var cc string
	var buf int
	rc.Control(func(fd uintptr) {
		b := make([]byte, 16)
		n := uint32(len(b))
		if _, _, e := syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, syscall.IPPROTO_TCP, syscall.TCP_CONGESTION,
			uintptr(unsafe.Pointer(&b[0])), uintptr(unsafe.Pointer(&n)), 0); e != 0 {
			t.Errorf("getsockopt TCP_CONGESTION: %v", e)
		}
		cc = strings.TrimRight(string(b[:n]), "\x00")
		buf, err = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF)
	})
	return cc, buf
}

// TestTCPControl: the congestion control and buffers of Config reach both
// the dialed socket and the accepted one (inherited from the listener).
func TestTCPControl(t *testing.T) {
	have := availableCongestion()
	for _, tc := range []struct {
		cc, want string
		buf      int
	}{
		{"cubic", "cubic", 8 << 20},
		{"reno", "reno", 1 << 20},
		{"", "bbr", 0},
	} {
		if !slices.Contains(have, tc.want) {
			t.Logf("the kernel has no %s (%v): not checked", tc.want, have)
			continue
		}
		cfg := &Config{Congestion: tc.cc, SocketBuffer: tc.buf}
		if tc.buf == 0 {
			cfg.SocketBuffer = DefaultSocketBuffer
		}
		ctl := cfg.tcpControl()
		ln, err := (&net.ListenConfig{Control: ctl}).Listen(context.Background(), "tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		c, err := (&net.Dialer{Control: ctl}).Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		for name, conn := range map[string]net.Conn{"dialed": c, "accepted": s} {
			cc, buf := sockopts(t, conn.(*net.TCPConn))
			if cc != tc.want {
				t.Errorf("Congestion %q: %s socket uses %q, want %q", tc.cc, name, cc, tc.want)
			}
			// The kernel doubles SO_SNDBUF; without CAP_NET_ADMIN it caps
			// it at net.core.wmem_max.
			if os.Geteuid() == 0 && buf != 2*cfg.SocketBuffer {
				t.Errorf("SocketBuffer %d: %s socket's SO_SNDBUF is %d, want %d", cfg.SocketBuffer, name, buf, 2*cfg.SocketBuffer)
			}
		}
		c.Close()
		s.Close()
		ln.Close()
	}
}

func TestCheckCongestion(t *testing.T) {
	if err := checkCongestion("no-such-cc"); err == nil {
		t.Error("an unknown congestion control was accepted")
	}
	for _, ok := range []string{"", CongestionKernel, "reno"} {
		if err := checkCongestion(ok); err != nil {
			t.Errorf("checkCongestion(%q): %v", ok, err)
		}
	}
}

// TestPlainBuffer: without CAP_NET_ADMIN a buffer is set only when the
// capped, doubled size is no smaller than what autotuning would reach, so
// a host with Debian's default limits (208 KiB) keeps autotuning's 4 MiB
// and more instead of being locked at 416 KiB.
func TestPlainBuffer(t *testing.T) {
	for _, tc := range []struct {
		n, limit, auto int
		want           bool
	}{
		{16 << 20, 212992, 4 << 20, false}, // Debian's defaults: keep autotuning
		{16 << 20, 4 << 20, 4 << 20, true}, // 8 MiB granted beats 4 MiB
		{16 << 20, 16 << 20, 6 << 20, true},
		{1 << 20, 16 << 20, 6 << 20, true},  // within the limit: as asked
		{16 << 20, 2 << 20, 6 << 20, false}, // locked at 4 MiB, autotuning goes to 6
		{16 << 20, 0, 0, true},              // limits unknown
	} {
		if got := plainBuffer(tc.n, tc.limit, tc.auto); got != tc.want {
			t.Errorf("plainBuffer(%d, limit %d, auto %d) = %v, want %v", tc.n, tc.limit, tc.auto, got, tc.want)
		}
	}
	for _, tc := range [][4]int{{16 << 20, 212992, 4 << 20, 4 << 20}, {16 << 20, 4 << 20, 4 << 20, 8 << 20}, {1 << 20, 4 << 20, 6 << 20, 1 << 20}} {
		if got := plainGranted(tc[0], tc[1], tc[2]); got != tc[3] {
			t.Errorf("plainGranted(%d, limit %d, auto %d) = %d, want %d", tc[0], tc[1], tc[2], got, tc[3])
		}
	}
	if canForceBuffers() != (os.Geteuid() == 0) {
		t.Logf("CAP_NET_ADMIN differs from being root here (euid %d)", os.Geteuid())
	}
	if canForceBuffers() && BufferWarning(DefaultSocketBuffer) != "" {
		t.Errorf("a process that may force buffers is warned: %s", BufferWarning(DefaultSocketBuffer))
	}
}
