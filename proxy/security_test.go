package proxy_test

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/internal/leaktest"
	"github.com/migtun/migtun/internal/testpki"
	"github.com/migtun/migtun/proxy"
	"github.com/migtun/migtun/tunnel"
)

// TestSessionlessStreamRefused: a peer holding a valid certificate but no
// session opens a stream of a channel the destination routes for
// sessions: it is refused before anything local is connected, and the
// target sees no connection; the same channel carries a session's stream.
// A route marked sessionless takes the peer's stream.
func TestSessionlessStreamRefused(t *testing.T) {
	leaktest.Check(t)
	h := newSessHosts(t, tunnel.TLS, time.Minute)
	before := metricValue(t, h.dst, "migtun_streams_refused_total", `reason="unauthorized"`)
	st, err := openSessionless(t, h, "nbd")
	if err == nil {
		st.Close()
		t.Fatal("a stream without a session reached a channel routed for sessions")
	}
	if r := tunnel.ReasonOf(err); r != tunnel.ReasonUnauthorized {
		t.Fatalf("refused with %v (%v), want unauthorized", r, err)
	}
	if n := metricValue(t, h.dst, "migtun_streams_refused_total", `reason="unauthorized"`); n != before+1 {
		t.Errorf("migtun_streams_refused_total{reason=unauthorized} went from %v to %v, want one more", before, n)
	}
	if n := metricValue(t, h.dst, "migtun_stream_bytes_total", `channel="nbd"`); n != 0 {
		t.Errorf("%v bytes reached the nbd target", n)
	}
	// A session's stream of the same channel goes through.
	info := h.prepare(t, "nbd")
	echoThrough(t, info.Channels[0].URI, 4096)
	if _, err := h.src.Finish(context.Background(), info.ID, time.Second); err != nil {
		t.Fatal(err)
	}
	// An explicit sessionless route takes the peer's forward.
	rt := h.dst.Routes()[1]
	rt.Sessionless = true
	h.dst.SetRoute(rt)
	st, err = openSessionless(t, h, "nbd")
	if err != nil {
		t.Fatalf("a sessionless route refused a peer's stream: %v", err)
	}
	st.Close()
}

// openSessionless opens a stream of channel to h's destination without a
// session, from a peer of the same CA.
func openSessionless(t *testing.T, h *sessHosts, channel string) (tunnel.Stream, error) {
	t.Helper()
	d, err := tunnel.NewDialer(sessTunnel(h.ca.NewHost(t, "mallory"), h.transport))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return d.Open(ctx, h.dst.Addr().String(), tunnel.Header{Kind: tunnel.KindData, Channel: channel})
}

// TestPeerSessionShare: one peer holds at most its share of the
// destination's sessions, refused with code limit past it; and sessions
// are never listened for on loopback TCP, which any local user could
// reach first.
func TestPeerSessionShare(t *testing.T) {
	leaktest.Check(t)
	dir := t.TempDir()
	ca := testpki.NewCA(t)
	dst := startServer(t, proxy.Config{Listen: "127.0.0.1:0", Tunnel: sessTunnel(ca.NewHost(t, "dst"), tunnel.TLS),
		Routes: []proxy.Route{{Channel: "main", Target: endpoint.Unix(filepath.Join(dir, "in.sock"))}}, SocketDir: filepath.Join(dir, "d"),
		MaxSessions: 4})
	src := startServer(t, proxy.Config{Listen: "127.0.0.1:0", Tunnel: sessTunnel(ca.NewHost(t, "src"), tunnel.TLS),
		SocketDir: filepath.Join(dir, "s")})
	ctx := context.Background()
	req := control.PrepareRequest{Peer: dst.Addr().String(), Channels: []string{"main"}}
	for i := range 2 {
		if _, err := src.Prepare(ctx, req); err != nil {
			t.Fatalf("session %d of the peer's share of 2: %v", i, err)
		}
	}
	if _, err := src.Prepare(ctx, req); !errors.Is(err, control.ErrLimit) {
		t.Fatalf("a third session of one peer with --max-sessions 4: %v, want code limit", err)
	}
	req.Listen = "tcp"
	if _, err := src.Prepare(ctx, req); !errors.Is(err, control.ErrBadRequest) {
		t.Fatalf(`listen "tcp": %v, want code bad_request`, err)
	}
}
