package proxy

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/internal/leaktest"
	"github.com/migtun/migtun/internal/testpki"
	"github.com/migtun/migtun/tunnel"
)

// metricsPair starts a destination routing "main" to a sink that reads
// everything and answers "ok", and a source forwarding a UNIX socket to it.
func metricsPair(t *testing.T) (src, dst *Server, fwd string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "pm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sink := filepath.Join(dir, "sink.sock")
	ln, err := net.Listen("unix", sink)
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
			io.Copy(io.Discard, c)
			io.WriteString(c, "ok")
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	ca := testpki.NewCA(t)
	tcfg := func(name string) *tunnel.Config {
		h := ca.NewHost(t, name)
		return &tunnel.Config{ServerTLS: h.Server, ClientTLS: h.Client}
	}
	dst, err = New(Config{Listen: "127.0.0.1:0", Tunnel: tcfg("dst"), SocketDir: filepath.Join(dir, "d"),
		Routes: []Route{{Channel: "main", Target: endpoint.Endpoint{Network: "unix", Address: sink}}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := dst.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dst.Close() })
	fwd = filepath.Join(dir, "fwd.sock")
	src, err = New(Config{Listen: "127.0.0.1:0", Tunnel: tcfg("src"), SocketDir: filepath.Join(dir, "s"),
		Forwards: []Forward{{Listen: endpoint.Endpoint{Network: "unix", Address: fwd}, Peer: dst.Addr().String(), Channel: "main"}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	return src, dst, fwd
}

// send writes n bytes to the socket at path, half-closes, and reads the
// answer to its end.
func sendThrough(t *testing.T, path string, n int) {
	t.Helper()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.CopyN(c, zeroes{}, int64(n)); err != nil {
		t.Fatal(err)
	}
	c.(*net.UnixConn).CloseWrite()
	if b, err := io.ReadAll(c); err != nil || string(b) != "ok" {
		t.Fatalf("answer %q, %v", b, err)
	}
}

type zeroes struct{}

func (zeroes) Read(p []byte) (int, error) { clear(p); return len(p), nil }

// waitIdle waits until the server relays nothing.
func waitIdle(t *testing.T, s *Server) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		s.mu.Lock()
		n := len(s.relays)
		s.mu.Unlock()
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d relays still running", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestMetricsLint(t *testing.T) {
	leaktest.Check(t)
	src, dst, fwd := metricsPair(t)
	sendThrough(t, fwd, 1000)
	for _, s := range []*Server{src, dst} {
		problems, err := testutil.GatherAndLint(s.metrics.reg)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range problems {
			t.Errorf("metric %s: %s", p.Metric, p.Text)
		}
	}
}

// TestMetricsGolden compares the exposition of the stable metrics on both
// hosts after two streams of known size with a golden text.
func TestMetricsGolden(t *testing.T) {
	leaktest.Check(t)
	src, dst, fwd := metricsPair(t)
	sendThrough(t, fwd, 1<<20)
	sendThrough(t, fwd, 4096)
	waitIdle(t, src)
	waitIdle(t, dst)
	names := []string{"migtun_stream_bytes_total", "migtun_streams_total", "migtun_streams_active",
		"migtun_sessions_active", "migtun_peer_connections_total"}
	for host, s := range map[string]*Server{"src": src, "dst": dst} {
		want, err := os.ReadFile(filepath.Join("testdata", "metrics-"+host+".golden"))
		if err != nil {
			t.Fatal(err)
		}
		if err := testutil.GatherAndCompare(s.metrics.reg, strings.NewReader(string(want)), names...); err != nil {
			t.Errorf("%s: %v", host, err)
		}
	}
}

// TestMetricsSessionSeries checks that per-session series exist while a
// session is open, on both hosts, and are gone after finish; and that
// /metrics is served by the control endpoint.
func TestMetricsSessionSeries(t *testing.T) {
	leaktest.Check(t)
	src, dst, _ := metricsPair(t)
	info, err := src.Prepare(context.Background(), control.PrepareRequest{Peer: dst.Addr().String(), Channels: []string{"main"}})
	if err != nil {
		t.Fatal(err)
	}
	sendThrough(t, strings.TrimPrefix(info.Channels[0].URI, "unix:"), 5000)
	scrape := func(s *Server) string {
		rec := httptest.NewRecorder()
		s.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
		return rec.Body.String()
	}
	series := `migtun_session_bytes_total{channel="main",direction="forward",session="` + info.ID + `"} 5000`
	for _, s := range []*Server{src, dst} {
		if body := scrape(s); !strings.Contains(body, series) {
			t.Fatalf("open session: %q missing from\n%s", series, grep(body, "migtun_session"))
		}
	}
	// migtun migrate reports QEMU's progress to the source's migtun.
	rec := httptest.NewRecorder()
	src.Handler().ServeHTTP(rec, httptest.NewRequest("PUT", "/v1/sessions/"+info.ID+"/progress", strings.NewReader(
		`{"ram_transferred":300,"ram_remaining":700,"dirty_pages_rate":12,"disks":[{"node":"disk0","done":5,"total":10}]}`)))
	if rec.Code != 204 {
		t.Fatalf("progress: %d %s", rec.Code, rec.Body)
	}
	body := scrape(src)
	for _, want := range []string{
		`migtun_migration_ram_remaining_bytes{session="` + info.ID + `"} 700`,
		`migtun_migration_dirty_pages_per_second{session="` + info.ID + `"} 12`,
		`migtun_migration_mirror_done_bytes{disk="disk0",session="` + info.ID + `"} 5`,
	} {
		if !strings.Contains(body, want) {
			t.Fatalf("%q missing from\n%s", want, grep(body, "migtun_migration"))
		}
	}
	problems, err := testutil.GatherAndLint(src.metrics.reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("metric %s: %s", p.Metric, p.Text)
	}
	if _, err := src.Finish(context.Background(), info.ID, time.Second); err != nil {
		t.Fatal(err)
	}
	for _, s := range []*Server{src, dst} {
		body := scrape(s)
		if strings.Contains(body, info.ID) {
			t.Fatalf("series of a finished session remain:\n%s", grep(body, info.ID))
		}
		if !strings.Contains(body, `migtun_sessions_total{result="finished"} 1`) {
			t.Fatalf("finished session not counted:\n%s", grep(body, "migtun_sessions"))
		}
	}
}

func grep(body, s string) string {
	var out []string
	for _, l := range strings.Split(body, "\n") {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestMetricsCertificate checks the certificate's expiry and reload state
// as the metrics export them.
func TestMetricsCertificate(t *testing.T) {
	leaktest.Check(t)
	ca := testpki.NewCA(t)
	h := ca.NewHost(t, "host")
	var reloadErr error
	s, err := New(Config{Listen: "127.0.0.1:0", Tunnel: &tunnel.Config{ServerTLS: h.Server, ClientTLS: h.Client},
		SocketDir: t.TempDir(), Certificate: func() (*x509.Certificate, error) { return h.Leaf(), reloadErr }})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	expiry := h.Leaf().NotAfter.Unix()
	for _, failed := range []int{0, 1} {
		if failed == 1 {
			reloadErr = errors.New("reload: key file: no such file")
		}
		want := fmt.Sprintf(`# HELP migtun_certificate_expiry_timestamp_seconds When the certificate this host presents expires, as Unix time.
# TYPE migtun_certificate_expiry_timestamp_seconds gauge
migtun_certificate_expiry_timestamp_seconds %d
# HELP migtun_certificate_reload_failed 1 while the certificate and key files in place are not the ones presented (a file is missing or unreadable, or a replaced pair could not be used; the previous pair is still presented), else 0.
# TYPE migtun_certificate_reload_failed gauge
migtun_certificate_reload_failed %d
`, expiry, failed)
		if err := testutil.GatherAndCompare(s.metrics.reg, strings.NewReader(want),
			"migtun_certificate_expiry_timestamp_seconds", "migtun_certificate_reload_failed"); err != nil {
			t.Errorf("reload failed %d: %v", failed, err)
		}
	}
	problems, err := testutil.GatherAndLint(s.metrics.reg, "migtun_certificate_expiry_timestamp_seconds", "migtun_certificate_reload_failed")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("metric %s: %s", p.Metric, p.Text)
	}
}
