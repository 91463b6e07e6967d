package proxy_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/internal/leaktest"
	"github.com/migtun/migtun/internal/testpki"
	"github.com/migtun/migtun/proxy"
	"github.com/migtun/migtun/tunnel"
)

// sessHosts is a source and a destination server on loopback; the
// destination routes "main" to an echo server.
type sessHosts struct {
	src, dst  *proxy.Server
	ca        *testpki.CA
	transport tunnel.Transport
	sockDir   string
}

func sessTunnel(h *testpki.Host, tr tunnel.Transport) *tunnel.Config {
	return &tunnel.Config{Transport: tr, ServerTLS: h.Server, ClientTLS: h.Client, AllowPlaintext: true,
		HandshakeTimeout: 5 * time.Second}
}

func newSessHosts(t *testing.T, tr tunnel.Transport, ttl time.Duration) *sessHosts {
	t.Helper()
	return newSessHostsTTL(t, tr, ttl, ttl)
}

// newSessHostsTTL is newSessHosts with a session TTL for each host.
func newSessHostsTTL(t *testing.T, tr tunnel.Transport, srcTTL, dstTTL time.Duration) *sessHosts {
	t.Helper()
	return newSessHostsConfig(t, tr, srcTTL, dstTTL, 0)
}

// newSessHostsDial is newSessHosts whose destination dials its route
// targets for up to dial.
func newSessHostsDial(t *testing.T, tr tunnel.Transport, ttl, dial time.Duration) *sessHosts {
	t.Helper()
	return newSessHostsConfig(t, tr, ttl, ttl, dial)
}

func newSessHostsConfig(t *testing.T, tr tunnel.Transport, srcTTL, dstTTL, dial time.Duration) *sessHosts {
	t.Helper()
	dir, err := os.MkdirTemp("", "ps")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	echo := sessEcho(t, filepath.Join(dir, "echo.sock"))
	ca := testpki.NewCA(t)
	dst := startServer(t, proxy.Config{Listen: "127.0.0.1:0", Tunnel: sessTunnel(ca.NewHost(t, "dst"), tr),
		Routes: []proxy.Route{{Channel: "main", Target: endpoint.Unix(echo)}, {Channel: "nbd", Target: endpoint.Unix(echo)}}, SessionTTL: dstTTL,
		FinishGrace: 2 * time.Second, DialTimeout: dial})
	h := &sessHosts{dst: dst, ca: ca, transport: tr, sockDir: filepath.Join(dir, "socks")}
	src := startServer(t, proxy.Config{Listen: "127.0.0.1:0", Tunnel: sessTunnel(ca.NewHost(t, "src"), tr),
		SocketDir: h.sockDir, SessionTTL: srcTTL, FinishGrace: 2 * time.Second})
	h.src = src
	return h
}

