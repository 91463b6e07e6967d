package proxy_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/internal/leaktest"
	"github.com/migtun/migtun/internal/testlog"
	"github.com/migtun/migtun/internal/testpki"
	"github.com/migtun/migtun/proxy"
	"github.com/migtun/migtun/tunnel"
)

// The server tests run two proxy.Servers on loopback: a destination whose
// routes lead to UNIX sockets served by the test, and a source whose
// forwards lead to the destination.
//
//	client ⇄ forward socket ══ src ⇄ (tunnel) ⇄ dst ══ route socket ⇄ handler

func TestServer(t *testing.T) {
	leaktest.Check(t)
	for _, tr := range []tunnel.Transport{tunnel.TLS, tunnel.QUIC, tunnel.Plain} {
		t.Run(string(tr), func(t *testing.T) {
			for _, c := range []struct {
				name string
				test func(*testing.T, tunnel.Transport)
			}{
				{"echo", testEcho},
				{"order", testOrder},
				{"no route", testNoRoute},
				{"dial failed", testDialFailed},
				{"shutdown", testShutdown},
			} {
				t.Run(c.name, func(t *testing.T) {
					leaktest.Check(t)
					c.test(t, tr)
				})
			}
		})
	}
}

// logBuffer is a server's text log.
type logBuffer struct{ testlog.Buffer }

// line returns the first log line holding every fragment, or fails.
func (l *logBuffer) line(t *testing.T, fragments ...string) string {
	t.Helper()
	line := l.Line(fragments...)
	if line == "" {
		t.Fatalf("no log line mentions all of %q; log:\n%s", fragments, l.String())
	}
	return line
}

// sockDir returns a fresh directory with a short path, as UNIX socket
// paths end at 107 bytes and t.TempDir's can be long.
func sockDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "px")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func unixEndpoint(path string) endpoint.Endpoint {
	return endpoint.Endpoint{Network: "unix", Address: path}
}

