package migrate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/proxy"
)

func TestParseVM(t *testing.T) {
	name, path, err := ParseVM("vm1=unix:/run/vm1.qmp")
	if err != nil || name != "vm1" || path != "/run/vm1.qmp" {
		t.Fatalf("got %q %q %v", name, path, err)
	}
	for _, bad := range []string{"vm1", "=unix:/x", "vm1=/x", "vm1=tcp:1.2.3.4:5", "v m=unix:/x", "vm1=unix:"} {
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
	c := NewController(map[string]string{"vm1": "/nonexistent/qmp"}, nil)
	ctx := context.Background()
	if _, err := c.PrepareIncoming(ctx, "vm2", Incoming{Session: "s1"}); err == nil ||
		!strings.Contains(err.Error(), `unknown VM "vm2" on this host (registered: vm1)`) {
		t.Fatalf("unknown VM: %v", err)
	}
	if _, err := c.FinishIncoming(ctx, "vm1", "s1", false); err == nil || !strings.Contains(err.Error(), "not prepared") {
		t.Fatalf("finish unprepared: %v", err)
	}
	if err := c.RecoverIncoming(ctx, "vm1", "s1", 1, endpoint.Endpoint{Network: "unix", Address: "/nonexistent/in.sock"}); err == nil || !strings.Contains(err.Error(), "not prepared") {
		t.Fatalf("recover unprepared: %v", err)
	}
	if err := c.AbortIncoming(ctx, "vm1", "s1"); err != nil {
		t.Fatalf("abort unprepared: %v", err)
	}
	// A VM held by one session is refused to another.
	if _, err := c.acquire("vm1", "s1", true); err != nil {
		t.Fatal(err)
	}
	if _, err := c.acquire("vm1", "s2", true); err == nil || !strings.Contains(err.Error(), "busy") {
		t.Fatalf("second session: %v", err)
	}
}

func TestRunChecksOptions(t *testing.T) {
	for _, o := range []Options{
		{CopyStorage: "some"},
		{Disks: []string{"disk0"}},
		{Multifd: 300},
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