// sessEcho serves a UNIX socket that echoes each connection until EOF and
// then half-closes it; it stops when the test ends.
func sessEcho(t *testing.T, path string) string {
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { // ends when the connection does
				defer c.Close()
				io.Copy(c, c)
				c.(*net.UnixConn).CloseWrite()
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return path
}

func (h *sessHosts) prepare(t *testing.T, channels ...string) control.SessionInfo {
	t.Helper()
	info, err := h.src.Prepare(context.Background(), control.PrepareRequest{Peer: h.dst.Addr().String(), Channels: channels})
	if err != nil {
		t.Fatal(err)
	}
	return info
}

// echoThrough sends n random bytes through a session URI and checks they
// come back.
func echoThrough(t *testing.T, uri string, n int) {
	t.Helper()
	c, err := net.Dial("unix", strings.TrimPrefix(uri, "unix:"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msg := make([]byte, n)
	rand.Read(msg)
	go func() { c.Write(msg); c.(*net.UnixConn).CloseWrite() }() // ends with the write
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo through the session: %d of %d bytes, err %v", len(got), n, err)
	}
}

func TestSessionFinish(t *testing.T) {
	for _, tr := range []tunnel.Transport{tunnel.TLS, tunnel.QUIC, tunnel.Plain} {
		t.Run(string(tr), func(t *testing.T) {
			leaktest.Check(t)
			h := newSessHosts(t, tr, time.Minute)
			info := h.prepare(t, "main")
			if len(info.Channels) != 1 || !strings.HasPrefix(info.Channels[0].URI, "unix:"+h.sockDir) ||
				info.Channels[0].LibvirtURI != "unix://"+strings.TrimPrefix(info.Channels[0].URI, "unix:") {
				t.Fatalf("channels %+v", info.Channels)
			}
			echoThrough(t, info.Channels[0].URI, 1<<20)
			echoThrough(t, info.Channels[0].URI, 1000)
			rep, err := h.src.Finish(context.Background(), info.ID, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if len(rep.Mismatch) != 0 {
				t.Fatalf("mismatch: %v", rep.Mismatch)
			}
			c := rep.Session.Channels[0]
			if rep.Session.State != control.StateFinished || c.Streams != 2 || c.BytesForward != 1<<20+1000 || c.BytesReturn != 1<<20+1000 {
				t.Fatalf("report %+v", rep.Session)
			}
			if p := rep.Peer[0]; p.Streams != 2 || p.BytesForward != c.BytesForward {
				t.Fatalf("peer report %+v", p)
			}
			if _, err := os.Stat(strings.TrimPrefix(c.URI, "unix:")); !os.IsNotExist(err) {
				t.Fatalf("session socket left behind: %v", err)
			}
			if _, err := h.src.Finish(context.Background(), info.ID, time.Second); !errors.Is(err, control.ErrNotFound) {
				t.Fatalf("second finish: %v", err)
			}
		})
	}
}

func TestSessionUnknownChannel(t *testing.T) {
	leaktest.Check(t)
	h := newSessHosts(t, tunnel.TLS, time.Minute)
	_, err := h.src.Prepare(context.Background(), control.PrepareRequest{Peer: h.dst.Addr().String(), Channels: []string{"main", "nbd"}})
	if err == nil || !strings.Contains(err.Error(), `no route for channel "nbd"`) {
		t.Fatalf("got %v, want a refusal naming channel nbd", err)
	}
	if n := len(h.dst.Sessions()); n != 0 {
		t.Fatalf("destination holds %d sessions after a refused prepare", n)
	}
}

// TestSessionForgedStreams opens streams to a session's destination as
// someone who does not hold the token, or with another certificate name.
func TestSessionForgedStreams(t *testing.T) {
	leaktest.Check(t)
	h := newSessHosts(t, tunnel.TLS, time.Minute)
	info := h.prepare(t, "main")
	id := decodeID(t, info.ID)
	open := func(host string, token tunnel.Token) error {
		d, err := tunnel.NewDialer(sessTunnel(h.ca.NewHost(t, host), tunnel.TLS))
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		s, err := d.Open(context.Background(), h.dst.Addr().String(),
			tunnel.Header{Kind: tunnel.KindData, Channel: "main", Session: id, Token: token})
		if err == nil {
			s.Close()
		}
		return err
	}
	var forged tunnel.Token
	rand.Read(forged[:])
	if err := open("src", forged); !errors.Is(err, &tunnel.RefusedError{Reason: tunnel.ReasonUnknownSession}) {
		t.Fatalf("forged token: got %v, want unknown_session", err)
	}
	var unknown tunnel.SessionID
	rand.Read(unknown[:])
	d, _ := tunnel.NewDialer(sessTunnel(h.ca.NewHost(t, "src"), tunnel.TLS))
	defer d.Close()
	if _, err := d.Open(context.Background(), h.dst.Addr().String(),
		tunnel.Header{Kind: tunnel.KindData, Channel: "main", Session: unknown}); !errors.Is(err, &tunnel.RefusedError{Reason: tunnel.ReasonUnknownSession}) {
		t.Fatalf("unknown session: got %v, want unknown_session", err)
	}
	if got := h.dst.Sessions()[0].Channels[0].Streams; got != 0 {
		t.Fatalf("refused streams were counted: %d", got)
	}
}

func decodeID(t *testing.T, s string) tunnel.SessionID {
	var id tunnel.SessionID
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(id) {
		t.Fatalf("session ID %q", s)
	}
	copy(id[:], b)
	return id
}

// TestSessionExpires checks that an unused session expires on both hosts
// and leaves no socket behind, whichever host's TTL runs out first: the
// source tells the destination when its own session expires.
func TestSessionExpires(t *testing.T) {
	for _, tc := range []struct {
		name           string
		srcTTL, dstTTL time.Duration
		dstReason      string // what the destination's error must contain
	}{
		{"same-ttl", 300 * time.Millisecond, 300 * time.Millisecond, "no stream for 300ms"},
		{"source-first", 300 * time.Millisecond, time.Hour, "expired on the source: no stream for 300ms"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaktest.Check(t)
			h := newSessHostsTTL(t, tunnel.TLS, tc.srcTTL, tc.dstTTL)
			info := h.prepare(t, "main")
			sock := strings.TrimPrefix(info.Channels[0].URI, "unix:")
			deadline := time.Now().Add(10 * time.Second)
			for {
				s, _ := h.src.Session(info.ID)
				d, _ := h.dst.Session(info.ID)
				if ended(s.State) && ended(d.State) {
					if s.State != control.StateExpired || d.State != control.StateExpired {
						t.Fatalf("ended as: source %s (%s), destination %s (%s); want both expired", s.State, s.Error, d.State, d.Error)
					}
					if !strings.Contains(d.Error, tc.dstReason) {
						t.Fatalf("destination's reason %q does not say %q", d.Error, tc.dstReason)
					}
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("not expired: source %s, destination %s", s.State, d.State)
				}
				time.Sleep(50 * time.Millisecond)
			}
			// The state turns final just before the socket is removed.
			_, err := os.Stat(sock)
			for wait := time.Now().Add(2 * time.Second); err == nil && time.Now().Before(wait); _, err = os.Stat(sock) {
				time.Sleep(10 * time.Millisecond)
			}
			if !os.IsNotExist(err) {
				t.Fatalf("expired session's socket left behind: %v", err)
			}
		})
	}
}

func ended(s control.State) bool {
	return s == control.StateFinished || s == control.StateAborted || s == control.StateExpired
}

func TestSessionAbortClosesStreams(t *testing.T) {
	for _, tr := range []tunnel.Transport{tunnel.TLS, tunnel.QUIC} {
		t.Run(string(tr), func(t *testing.T) {
			leaktest.Check(t)
			h := newSessHosts(t, tr, time.Minute)
			info := h.prepare(t, "main")
			c, err := net.Dial("unix", strings.TrimPrefix(info.Channels[0].URI, "unix:"))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.Write([]byte("ping"))
			buf := make([]byte, 4)
			if _, err := io.ReadFull(c, buf); err != nil {
				t.Fatal(err)
			}
			if _, err := h.src.Abort(context.Background(), info.ID, "test"); err != nil {
				t.Fatal(err)
			}
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err = c.Read(buf)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatal("the local connection stayed open after abort")
			}
			deadline := time.Now().Add(5 * time.Second)
			for {
				d, _ := h.dst.Session(info.ID)
				if d.State == control.StateAborted {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("destination session is %s after abort", d.State)
				}
				time.Sleep(20 * time.Millisecond)
			}
		})
	}
}

// TestThousandSessions creates and ends 1,000 sessions, each carrying a
// stream, and checks nothing is left: no descriptor, goroutine or socket
// file.
func TestThousandSessions(t *testing.T) {
	leaktest.Check(t)
	n := 1000
	if testing.Short() {
		n = 200
	}
	h := newSessHosts(t, tunnel.TLS, time.Minute)
	// Warm up once so lazily created resources (TLS session cache, the
	// sampler) are not counted as leaks.
	warm := h.prepare(t, "main")
	echoThrough(t, warm.Channels[0].URI, 100)
	h.src.Finish(context.Background(), warm.ID, time.Second)
	fds, gor := openFDs(t), runtime.NumGoroutine()
	for i := range n {
		info := h.prepare(t, "main")
		echoThrough(t, info.Channels[0].URI, 512)
		if i%2 == 0 {
			rep, err := h.src.Finish(context.Background(), info.ID, time.Second)
			if err != nil || len(rep.Mismatch) > 0 {
				t.Fatalf("session %d: finish: %v %v", i, err, rep)
			}
		} else if _, err := h.src.Abort(context.Background(), info.ID, "test"); err != nil {
			t.Fatalf("session %d: abort: %v", i, err)
		}
	}
	// Let aborted destinations settle, then compare.
	deadline := time.Now().Add(10 * time.Second)
	for {
		nowFDs, nowGor := openFDs(t), runtime.NumGoroutine()
		open := 0
		for _, s := range append(h.src.Sessions(), h.dst.Sessions()...) {
			if s.State == control.StatePrepared || s.State == control.StateActive {
				open++
			}
		}
		if nowFDs <= fds && nowGor <= gor && open == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %d sessions: %d descriptors (was %d), %d goroutines (was %d), %d sessions open",
				n, nowFDs, fds, nowGor, gor, open)
		}
		time.Sleep(50 * time.Millisecond)
	}
	left, _ := os.ReadDir(h.sockDir)
	if len(left) != 0 {
		t.Fatalf("%d socket files left in %s", len(left), h.sockDir)
	}
}

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestSessionSocketRoute checks the "session" route target: the
// destination delivers a session's streams to the socket named like the
// source's listener, in its own socket directory.
func TestSessionSocketRoute(t *testing.T) {
	leaktest.Check(t)
	dir, err := os.MkdirTemp("", "pr")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	ca := testpki.NewCA(t)
	dstDir := filepath.Join(dir, "d")
	os.Mkdir(dstDir, 0o700)
	dst := startServer(t, proxy.Config{Listen: "127.0.0.1:0", Tunnel: sessTunnel(ca.NewHost(t, "dst"), tunnel.TLS),
		Routes: []proxy.Route{{Channel: "main", Target: proxy.SessionSocket}}, SocketDir: dstDir})
	src := startServer(t, proxy.Config{Listen: "127.0.0.1:0", Tunnel: sessTunnel(ca.NewHost(t, "src"), tunnel.TLS),
		SocketDir: filepath.Join(dir, "s")})
	info, err := src.Prepare(context.Background(), control.PrepareRequest{Peer: dst.Addr().String(), Channels: []string{"main"}})
	if err != nil {
		t.Fatal(err)
	}
	srcPath := strings.TrimPrefix(info.Channels[0].URI, "unix:")
	// The destination QEMU listens on the path of the same name, as libvirt
	// would make it.
	sessEcho(t, filepath.Join(dstDir, filepath.Base(srcPath)))
	echoThrough(t, info.Channels[0].URI, 4096)
	if rep, err := src.Finish(context.Background(), info.ID, time.Second); err != nil || len(rep.Mismatch) > 0 {
		t.Fatalf("finish: %v %+v", err, rep)
	}
	// Outside a session the route serves nothing.
	d, _ := tunnel.NewDialer(sessTunnel(ca.NewHost(t, "src"), tunnel.TLS))
	defer d.Close()
	if _, err := d.Open(context.Background(), dst.Addr().String(), tunnel.Header{Kind: tunnel.KindData, Channel: "main"}); !errors.Is(err, &tunnel.RefusedError{Reason: tunnel.ReasonNoRoute}) {
		t.Fatalf("static stream to a session route: %v", err)
	}
}

