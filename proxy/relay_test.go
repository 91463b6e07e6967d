package proxy

import (
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/migtun/migtun/internal/leaktest"
	"github.com/migtun/migtun/internal/testpki"
	"github.com/migtun/migtun/tunnel"
)

// The relay tests run over real kernel sockets, never net.Pipe: the local
// leg is a connected UNIX or TCP socket pair, the remote leg a stream of a
// tunnel Listener/Dialer pair on loopback.
//
//	app ⇄ local ══ relay ══ near ⇄ (tunnel) ⇄ far

var (
	localNets  = []string{"unix", "tcp"}
	transports = []tunnel.Transport{tunnel.TLS, tunnel.QUIC, tunnel.Plain}
)

// safety bounds a whole transfer so that a hang fails the test instead of
// reaching the test binary's timeout. It is not a performance assertion.
const safety = 2 * time.Minute

// halfConn is a connection whose write side can end alone.
type halfConn interface {
	net.Conn
	CloseWrite() error
}

// localPair returns the two ends of a connected socket of network ("unix"
// or "tcp").
func localPair(tb testing.TB, network string) (a, b halfConn) {
	tb.Helper()
	var ln net.Listener
	var err error
	switch network {
	case "unix":
		dir, derr := os.MkdirTemp("", "px") // short: UNIX paths end at 107 bytes
		if derr != nil {
			tb.Fatal(derr)
		}
		tb.Cleanup(func() { os.RemoveAll(dir) })
		ln, err = net.Listen("unix", filepath.Join(dir, "s"))
	case "tcp":
		ln, err = net.Listen("tcp", "127.0.0.1:0")
	default:
		tb.Fatalf("unknown network %q", network)
	}
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial(network, ln.Addr().String())
	if err != nil {
		ln.Close()
		<-accepted
		tb.Fatal(err)
	}
	s := <-accepted
	if s == nil {
		c.Close()
		tb.Fatal("accept failed")
	}
	tb.Cleanup(func() { c.Close(); s.Close() })
	return c.(halfConn), s.(halfConn)
}

// streamPair opens one stream from a Dialer to a Listener of transport tr
// and returns the dialer's end (near) and the listener's (far).
func streamPair(tb testing.TB, tr tunnel.Transport) (near, far tunnel.Stream) {
	tb.Helper()
	ca := testpki.NewCA(tb)
	src, dst := ca.NewHost(tb, "src"), ca.NewHost(tb, "dst")
	ln, err := tunnel.Listen("127.0.0.1:0", &tunnel.Config{
		Transport: tr, ServerTLS: dst.Server, ClientTLS: dst.Client, AllowPlaintext: true,
	})
	if err != nil {
		tb.Fatal(err)
	}
	d, err := tunnel.NewDialer(&tunnel.Config{Transport: tr, ServerTLS: src.Server, ClientTLS: src.Client, AllowPlaintext: true})
	if err != nil {
		ln.Close()
		tb.Fatal(err)
	}
	tb.Cleanup(func() { d.Close(); ln.Close() })

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	type result struct {
		s   tunnel.Stream
		err error
	}
	accepted := make(chan result, 1)
	go func() {
		in, err := ln.Accept(ctx)
		if err != nil {
			accepted <- result{nil, err}
			return
		}
		s, err := in.Accept()
		accepted <- result{s, err}
	}()
	near, err = d.Open(ctx, ln.Addr().String(), tunnel.Header{Kind: tunnel.KindData, Channel: "main"})
	if err != nil {
		cancel()
		<-accepted
		tb.Fatal(err)
	}
	r := <-accepted
	if r.err != nil {
		near.Close()
		tb.Fatal(r.err)
	}
	tb.Cleanup(func() { near.Close(); r.s.Close() })
	return near, r.s
}

// rig is a relay running between a local socket pair and a stream pair.
type rig struct {
	app    halfConn      // the local application's end
	local  halfConn      // the relay's local leg
	near   tunnel.Stream // the relay's remote leg
	far    tunnel.Stream // the peer's end of the stream
	counts Counts

	finished chan struct{} // closed when relay returns
	err      error         // relay's result
}

