package proxy_test

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/internal/leaktest"
	"github.com/migtun/migtun/internal/testpki"
	"github.com/migtun/migtun/proxy"
	"github.com/migtun/migtun/tunnel"
)

// hangingTCP returns a TCP address whose accept queue is full, so that a
// connect to it hangs until the dialer gives up: a route target that
// never accepts.
func hangingTCP(t *testing.T) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "hanging")
	ln, err := net.FileListener(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	addr := ln.Addr().String()
	// Fill the queue: with a backlog of 0 the kernel keeps one connection
	// (or two) that nobody accepts; later SYNs are dropped.
	for range 4 {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			break
		}
		t.Cleanup(func() { c.Close() })
	}
	return addr
}

// TestRouteTargetHangsOneSession: while one session's stream waits on a
// route target that never accepts, another session's stream on the same
// channel name is delivered and carries its bytes; the hung one is still
// waiting when it does.
func TestRouteTargetHangsOneSession(t *testing.T) {
	leaktest.Check(t)
	h := newSessHostsDial(t, tunnel.TLS, time.Minute, time.Hour)
	good := h.dst.Routes()[0]
	h.dst.SetRoute(proxy.Route{Channel: "main", Target: endpoint.TCP(hangingTCP(t))})
	stuck := h.prepare(t, "main")
	h.dst.SetRoute(good)
	ok := h.prepare(t, "main")

	stuckConn, err := net.Dial("unix", strings.TrimPrefix(stuck.Channels[0].URI, "unix:"))
	if err != nil {
		t.Fatal(err)
	}
	defer stuckConn.Close()
	stuckDone := make(chan error, 1)
	go func() { // ends when the stream is refused or the test closes it
		_, err := stuckConn.Read(make([]byte, 1))
		stuckDone <- err
	}()
	// Let the stuck stream reach the destination's dial first.
	waitFor(t, "the stuck stream to reach the destination", func() bool {
		return metricValue(t, h.dst, "migtun_streams_connecting", "") == 1
	})
	echoThrough(t, ok.Channels[0].URI, 1<<20)
	select {
	case err := <-stuckDone:
		t.Fatalf("the stuck stream ended (%v) before the other session's was delivered: the test proves nothing", err)
	default:
	}
	if _, err := h.src.Abort(context.Background(), stuck.ID, "test"); err != nil {
		t.Fatal(err)
	}
	<-stuckDone
	if _, err := h.src.Finish(context.Background(), ok.ID, time.Second); err != nil {
		t.Fatal(err)
	}
}

// waitFor polls cond every 10 ms, for up to a minute.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// blockingVMs blocks every VM operation of the VM named "stuck" until
// released (or its context ends) and answers the others at once.
type blockingVMs struct {
	release chan struct{}
	mu      sync.Mutex
	waiting int
}

func (b *blockingVMs) ServeVM(ctx context.Context, op string, sess proxy.VMSession, body json.RawMessage) (any, error) {
	var req struct {
		VM string `json:"vm"`
	}
	json.Unmarshal(body, &req)
	if req.VM != "stuck" {
		return map[string]string{"vm": req.VM}, nil
	}
	b.mu.Lock()
	b.waiting++
	b.mu.Unlock()
	defer func() { b.mu.Lock(); b.waiting--; b.mu.Unlock() }()
	select {
	case <-b.release:
		return map[string]string{"vm": req.VM}, nil
	case <-ctx.Done():
		return nil, control.Errorf(control.CodeTimeout, "VM %q did not answer: %w", req.VM, ctx.Err())
	}
}

func (b *blockingVMs) SessionEnded(string) {}

func (b *blockingVMs) inFlight() int { b.mu.Lock(); defer b.mu.Unlock(); return b.waiting }

