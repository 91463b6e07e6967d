package proxy

import (
	"io"
	"runtime"
	"testing"

	"github.com/migtun/migtun/internal/leaktest"
	"github.com/migtun/migtun/tunnel"
)

// TestRelaySplice checks that a relay between a UNIX socket and a plain
// stream takes the kernel path: both legs pipe sees are bare kernel
// sockets, so io.Copy reaches (*net.TCPConn).ReadFrom/WriteTo and splice(2).
func TestRelaySplice(t *testing.T) {
	leaktest.Check(t)
	if runtime.GOOS != "linux" {
		t.Skip("splice(2) is Linux only")
	}
	app, local := localPair(t, "unix")
	near, far := streamPair(t, tunnel.Plain)
	raw, ok := tunnel.RawConn(near)
	if !ok {
		t.Fatal("tunnel.RawConn: a plain stream does not expose its TCP socket")
	}
	if !kernelSocket(local) || !kernelSocket(raw) {
		t.Fatalf("kernelSocket: local %T %v, remote %T %v; want both true",
			local, kernelSocket(local), raw, kernelSocket(raw))
	}
	for _, tr := range []tunnel.Transport{tunnel.TLS, tunnel.QUIC} {
		n, f := streamPair(t, tr)
		if _, ok := tunnel.RawConn(n); ok {
			t.Errorf("tunnel.RawConn: a %s stream claims a raw socket", tr)
		}
		if kernelSocket(n) || kernelSocket(f) {
			t.Errorf("kernelSocket: a %s stream counts as a bare socket", tr)
		}
	}
	// The kernel path moves the bytes intact, and the half closes too.
	checkDuplex(t, runRelay(t, app, local, near, far), 16<<20)
}

// BenchmarkRelay moves 64 MiB per op from a UNIX socket through a relay
// into a stream of each transport.
// BenchmarkRelay moves 64 MiB per op through a relay between a UNIX socket
// and a tunnel stream: "up" from the local socket into the tunnel (the
// relay encrypts), "down" from the tunnel to the local socket (it decrypts).
func BenchmarkRelay(b *testing.B) {
	for _, tr := range transports {
		for _, dir := range []string{"up", "down"} {
			b.Run(string(tr)+"/"+dir, func(b *testing.B) {
				leaktest.Check(b)
				r := startRelay(b, "unix", tr)
				const size = 64 << 20
				var w io.Writer = r.app
				var rd io.Reader = r.far
				if dir == "down" {
					w, rd = r.far, r.app
				}
				wbuf, rbuf := make([]byte, 1<<20), make([]byte, 1<<20)
				b.SetBytes(size)
				for b.Loop() {
					sent := make(chan error, 1)
					go func() { sent <- writeN(w, wbuf, size) }()
					if err := readN(rd, rbuf, size); err != nil {
						b.Fatal(err)
					}
					if err := <-sent; err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// writeN writes n bytes to w, len(buf) at a time.
func writeN(w io.Writer, buf []byte, n int) error {
	for n > 0 {
		k, err := w.Write(buf[:min(n, len(buf))])
		if err != nil {
			return err
		}
		n -= k
	}
	return nil
}

// readN reads exactly n bytes from r into buf, len(buf) at a time.
func readN(r io.Reader, buf []byte, n int) error {
	for n > 0 {
		k, err := r.Read(buf[:min(n, len(buf))])
		n -= k
		if err != nil && n > 0 {
			return err
		}
	}
	return nil
}