// startRelay runs relay over a fresh socket pair of network and stream
// pair of transport tr.
func startRelay(tb testing.TB, network string, tr tunnel.Transport) *rig {
	tb.Helper()
	app, local := localPair(tb, network)
	near, far := streamPair(tb, tr)
	return runRelay(tb, app, local, near, far)
}

func runRelay(tb testing.TB, app, local halfConn, near, far tunnel.Stream) *rig {
	r := &rig{app: app, local: local, near: near, far: far, finished: make(chan struct{})}
	go func() {
		defer close(r.finished)
		r.err = relay(local, near, &r.counts)
	}()
	tb.Cleanup(func() {
		r.app.Close()
		r.far.Abort()
		r.wait(tb)
	})
	return r
}

// wait returns relay's result; a relay still running after 10 seconds is
// a failure.
func (r *rig) wait(tb testing.TB) error {
	tb.Helper()
	select {
	case <-r.finished:
		return r.err
	case <-time.After(10 * time.Second):
		tb.Fatal("relay did not return within 10s")
		return nil
	}
}

// forEachLeg runs test for every local network and transport.
func forEachLeg(t *testing.T, test func(t *testing.T, network string, tr tunnel.Transport)) {
	for _, network := range localNets {
		for _, tr := range transports {
			t.Run(network+"/"+string(tr), func(t *testing.T) {
				leaktest.Check(t)
				test(t, network, tr)
			})
		}
	}
}

// sendRandom writes n pseudo-random bytes made from seed to w and returns
// their digest.
func sendRandom(w io.Writer, n int64, seed byte) ([32]byte, error) {
	h := sha256.New()
	src := io.TeeReader(io.LimitReader(rand.NewChaCha8([32]byte{seed}), n), h)
	_, err := io.CopyBuffer(w, struct{ io.Reader }{src}, make([]byte, 256<<10))
	return [32]byte(h.Sum(nil)), err
}

// sendAndClose is sendRandom followed by a half close.
func sendAndClose(c halfConn, n int64, seed byte) ([32]byte, error) {
	sum, err := sendRandom(c, n, seed)
	if err == nil {
		err = c.CloseWrite()
	}
	return sum, err
}

// receiveDigest reads r to EOF and returns the byte count and digest.
func receiveDigest(r io.Reader) (int64, [32]byte, error) {
	h := sha256.New()
	n, err := io.CopyBuffer(h, struct{ io.Reader }{r}, make([]byte, 256<<10))
	return n, [32]byte(h.Sum(nil)), err
}

// checkDuplex sends size bytes each way at once, both ends half-closing
// when done, and checks every byte arrived intact.
func checkDuplex(t *testing.T, r *rig, size int64) {
	t.Helper()
	r.app.SetDeadline(time.Now().Add(safety))
	r.far.SetDeadline(time.Now().Add(safety))
	type end struct {
		n   int64
		sum [32]byte
		err error
	}
	var upSent, downSent, upGot, downGot end
	var wg sync.WaitGroup
	wg.Go(func() { upSent.sum, upSent.err = sendAndClose(r.app, size, 1) })
	wg.Go(func() { downSent.sum, downSent.err = sendAndClose(r.far, size, 2) })
	wg.Go(func() { upGot.n, upGot.sum, upGot.err = receiveDigest(r.far) })
	wg.Go(func() { downGot.n, downGot.sum, downGot.err = receiveDigest(r.app) })
	wg.Wait()
	for name, e := range map[string]end{"app send": upSent, "far send": downSent, "far receive": upGot, "app receive": downGot} {
		if e.err != nil {
			t.Errorf("%s: %v", name, e.err)
		}
	}
	if upGot.n != size || upGot.sum != upSent.sum {
		t.Errorf("up: %d bytes arrived (digest match %v), sent %d", upGot.n, upGot.sum == upSent.sum, size)
	}
	if downGot.n != size || downGot.sum != downSent.sum {
		t.Errorf("down: %d bytes arrived (digest match %v), sent %d", downGot.n, downGot.sum == downSent.sum, size)
	}
	if err := r.wait(t); err != nil {
		t.Errorf("relay: %v", err)
	}
	if up, down := r.counts.Up.Load(), r.counts.Down.Load(); up != size || down != size {
		t.Errorf("counts: up %d, down %d; want %d each", up, down, size)
	}
}

