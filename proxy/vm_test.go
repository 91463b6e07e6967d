package proxy_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/internal/testpki"
	"github.com/migtun/migtun/proxy"
	"github.com/migtun/migtun/tunnel"
)

// fakeVMs records what the proxy hands a VM handler.
type fakeVMs struct {
	mu    sync.Mutex
	calls []string
	sess  proxy.VMSession
	err   error
	ended []string
	// block, when set, makes every operation wait for it or its context.
	block chan struct{}
}

func (f *fakeVMs) ServeVM(ctx context.Context, op string, sess proxy.VMSession, body json.RawMessage) (any, error) {
	f.mu.Lock()
	f.calls = append(f.calls, op+" "+string(body))
	f.sess = sess
	err, block := f.err, f.block
	f.mu.Unlock()
	if block != nil {
		select {
		case <-block:
		case <-ctx.Done():
			return nil, control.Errorf(control.CodeTimeout, "VM operation: %w", ctx.Err())
		}
	}
	if err != nil {
		return nil, err
	}
	return map[string]string{"op": op}, nil
}

func (f *fakeVMs) SessionEnded(session string) {
	f.mu.Lock()
	f.ended = append(f.ended, session)
	f.mu.Unlock()
}

func vmHosts(t *testing.T, vms proxy.VMHandler) (src, dst *proxy.Server, dstSocks string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "pv")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ca := testpki.NewCA(t)
	dstSocks = filepath.Join(dir, "d")
	dst, err = proxy.New(proxy.Config{Listen: "127.0.0.1:0", Tunnel: sessTunnel(ca.NewHost(t, "dst"), tunnel.TLS),
		Routes:    []proxy.Route{{Channel: "main", Target: proxy.SessionSocket}, {Channel: "nbd", Target: proxy.SessionSocket}},
		SocketDir: dstSocks, VMs: vms, FinishGrace: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := dst.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dst.Close() })
	src, err = proxy.New(proxy.Config{Listen: "127.0.0.1:0", Tunnel: sessTunnel(ca.NewHost(t, "src"), tunnel.TLS),
		SocketDir: filepath.Join(dir, "s"), FinishGrace: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	return src, dst, dstSocks
}

// TestVMOperations: a VM operation's body reaches the handler as sent,
// with the session's own socket paths on the destination (nothing from the
// wire) and the peer's certificate name; the answer comes back as sent;
// an ended session is reported.
func TestVMOperations(t *testing.T) {
	f := &fakeVMs{}
	src, dst, dstSocks := vmHosts(t, f)
	ctx := context.Background()
	info, err := src.Prepare(ctx, control.PrepareRequest{Peer: dst.Addr().String(), Channels: []string{"main", "nbd"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, op := range []string{"prepare", "finish", "recover", "abort"} {
		out, err := src.VMCall(ctx, info.ID, op, json.RawMessage(`{"vm":"vm1"}`))
		if err != nil || string(out) != `{"op":"`+op+`"}` {
			t.Fatalf("%s: %s %v", op, out, err)
		}
	}
	f.mu.Lock()
	sess := f.sess
	f.mu.Unlock()
	if sess.ID != info.ID || sess.Peer != "src" {
		t.Errorf("handler saw session %q of peer %q, want %q of src", sess.ID, sess.Peer, info.ID)
	}
	for _, ch := range []string{"main", "nbd"} {
		want := endpoint.Unix(filepath.Join(dstSocks, info.ID[:12]+"-"+ch+".sock"))
		if sess.Targets[ch] != want {
			t.Errorf("%s target %v, want the session's own socket %v", ch, sess.Targets[ch], want)
		}
	}
	// The destination cannot be asked VM operations of a source session.
	if _, err := dst.VMCall(ctx, info.ID, "prepare", json.RawMessage(`{}`)); !errors.Is(err, control.ErrBadRequest) {
		t.Fatalf("VMCall on the destination: %v", err)
	}
	if _, err := src.Abort(ctx, info.ID, "done"); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.ended) != 1 || f.ended[0] != info.ID {
		t.Errorf("the handler was told of ended sessions %v, want [%s]", f.ended, info.ID)
	}
	if got := strings.Join(f.calls, ","); got != `prepare {"vm":"vm1"},finish {"vm":"vm1"},recover {"vm":"vm1"},abort {"vm":"vm1"}` {
		t.Fatalf("calls %s", got)
	}
}

// TestVMErrors: a host without VMs, a handler's error and an unknown
// session reach the source with their codes.
func TestVMErrors(t *testing.T) {
	ctx := context.Background()
	src, dst, _ := vmHosts(t, nil)
	info, err := src.Prepare(ctx, control.PrepareRequest{Peer: dst.Addr().String(), Channels: []string{"main"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := src.VMCall(ctx, info.ID, "prepare", json.RawMessage(`{}`)); !errors.Is(err, control.ErrNotFound) || !strings.Contains(err.Error(), "drives no VM") {
		t.Fatalf("no VMs: %v", err)
	}
	f := &fakeVMs{err: control.Errorf(control.CodeBusy, `VM "vm1" is busy with another migration`)}
	src, dst, _ = vmHosts(t, f)
	info, err = src.Prepare(ctx, control.PrepareRequest{Peer: dst.Addr().String(), Channels: []string{"main"}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = src.VMCall(ctx, info.ID, "prepare", json.RawMessage(`{}`))
	var ce *control.Error
	if !errors.Is(err, control.ErrBusy) || !errors.As(err, &ce) || ce.Peer != dst.Addr().String() {
		t.Fatalf("handler error: %v, want code busy from the peer", err)
	}
	if _, err := src.VMCall(ctx, "00112233445566778899aabbccddeeff", "finish", json.RawMessage(`{}`)); !errors.Is(err, control.ErrNotFound) {
		t.Fatalf("unknown session: %v", err)
	}
}
