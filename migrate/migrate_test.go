package migrate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/proxy"
)

func TestParseVM(t *testing.T) {
	name, cfg, err := ParseVM("vm1=unix:/run/vm1.qmp")
	if err != nil || name != "vm1" || cfg.QMP != "/run/vm1.qmp" || cfg.Peers != nil {
		t.Fatalf("got %q %+v %v", name, cfg, err)
	}
	name, cfg, err = ParseVM("web1=unix:/run/web1.qmp,peer=host-a,peer=host-c")
	if err != nil || name != "web1" || cfg.QMP != "/run/web1.qmp" || strings.Join(cfg.Peers, " ") != "host-a host-c" {
		t.Fatalf("got %q %+v %v", name, cfg, err)
	}
	for _, bad := range []string{"vm1", "=unix:/x", "vm1=/x", "vm1=tcp:1.2.3.4:5", "v m=unix:/x", "vm1=unix:",
		"vm1=unix:/x,peer=", "vm1=unix:/x,host-a", ".vm=unix:/x"} {
		if _, _, err := ParseVM(bad); err == nil {
			t.Errorf("ParseVM(%q) accepted", bad)
		}
	}
}

func TestMatchDisks(t *testing.T) {
	var nodes []blockNode
	json.Unmarshal([]byte(`[{"node-name":"disk0","ro":false,"image":{"virtual-size":1024}},
		{"node-name":"disk0-file","image":{"virtual-size":1024}},
		{"node-name":"cd","ro":true,"image":{"virtual-size":1024}}]`), &nodes)
	if err := matchDisks(nodes, []VMDisk{{Node: "disk0", Size: 1024}}); err != nil {
		t.Fatal(err)
	}
	err := matchDisks(nodes, []VMDisk{{Node: "disk0", Size: 2048}, {Node: "disk1", Size: 1}, {Node: "cd", Size: 1024}})
	for _, want := range []string{`"disk0" has 1024 bytes, the source's has 2048`, `no block node "disk1"`, `"cd" is read-only`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not say %q", err, want)
		}
	}
}

func TestCapabilitySet(t *testing.T) {
	offered := map[string]bool{"multifd": false, "postcopy-ram": false, "xbzrle": false}
	caps, err := capabilitySet(offered, map[string]bool{"multifd": true}, "QEMU")
	if err != nil || !caps["multifd"] || caps["postcopy-ram"] || len(caps) != 2 {
		t.Fatalf("caps %v, %v", caps, err)
	}
	if _, err := capabilitySet(map[string]bool{"multifd": false}, map[string]bool{"postcopy-ram": true}, "QEMU 7.2"); err == nil ||
		!strings.Contains(err.Error(), `QEMU 7.2 does not offer the migration capability "postcopy-ram"`) {
		t.Fatalf("err %v", err)
	}
}

func TestSelectDisks(t *testing.T) {
	var devs []blockDevice
	json.Unmarshal([]byte(`[
		{"device":"","qdev":"vd0","inserted":{"node-name":"disk0","ro":false,"image":{"virtual-size":4096}}},
		{"device":"ide1-cd0","inserted":{"node-name":"cd0","ro":true,"image":{"virtual-size":10}}},
		{"device":"floppy0"},
		{"device":"data","inserted":{"node-name":"disk1","image":{"virtual-size":512}}}]`), &devs)
	all, err := selectDisks(devs, nil)
	if err != nil || len(all) != 2 || all[0].node != "disk0" || all[0].size != 4096 || all[1].node != "disk1" {
		t.Fatalf("all: %+v %v", all, err)
	}
	one, err := selectDisks(devs, []string{"data"})
	if err != nil || len(one) != 1 || one[0].node != "disk1" {
		t.Fatalf("by device: %+v %v", one, err)
	}
	if _, err := selectDisks(devs, []string{"cd0"}); err == nil || !strings.Contains(err.Error(), "disks: disk0, disk1") {
		t.Fatalf("read-only disk selected: %v", err)
	}
	if _, err := selectDisks(nil, nil); err == nil {
		t.Fatal("no disk: no error")
	}
}

func TestNBDServer(t *testing.T) {
	s, err := nbdServer("unix:/tmp/x.sock")
	if err != nil || s["type"] != "unix" || s["path"] != "/tmp/x.sock" {
		t.Fatal(s, err)
	}
	s, err = nbdServer("tcp:127.0.0.1:1234")
	if err != nil || s["type"] != "inet" || s["host"] != "127.0.0.1" || s["port"] != "1234" {
		t.Fatal(s, err)
	}
	if _, err := nbdServer("fd:3"); err == nil {
		t.Fatal("fd accepted")
	}
}