// serveUnix serves path with handle, called with each connection's accept
// order. The cleanup closes the listener and the connections and waits for
// the handlers.
func serveUnix(t *testing.T, path string, handle func(n int, c net.Conn)) {
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	wg.Go(func() {
		for n := 0; ; n++ {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = true
			mu.Unlock()
			wg.Go(func() {
				handle(n, c)
				c.Close()
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
}

// echoConn sends back what it reads and half-closes at EOF.
func echoConn(_ int, c net.Conn) {
	io.Copy(c, c)
	c.(*net.UnixConn).CloseWrite()
}

// testbed is a destination server and a source server forwarding to it.
type testbed struct {
	dst, src       *proxy.Server
	dstLog, srcLog *logBuffer
	fwd            map[string]string // channel → path of its forward socket
}

// newTestbed starts a destination with routes and a source with one
// forward socket per channel in forwards, over transport tr.
func newTestbed(t *testing.T, tr tunnel.Transport, routes []proxy.Route, forwards ...string) *testbed {
	t.Helper()
	ca := testpki.NewCA(t)
	b := &testbed{dstLog: &logBuffer{}, srcLog: &logBuffer{}, fwd: map[string]string{}}
	b.dst = startServer(t, proxy.Config{
		Listen: "127.0.0.1:0", Tunnel: tunnelConfig(tr, ca.NewHost(t, "dst")), Routes: routes,
		Logger: slog.New(slog.NewTextHandler(b.dstLog, nil)),
	})
	dir := sockDir(t)
	var fwds []proxy.Forward
	for _, ch := range forwards {
		b.fwd[ch] = filepath.Join(dir, ch+".sock")
		fwds = append(fwds, proxy.Forward{Listen: unixEndpoint(b.fwd[ch]), Peer: b.dst.Addr().String(), Channel: ch})
	}
	b.src = startServer(t, proxy.Config{
		Tunnel: tunnelConfig(tr, ca.NewHost(t, "src")), Forwards: fwds,
		Logger: slog.New(slog.NewTextHandler(b.srcLog, nil)),
	})
	return b
}

func tunnelConfig(tr tunnel.Transport, h *testpki.Host) *tunnel.Config {
	return &tunnel.Config{Transport: tr, ServerTLS: h.Server, ClientTLS: h.Client, AllowPlaintext: true}
}

// startServer starts a server that the test's cleanup closes.
func startServer(t *testing.T, cfg proxy.Config) *proxy.Server {
	t.Helper()
	s, err := proxy.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// dialForward connects to a forward socket.
func dialForward(t *testing.T, path string) *net.UnixConn {
	t.Helper()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.UnixConn)
}

// readsEnd checks that a read on c returns (EOF or an error) within 5s.
func readsEnd(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("the client's connection is still open 5s after the failure")
	}
}

func testEcho(t *testing.T, tr tunnel.Transport) {
	target := filepath.Join(sockDir(t), "echo.sock")
	serveUnix(t, target, echoConn)
	b := newTestbed(t, tr, []proxy.Route{{Channel: "main", Target: unixEndpoint(target)}}, "main")
	c := dialForward(t, b.fwd["main"])
	c.SetDeadline(time.Now().Add(time.Minute))
	msg := make([]byte, 1<<20)
	rand.Read(msg)
	sent := make(chan error, 1)
	go func() {
		_, err := c.Write(msg)
		if err == nil {
			err = c.CloseWrite()
		}
		sent <- err
	}()
	got, err := io.ReadAll(c)
	if err := <-sent; err != nil {
		t.Fatal("send:", err)
	}
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo: %d of %d bytes back (equal %v), %v", len(got), len(msg), bytes.Equal(got, msg), err)
	}
}

// testOrder opens 8 connections to a forward one after another, each
// sending its index at once, and checks the route accepted them in that
// order; 20 rounds.
func testOrder(t *testing.T, tr tunnel.Transport) {
	type arrival struct {
		n     int  // accept order at the route
		index byte // first byte: the client's connection index
		err   error
	}
	arrivals := make(chan arrival, 16)
	target := filepath.Join(sockDir(t), "rec.sock")
	serveUnix(t, target, func(n int, c net.Conn) {
		var b [1]byte
		_, err := io.ReadFull(c, b[:])
		arrivals <- arrival{n, b[0], err}
		io.Copy(io.Discard, c)
	})
	b := newTestbed(t, tr, []proxy.Route{{Channel: "main", Target: unixEndpoint(target)}}, "main")
	const conns = 8
	for round := range 20 {
		var clients []net.Conn
		for i := range conns {
			c := dialForward(t, b.fwd["main"])
			if _, err := c.Write([]byte{byte(i)}); err != nil {
				t.Fatal(err)
			}
			clients = append(clients, c)
		}
		order := make([]int, conns)
		for range conns {
			select {
			case a := <-arrivals:
				k := a.n - round*conns
				if a.err != nil || k < 0 || k >= conns {
					t.Fatalf("round %d: arrival #%d: %v", round, a.n, a.err)
				}
				order[k] = int(a.index)
			case <-time.After(10 * time.Second):
				t.Fatalf("round %d: connections missing at the route after 10s", round)
			}
		}
		for k, index := range order {
			if index != k {
				t.Fatalf("round %d: the route accepted the connections in order %v", round, order)
			}
		}
		for _, c := range clients {
			c.Close()
		}
	}
}

// testNoRoute forwards a channel the destination has no route for.
func testNoRoute(t *testing.T, tr tunnel.Transport) {
	b := newTestbed(t, tr, nil, "nbd")
	readsEnd(t, dialForward(t, b.fwd["nbd"]))
	b.src.Close() // waits for the accept loop, which logs the refusal
	b.srcLog.line(t, `msg="stream not opened"`, "channel=nbd", "no_route", `\"nbd\"`)
	b.dst.Close()
	b.dstLog.line(t, `msg="stream refused"`, "channel=nbd", "reason=no_route")
}

// testDialFailed routes a channel to a UNIX socket that does not exist:
// the source learns the local connect failed, never the path; the
// destination's own log names it.
func testDialFailed(t *testing.T, tr tunnel.Transport) {
	missing := filepath.Join(sockDir(t), "missing.sock")
	b := newTestbed(t, tr, []proxy.Route{{Channel: "main", Target: unixEndpoint(missing)}}, "main")
	readsEnd(t, dialForward(t, b.fwd["main"]))
	b.src.Close()
	b.srcLog.line(t, `msg="stream not opened"`, "channel=main", "dial_failed")
	if strings.Contains(b.srcLog.String(), "missing.sock") {
		t.Errorf("the peer's refusal names the destination's local path:\n%s", b.srcLog.String())
	}
	b.dst.Close()
	b.dstLog.line(t, `msg="stream refused"`, "reason=dial_failed")
	b.dstLog.line(t, `msg="route target unreachable"`, "missing.sock")
}

// testShutdown stops the source while an idle relay is open: Shutdown
// aborts it when its context ends.
func testShutdown(t *testing.T, tr tunnel.Transport) {
	target := filepath.Join(sockDir(t), "echo.sock")
	serveUnix(t, target, echoConn)
	b := newTestbed(t, tr, []proxy.Route{{Channel: "main", Target: unixEndpoint(target)}}, "main")
	c := dialForward(t, b.fwd["main"])
	c.SetDeadline(time.Now().Add(time.Minute))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
		t.Fatal("no echo:", err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := b.src.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown with an idle relay open: got %v, want the context's error", err)
	}
	readsEnd(t, c)
	b.src.Close()
	b.src.Close()
	if _, err := os.Lstat(b.fwd["main"]); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("forward socket left behind after Shutdown: %v", err)
	}

	// The abort reached the destination, whose relay ends by itself.
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.dst.Shutdown(ctx); err != nil {
		t.Errorf("destination Shutdown after its peer aborted: %v", err)
	}
	b.dst.Close()
	b.dst.Close()
}

// TestStartSocketFiles checks what Start does with files already at a
// forward's path: a stale socket is replaced, a live one or a regular file
// makes Start fail naming the path.
func TestStartSocketFiles(t *testing.T) {
	leaktest.Check(t)
	dir := sockDir(t)
	cfg := tunnelConfig(tunnel.TLS, testpki.NewCA(t).NewHost(t, "src"))
	forward := func(path string) proxy.Config {
		return proxy.Config{Tunnel: cfg, Forwards: []proxy.Forward{{Listen: unixEndpoint(path), Peer: "127.0.0.1:1", Channel: "main"}}}
	}

	stale := filepath.Join(dir, "stale.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	if _, err := os.Lstat(stale); err != nil {
		t.Fatal("stale socket not left behind:", err)
	}
	s := startServer(t, forward(stale))
	c, err := net.Dial("unix", stale)
	if err != nil {
		t.Fatal("stale socket not replaced by a live one:", err)
	}
	c.Close()
	s.Close()
	if _, err := os.Lstat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("forward socket left behind after Close: %v", err)
	}

	live := filepath.Join(dir, "live.sock")
	serveUnix(t, live, func(int, net.Conn) {})
	regular := filepath.Join(dir, "file.sock")
	if err := os.WriteFile(regular, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{live, regular} {
		s, err := proxy.New(forward(path))
		if err != nil {
			t.Fatal(err)
		}
		err = s.Start()
		if err == nil || !strings.Contains(err.Error(), path) {
			t.Errorf("Start with %s in the way: got %v, want an error naming it", path, err)
		}
		s.Close()
		s.Close()
		if _, err := os.Lstat(path); err != nil {
			t.Errorf("%s removed by a failed Start: %v", path, err)
		}
	}
	if b, _ := os.ReadFile(regular); string(b) != "keep me" {
		t.Errorf("regular file changed: %q", b)
	}
}
