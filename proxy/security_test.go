package proxy_test

import (
	"context"
	"testing"
	"time"

	"github.com/migtun/migtun/internal/leaktest"
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