func TestEndpointURI(t *testing.T) {
	if u, _ := endpointURI(endpoint.Endpoint{Network: "unix", Address: "/a"}); u != "unix:/a" {
		t.Fatal(u)
	}
	if u, _ := endpointURI(endpoint.Endpoint{Network: "tcp", Address: "127.0.0.1:1"}); u != "tcp:127.0.0.1:1" {
		t.Fatal(u)
	}
	if _, err := endpointURI(proxy.SessionSocket); err == nil {
		t.Fatal("session placeholder accepted")
	}
}

// The controller refuses unknown VMs and VMs of another session before
// touching any socket.
func TestControllerRefuses(t *testing.T) {
	c := NewController(map[string]VMConfig{"vm1": {QMP: "/nonexistent/qmp"}}, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.PrepareIncoming(ctx, "vm2", Incoming{Session: "s1"}); !errors.Is(err, control.ErrNotFound) ||
		!strings.Contains(err.Error(), `unknown VM "vm2" on this host`) {
		t.Fatalf("unknown VM: %v", err)
	}
	if _, err := c.FinishIncoming(ctx, "vm1", "s1", false); !errors.Is(err, control.ErrNotPrepared) {
		t.Fatalf("finish unprepared: %v", err)
	}
	if err := c.RecoverIncoming(ctx, "vm1", "s1", 1, endpoint.Unix("/nonexistent/in.sock")); !errors.Is(err, control.ErrNotPrepared) {
		t.Fatalf("recover unprepared: %v", err)
	}
	if err := c.AbortIncoming(ctx, "vm1", "s1"); err != nil {
		t.Fatalf("abort unprepared: %v", err)
	}
	// A VM held by one session is refused to another.
	if _, err := c.acquire("vm1", "s1", "host-a", true); err != nil {
		t.Fatal(err)
	}
	if _, err := c.acquire("vm1", "s2", "host-a", true); !errors.Is(err, control.ErrBusy) {
		t.Fatalf("second session: %v", err)
	}
}

// TestVMBoundToPeers: a VM bound to peers refuses every operation of
// another peer's session, before touching its QMP socket; the operations
// check what they are given.
func TestVMBoundToPeers(t *testing.T) {
	c := NewController(map[string]VMConfig{"web1": {QMP: "/nonexistent/qmp", Peers: []string{"host-a"}}}, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sess := proxy.VMSession{ID: "s1", Peer: "mallory", Targets: map[string]endpoint.Endpoint{"main": endpoint.Unix("/x/main.sock")}}
	for _, op := range []string{opPrepare, opFinish, opRecover, opAbort} {
		if _, err := c.ServeVM(ctx, op, sess, json.RawMessage(`{"vm":"web1"}`)); !errors.Is(err, control.ErrForbidden) {
			t.Errorf("%s by another peer: %v, want code forbidden", op, err)
		}
	}
	sess.Peer = "host-a"
	if _, err := c.ServeVM(ctx, opPrepare, sess, json.RawMessage(`{"vm":"web1","prepare":{"disks":[{"node":"d","size":1}]}}`)); !errors.Is(err, control.ErrBadRequest) ||
		!strings.Contains(err.Error(), "no nbd channel") {
		t.Errorf("disks without an nbd channel: %v", err)
	}
	// A main channel on a shared route (not the session's own socket) is
	// refused: another session's streams would reach the VM.
	if _, err := c.ServeVM(ctx, opPrepare, sess, json.RawMessage(`{"vm":"web1"}`)); !errors.Is(err, control.ErrForbidden) ||
		!strings.Contains(err.Error(), "own sockets") {
		t.Errorf("a shared main route: %v, want code forbidden", err)
	}
	if _, err := c.ServeVM(ctx, "reboot", sess, json.RawMessage(`{"vm":"web1"}`)); !errors.Is(err, control.ErrBadRequest) {
		t.Errorf("unknown operation: %v", err)
	}
	if _, err := c.ServeVM(ctx, opPrepare, sess, json.RawMessage(`{"vm":"web1","surprise":1}`)); err == nil {
		t.Errorf("unknown field accepted")
	}
	for _, bad := range []string{`{"multifd_channels":2,"multifd_compression":"lz4;rm"}`, `{"multifd_channels":-1}`, `{"multifd_channels":256}`} {
		if _, err := c.ServeVM(ctx, opPrepare, sess, json.RawMessage(`{"vm":"web1","prepare":`+bad+`}`)); !errors.Is(err, control.ErrBadRequest) ||
			!strings.Contains(err.Error(), "multifd") {
			t.Errorf("prepare %s: %v, want code bad_request naming multifd", bad, err)
		}
	}
}

func TestRunChecksOptions(t *testing.T) {
	for _, o := range []Options{
		{CopyStorage: "some"},
		{Disks: []string{"disk0"}},
		{Multifd: 300},
		{Multifd: 2, MultifdCompression: "lz4"},
		{MultifdCompression: "zstd"},
		{MirrorBuffer: 4096},
		{MirrorBuffer: 2 << 30},
		{Postcopy: true, PostcopyStart: "later"},
		{Postcopy: true, PostcopyBandwidth: -1},
	} {
		_, err := Run(context.Background(), o)
		var se *StepError
		if !errors.As(err, &se) || se.Step != StepBegin {
			t.Errorf("%+v: %v", o, err)
		}
	}
}

func TestWantCapsPreempt(t *testing.T) {
	r := &run{o: Options{Postcopy: true, Multifd: 4}}
	caps := r.wantCaps(map[string]bool{"multifd": false, "postcopy-ram": false, "postcopy-preempt": false})
	if !caps["postcopy-preempt"] || !caps["postcopy-ram"] || !caps["multifd"] {
		t.Fatalf("QEMU 8.0+ offering preempt: %v", caps)
	}
	caps = r.wantCaps(map[string]bool{"multifd": false, "postcopy-ram": false})
	if _, ok := caps["postcopy-preempt"]; ok {
		t.Fatalf("QEMU 7.2 (no preempt): %v", caps)
	}
	if caps := (&run{o: Options{}}).wantCaps(map[string]bool{"postcopy-preempt": false}); len(caps) != 0 {
		t.Fatalf("no postcopy asked: %v", caps)
	}
}

// FuzzServeVM feeds VM operations as a peer would send them: each is
// answered with an error that carries a code (never a panic), and nothing
// is dialed for a peer the VM is not bound to.
func FuzzServeVM(f *testing.F) {
	for _, seed := range []string{`{"vm":"web1"}`, `{"vm":"web1","prepare":{"disks":[{"node":"d","size":1}],"capabilities":{"multifd":true},"multifd_channels":4}}`,
		`{"vm":"web1","pause":3}`, `{"vm":"","reason":"x"}`, `{"vm":"web1","surprise":1}`, `[]`, `{`, ``} {
		for _, op := range []string{opPrepare, opFinish, opRecover, opAbort, "reboot"} {
			f.Add(op, []byte(seed))
		}
	}
	c := NewController(map[string]VMConfig{"web1": {QMP: "/nonexistent/qmp", Peers: []string{"host-a"}}}, nil)
	sess := proxy.VMSession{ID: "s1", Peer: "mallory", Targets: map[string]endpoint.Endpoint{"main": endpoint.Unix("/x/main.sock")}}
	f.Fuzz(func(t *testing.T, op string, body []byte) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := c.ServeVM(ctx, op, sess, body)
		if err == nil {
			t.Fatalf("%s %q: served for a peer the VM is not bound to", op, body)
		}
		if code := control.CodeOf(err); code == control.CodeInternal {
			t.Fatalf("%s %q: %v carries no code", op, body, err)
		}
	})
}

// TestWantCapsNoPreempt: with postcopy, postcopy-preempt is wanted when the
// source QEMU offers it, unless NoPostcopyPreempt.
func TestWantCapsNoPreempt(t *testing.T) {
	offered := map[string]bool{"multifd": false, "postcopy-ram": false, "postcopy-preempt": false}
	for _, tc := range []struct {
		o    Options
		off  map[string]bool
		want string
	}{
		{Options{Postcopy: true}, offered, "map[postcopy-preempt:true postcopy-ram:true]"},
		{Options{Postcopy: true, NoPostcopyPreempt: true}, offered, "map[postcopy-ram:true]"},
		{Options{Postcopy: true}, map[string]bool{"postcopy-ram": false}, "map[postcopy-ram:true]"},
		{Options{NoPostcopyPreempt: true, Multifd: 2}, offered, "map[multifd:true]"},
	} {
		r := &run{o: tc.o}
		if got := fmt.Sprint(r.wantCaps(tc.off)); got != tc.want {
			t.Errorf("%+v, offered %v: %s, want %s", tc.o, tc.off, got, tc.want)
		}
	}
}

// TestSessionEndedDuringOperation: a session that ends while an operation
// on its VM runs leaves the VM free once the operation ends, for the next
// session; every VM of an ended session is freed.
func TestSessionEndedDuringOperation(t *testing.T) {
	c := NewController(map[string]VMConfig{"a": {QMP: "/nonexistent/a"}, "b": {QMP: "/nonexistent/b"}}, nil)
	st, err := c.acquire("a", "s1", "", true)
	if err != nil {
		t.Fatal(err)
	}
	// b is prepared for s1 and idle.
	stb, err := c.acquire("b", "s1", "", true)
	if err != nil {
		t.Fatal(err)
	}
	c.release("b", stb, false)
	c.SessionEnded("s1") // a is busy: marked; b: freed now
	if _, err := c.acquire("b", "s2", "", true); err != nil {
		t.Fatalf("b after its session ended: %v", err)
	}
	c.release("a", st, false) // the operation succeeded, but its session is gone
	if _, err := c.acquire("a", "s2", "", true); err != nil {
		t.Fatalf("a after its session ended during an operation: %v", err)
	}
}