func TestRelayDuplex(t *testing.T) {
	leaktest.Check(t)
	forEachLeg(t, func(t *testing.T, network string, tr tunnel.Transport) {
		checkDuplex(t, startRelay(t, network, tr), 16<<20)
	})
}

// checkHalfClose has first end its direction after a short message; second
// must see the message and EOF, then send 4 MiB that must all reach first,
// followed by EOF.
func checkHalfClose(t *testing.T, r *rig, first, second halfConn) {
	t.Helper()
	first.SetDeadline(time.Now().Add(safety))
	second.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := first.Write([]byte("last words")); err != nil {
		t.Fatal(err)
	}
	if err := first.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(second)
	if err != nil || string(got) != "last words" {
		t.Fatalf("got %q, %v; want %q then EOF within 10s", got, err, "last words")
	}
	second.SetDeadline(time.Now().Add(safety))
	const size = 4 << 20
	type sent struct {
		sum [32]byte
		err error
	}
	sentc := make(chan sent, 1)
	go func() {
		sum, err := sendAndClose(second, size, 3)
		sentc <- sent{sum, err}
	}()
	n, sum, err := receiveDigest(first)
	s := <-sentc
	if s.err != nil {
		t.Fatalf("sending after the other side's half close: %v", s.err)
	}
	if err != nil || n != size || sum != s.sum {
		t.Fatalf("after half close: received %d of %d bytes (digest match %v), %v", n, size, sum == s.sum, err)
	}
	if err := r.wait(t); err != nil {
		t.Fatalf("relay: %v", err)
	}
}

func TestRelayHalfClose(t *testing.T) {
	leaktest.Check(t)
	forEachLeg(t, func(t *testing.T, network string, tr tunnel.Transport) {
		t.Run("local first", func(t *testing.T) {
			r := startRelay(t, network, tr)
			checkHalfClose(t, r, r.app, r.far)
		})
		t.Run("remote first", func(t *testing.T) {
			r := startRelay(t, network, tr)
			checkHalfClose(t, r, r.far, r.app)
		})
	})
}

// readEnd reads c until it ends and returns nil for EOF, else the error.
// A read still waiting 5 seconds after the failure fails the test.
func readEnd(t *testing.T, c net.Conn, what string) error {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("%s: still open 5s after the failure", what)
	}
	return err
}

