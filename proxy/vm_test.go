package proxy_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/migtun/migtun/internal/testpki"
	"github.com/migtun/migtun/proxy"
	"github.com/migtun/migtun/tunnel"
)

// fakeVMs records what the proxy asks of a VM controller.
type fakeVMs struct {
	mu      sync.Mutex
	calls   []string
	in      proxy.VMIncoming
	recover proxy.Endpoint
	ended   []string
	prepErr error
}

func (f *fakeVMs) note(s string) { f.mu.Lock(); f.calls = append(f.calls, s); f.mu.Unlock() }

func (f *fakeVMs) PrepareIncoming(_ context.Context, vm string, in proxy.VMIncoming) (*proxy.VMPrepared, error) {
	f.note("prepare " + vm)
	f.mu.Lock()
	f.in = in
	f.mu.Unlock()
	if f.prepErr != nil {
		return nil, f.prepErr
	}
	return &proxy.VMPrepared{QEMU: "7.2.0", Capabilities: []string{"multifd"}}, nil
}

func (f *fakeVMs) FinishIncoming(_ context.Context, vm, session string, resume bool) (*proxy.VMResult, error) {
	f.note("finish " + vm)
	return &proxy.VMResult{Status: "running", Resumed: resume}, nil
}

func (f *fakeVMs) RecoverIncoming(_ context.Context, vm, session string, main proxy.Endpoint) error {
	f.note("recover " + vm)
	f.mu.Lock()
	f.recover = main
	f.mu.Unlock()
	return nil
}

func (f *fakeVMs) AbortIncoming(_ context.Context, vm, session string) error {
	f.note("abort " + vm)
	return nil
}

func (f *fakeVMs) SessionEnded(session string) {
	f.mu.Lock()
	f.ended = append(f.ended, session)
	f.mu.Unlock()
}

func vmHosts(t *testing.T, vms proxy.VMController) (src, dst *proxy.Server, dstSocks string) {
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

// TestVMOperations: vm-prepare hands the controller the session's own
// socket paths on the destination (nothing from the wire), vm-finish and
// vm-abort reach it, and an ended session is reported.
func TestVMOperations(t *testing.T) {
	f := &fakeVMs{}
	src, dst, dstSocks := vmHosts(t, f)
	ctx := context.Background()
	info, err := src.Prepare(ctx, proxy.PrepareRequest{Peer: dst.Addr().String(), Channels: []string{"main", "nbd"}})
	if err != nil {
		t.Fatal(err)
	}
	prep := &proxy.VMPrepare{Disks: []proxy.VMDisk{{Node: "disk0", Size: 1 << 20}}, Capabilities: map[string]bool{"multifd": true}, MultifdChannels: 4}
	p, _, err := src.VMCall(ctx, info.ID, "prepare", proxy.VMRequest{VM: "vm1", Prepare: prep})
	if err != nil || p == nil || p.QEMU != "7.2.0" {
		t.Fatalf("vm-prepare: %+v %v", p, err)
	}
	f.mu.Lock()
	in := f.in
	f.mu.Unlock()
	if in.Session != info.ID || in.MultifdChannels != 4 || len(in.Disks) != 1 || !in.Capabilities["multifd"] {
		t.Fatalf("controller got %+v", in)
	}
	for _, ep := range []proxy.Endpoint{in.Main, in.NBD} {
		if ep.Network != "unix" || filepath.Dir(ep.Address) != dstSocks || !strings.HasPrefix(filepath.Base(ep.Address), info.ID[:12]) {
			t.Errorf("endpoint %v: want a socket of the session in %s", ep, dstSocks)
		}
	}
	if _, r, err := src.VMCall(ctx, info.ID, "finish", proxy.VMRequest{VM: "vm1", Resume: true}); err != nil || r == nil || !r.Resumed {
		t.Fatalf("vm-finish: %+v %v", r, err)
	}
	if _, _, err := src.VMCall(ctx, info.ID, "recover", proxy.VMRequest{VM: "vm1"}); err != nil {
		t.Fatalf("vm-recover: %v", err)
	}
	f.mu.Lock()
	if f.recover != in.Main {
		t.Errorf("vm-recover listens on %v, want the session's main endpoint %v", f.recover, in.Main)
	}
	f.mu.Unlock()
	if _, _, err := src.VMCall(ctx, info.ID, "abort", proxy.VMRequest{VM: "vm1", Reason: "test"}); err != nil {
		t.Fatalf("vm-abort: %v", err)
	}
	// The destination cannot be asked VM operations of a source session.
	if _, _, err := dst.VMCall(ctx, info.ID, "prepare", proxy.VMRequest{VM: "vm1"}); !errors.Is(err, proxy.ErrNoSession) && !errors.Is(err, proxy.ErrBadRequest) {
		t.Fatalf("VMCall on the destination: %v", err)
	}
	if _, err := src.Abort(info.ID, "done"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		f.mu.Lock()
		n := len(f.ended)
		f.mu.Unlock()
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the controller was not told the session ended")
		}
		time.Sleep(10 * time.Millisecond)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if got := strings.Join(f.calls, ","); got != "prepare vm1,finish vm1,recover vm1,abort vm1" {
		t.Fatalf("calls %s", got)
	}
}

// TestVMErrors: a host without VMs, a controller's error and a session
// without an nbd channel are refused with clear messages.
func TestVMErrors(t *testing.T) {
	ctx := context.Background()
	src, dst, _ := vmHosts(t, nil)
	info, err := src.Prepare(ctx, proxy.PrepareRequest{Peer: dst.Addr().String(), Channels: []string{"main"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := src.VMCall(ctx, info.ID, "prepare", proxy.VMRequest{VM: "vm1"}); err == nil || !strings.Contains(err.Error(), "drives no VM") {
		t.Fatalf("no VMs: %v", err)
	}
	f := &fakeVMs{prepErr: errors.New(`unknown VM "vm9" on this host`)}
	src, dst, _ = vmHosts(t, f)
	info, err = src.Prepare(ctx, proxy.PrepareRequest{Peer: dst.Addr().String(), Channels: []string{"main"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := src.VMCall(ctx, info.ID, "prepare", proxy.VMRequest{VM: "vm9"}); err == nil || !strings.Contains(err.Error(), `unknown VM "vm9"`) {
		t.Fatalf("controller error: %v", err)
	}
	if _, _, err := src.VMCall(ctx, info.ID, "prepare", proxy.VMRequest{VM: "vm1", Prepare: &proxy.VMPrepare{Disks: []proxy.VMDisk{{Node: "d", Size: 1}}}}); err == nil || !strings.Contains(err.Error(), "no nbd channel") {
		t.Fatalf("disks without nbd: %v", err)
	}
	if _, _, err := src.VMCall(ctx, "00112233445566778899aabbccddeeff", "finish", proxy.VMRequest{VM: "vm1"}); !errors.Is(err, proxy.ErrNoSession) {
		t.Fatalf("unknown session: %v", err)
	}
}