// TestSessionStreamLimit checks that a session refuses streams beyond its
// limit, on the destination, before connecting anything for it.
func TestSessionStreamLimit(t *testing.T) {
	leaktest.Check(t)
	dir, err := os.MkdirTemp("", "pl")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	// A route that counts its connections and echoes.
	echo := filepath.Join(dir, "echo.sock")
	ln, err := net.Listen("unix", echo)
	if err != nil {
		t.Fatal(err)
	}
	var accepted atomic.Int64
	served := make(chan struct{})
	go func() {
		defer close(served)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			io.Copy(c, c)
			c.Close()
		}
	}()
	defer func() { ln.Close(); <-served }()
	ca := testpki.NewCA(t)
	dst := startServer(t, proxy.Config{Listen: "127.0.0.1:0", Tunnel: sessTunnel(ca.NewHost(t, "dst"), tunnel.TLS),
		Routes: []proxy.Route{{Channel: "main", Target: endpoint.Endpoint{Network: "unix", Address: echo}}}, MaxSessionStreams: 2})
	src := startServer(t, proxy.Config{Listen: "127.0.0.1:0", Tunnel: sessTunnel(ca.NewHost(t, "src"), tunnel.TLS),
		SocketDir: filepath.Join(dir, "s")})
	info, err := src.Prepare(context.Background(), control.PrepareRequest{Peer: dst.Addr().String(), Channels: []string{"main"}})
	if err != nil {
		t.Fatal(err)
	}
	echoThrough(t, info.Channels[0].URI, 100)
	echoThrough(t, info.Channels[0].URI, 100)
	// The third stream is refused: the local connection just ends.
	c, err := net.Dial("unix", strings.TrimPrefix(info.Channels[0].URI, "unix:"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err == nil || n > 0 {
		t.Fatalf("third stream carried data: %d %v", n, err)
	}
	d, _ := dst.Session(info.ID)
	if d.Channels[0].Streams != 2 {
		t.Fatalf("destination counted %d streams, want 2", d.Channels[0].Streams)
	}
	if n := accepted.Load(); n != 2 {
		t.Fatalf("the destination connected its route %d times, want 2", n)
	}
}