// pingThrough sends a few bytes from one end to the other, to show the
// relay is up before it is broken.
func pingThrough(t *testing.T, from, to net.Conn) {
	t.Helper()
	to.SetReadDeadline(time.Now().Add(safety))
	if _, err := from.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(to, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
}

// TestRelayRemoteAbort aborts the stream at the peer: the relay must fail
// and the local application must see its connection end.
func TestRelayRemoteAbort(t *testing.T) {
	leaktest.Check(t)
	forEachLeg(t, func(t *testing.T, network string, tr tunnel.Transport) {
		r := startRelay(t, network, tr)
		pingThrough(t, r.far, r.app)
		pingThrough(t, r.app, r.far)
		r.far.Abort()
		// A TCP peer must see a reset: a clean EOF would pass for success.
		if err := readEnd(t, r.app, "local connection"); network == "tcp" && err == nil {
			t.Error("local TCP peer saw a clean EOF, want a reset")
		}
		if err := r.wait(t); err == nil {
			t.Fatal("relay returned no error after the peer aborted the stream")
		}
	})
}

// TestRelayLocalReset resets the local TCP connection: the far end of the
// stream must see a failure, not a clean EOF.
func TestRelayLocalReset(t *testing.T) {
	leaktest.Check(t)
	for _, tr := range transports {
		t.Run(string(tr), func(t *testing.T) {
			leaktest.Check(t)
			r := startRelay(t, "tcp", tr)
			pingThrough(t, r.app, r.far)
			r.app.(*net.TCPConn).SetLinger(0)
			r.app.Close()
			if err := readEnd(t, r.far, "stream"); err == nil {
				t.Error("far end saw a clean EOF, want the stream aborted")
			}
			if err := r.wait(t); err == nil {
				t.Fatal("relay returned no error after the local connection was reset")
			}
		})
	}
}

// TestRelayLocalClosed closes the local connection while the peer is
// writing: the relay ends and closes both legs, and the peer's writes fail.
func TestRelayLocalClosed(t *testing.T) {
	leaktest.Check(t)
	forEachLeg(t, func(t *testing.T, network string, tr tunnel.Transport) {
		r := startRelay(t, network, tr)
		r.far.SetWriteDeadline(time.Now().Add(safety))
		farErr := make(chan error, 1)
		go func() { // the far side writes until the relay stops taking bytes
			_, err := sendRandom(r.far, 1<<40, 4)
			farErr <- err
		}()
		if _, err := io.ReadFull(r.app, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
		r.app.Close()
		r.wait(t)
		if _, err := r.local.Write([]byte{0}); !errors.Is(err, net.ErrClosed) {
			t.Errorf("local leg still open after relay returned: write gave %v", err)
		}
		if _, err := r.near.Write([]byte{0}); err == nil {
			t.Errorf("stream still open after relay returned")
		}
		select {
		case err := <-farErr:
			var ne net.Error
			if err == nil || errors.As(err, &ne) && ne.Timeout() {
				t.Errorf("far writer: got %v, want the stream's failure", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("far writer still writing 10s after the relay ended")
		}
	})
}

// TestRelayRecordPath checks which legs take the record fast path: a tls
// stream (the bulk record layer) moves whole records through its ReadFrom
// and WriteTo; QUIC streams have neither, so they use pipe's large buffer,
// and local sockets and plain streams are left to pipe and splice.
// checkDuplex also checks the counts are exact on the fast path.
func TestRelayRecordPath(t *testing.T) {
	leaktest.Check(t)
	near, _ := streamPair(t, tunnel.TLS)
	if _, ok := recordWriter(near); !ok {
		t.Errorf("a tls stream (%T) has no record ReadFrom", near)
	}
	if _, ok := recordReader(near); !ok {
		t.Errorf("a tls stream (%T) has no record WriteTo", near)
	}
	q, _ := streamPair(t, tunnel.QUIC)
	if _, ok := recordWriter(q); ok {
		t.Errorf("a quic stream (%T) would take the record path", q)
	}
	if _, ok := recordReader(q); ok {
		t.Errorf("a quic stream (%T) would take the record path", q)
	}
	a, _ := localPair(t, "tcp")
	if _, ok := recordWriter(a); ok {
		t.Error("a local TCP socket would take the record path")
	}
	checkDuplex(t, startRelay(t, "unix", tunnel.TLS), 5<<20+3)
}

// recordSink stands in for a record stream's ReadFrom: it sends each read
// whole, and its third send fails.
type recordSink struct{ sent int64 }

func (s *recordSink) ReadFrom(r io.Reader) (int64, error) {
	buf := make([]byte, 10)
	for i := 0; ; i++ {
		n, err := r.Read(buf)
		if i == 2 && n > 0 {
			return s.sent, errors.New("send failed")
		}
		s.sent += int64(n)
		if err == io.EOF {
			return s.sent, nil
		}
		if err != nil {
			return s.sent, err
		}
	}
}

// TestReadFromCounted checks that the up count never includes bytes that
// were read from the local socket but not sent.
func TestReadFromCounted(t *testing.T) {
	var n atomic.Int64
	err := readFromCounted(&recordSink{}, io.LimitReader(zeros{}, 100), &n)
	if err == nil || n.Load() != 20 {
		t.Fatalf("after a failed send: err %v, count %d; want an error and 20", err, n.Load())
	}
	n.Store(0)
	if err := readFromCounted(&recordSink{}, io.LimitReader(zeros{}, 15), &n); err != nil || n.Load() != 15 {
		t.Fatalf("clean end: err %v, count %d; want nil and 15", err, n.Load())
	}
}

type zeros struct{}

func (zeros) Read(b []byte) (int, error) { clear(b); return len(b), nil }