// controlHosts is a source and a destination whose VM handler is vms and
// whose control requests are bounded per peer by perPeer.
func controlHosts(t *testing.T, vms proxy.VMHandler, perPeer int) (src, dst *proxy.Server) {
	t.Helper()
	dir, err := os.MkdirTemp("", "pc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ca := testpki.NewCA(t)
	dst = startServer(t, proxy.Config{Listen: "127.0.0.1:0", Tunnel: sessTunnel(ca.NewHost(t, "dst"), tunnel.TLS),
		Routes:    []proxy.Route{{Channel: "main", Target: proxy.SessionSocket}},
		SocketDir: filepath.Join(dir, "d"), VMs: vms, MaxPeerControlRequests: perPeer, FinishGrace: time.Second})
	src = startServer(t, proxy.Config{Listen: "127.0.0.1:0", Tunnel: sessTunnel(ca.NewHost(t, "src"), tunnel.TLS),
		SocketDir: filepath.Join(dir, "s"), FinishGrace: time.Second})
	return src, dst
}

// TestHungVMCostsOnlyItsSession: while a VM operation of one session
// hangs, other sessions are prepared, drive their VMs, finish and abort;
// the hung request is still in flight when they are done, and ends when
// its VM answers.
func TestHungVMCostsOnlyItsSession(t *testing.T) {
	leaktest.Check(t)
	vms := &blockingVMs{release: make(chan struct{})}
	src, dst := controlHosts(t, vms, 0)
	ctx := context.Background()
	peer := dst.Addr().String()
	stuck, err := src.Prepare(ctx, control.PrepareRequest{Peer: peer, Channels: []string{"main"}})
	if err != nil {
		t.Fatal(err)
	}
	stuckDone := make(chan error, 1)
	go func() { // ends when the VM is released
		_, err := src.VMCall(ctx, stuck.ID, "prepare", json.RawMessage(`{"vm":"stuck"}`))
		stuckDone <- err
	}()
	waitFor(t, "the stuck VM operation to reach the handler", func() bool { return vms.inFlight() == 1 })
	for i := range 8 {
		s, err := src.Prepare(ctx, control.PrepareRequest{Peer: peer, Channels: []string{"main"}})
		if err != nil {
			t.Fatalf("prepare %d beside a hung VM: %v", i, err)
		}
		if _, err := src.VMCall(ctx, s.ID, "prepare", json.RawMessage(`{"vm":"ok"}`)); err != nil {
			t.Fatalf("VM operation %d beside a hung VM: %v", i, err)
		}
		if i%2 == 0 {
			_, err = src.Finish(ctx, s.ID, time.Second)
		} else {
			_, err = src.Abort(ctx, s.ID, "test")
		}
		if err != nil {
			t.Fatalf("session %d beside a hung VM: %v", i, err)
		}
	}
	if vms.inFlight() != 1 {
		t.Fatal("the hung VM operation ended early: the test proves nothing")
	}
	close(vms.release)
	if err := <-stuckDone; err != nil {
		t.Fatalf("the released VM operation: %v", err)
	}
}

// TestControlRequestsBounded: past the per-peer bound a control request
// is refused at once and counted; the source tries again until its
// context ends, then reports code limit; the peer's requests are served
// again once those in flight end.
func TestControlRequestsBounded(t *testing.T) {
	leaktest.Check(t)
	vms := &blockingVMs{release: make(chan struct{})}
	src, dst := controlHosts(t, vms, 2)
	ctx := context.Background()
	peer := dst.Addr().String()
	var ids []string
	for range 3 {
		s, err := src.Prepare(ctx, control.PrepareRequest{Peer: peer, Channels: []string{"main"}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, s.ID)
	}
	var wg sync.WaitGroup
	for _, id := range ids[:2] {
		wg.Go(func() { src.VMCall(ctx, id, "prepare", json.RawMessage(`{"vm":"stuck"}`)) })
	}
	waitFor(t, "two hung VM operations", func() bool { return vms.inFlight() == 2 })
	// The source tries again while the peer refuses; given a second, it
	// reports the refusal.
	short, cancel := context.WithTimeout(ctx, time.Second)
	_, err := src.VMCall(short, ids[2], "prepare", json.RawMessage(`{"vm":"ok"}`))
	cancel()
	if !errors.Is(err, control.ErrLimit) {
		t.Fatalf("a third request of the peer: %v, want code limit", err)
	}
	if n := metricValue(t, dst, "migtun_control_requests_refused_total", `scope="peer"`); n < 1 {
		t.Errorf("migtun_control_requests_refused_total{scope=peer} = %v, want at least 1", n)
	}
	close(vms.release)
	wg.Wait()
	if _, err := src.VMCall(ctx, ids[2], "prepare", json.RawMessage(`{"vm":"ok"}`)); err != nil {
		t.Fatalf("once the others ended: %v", err)
	}
}

// metricValue reads the value of the sample of name whose labels contain
// labels from the server's exposition; 0 if there is none.
func metricValue(t *testing.T, s *proxy.Server, name, labels string) float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	s.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	for _, line := range strings.Split(rec.Body.String(), "\n") {
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") || !strings.Contains(line, labels) {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			t.Fatalf("%s: %v", line, err)
		}
		return v
	}
	return 0
}
