package main

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/internal/sidecar"
	"github.com/migtun/migtun/internal/vmtest"
)

// Small guests: these tests are about many migrations at once, not size.
const (
	fleetRAM  = 64 << 20
	fleetDisk = 16 << 20
)

// fleet is source hosts and destination hosts, each a migtun process,
// and a pair of QEMUs per migration: vm<i> on a source, its paused
// incoming twin registered on a destination.
type fleet struct {
	dir     string
	pki     string
	dsts    []*sidecar.Proc
	dstCtls []string
	srcs    []*sidecar.Proc
	srcCtls []string
	socks   []string // every host's socket directory
	vms     []fleetVM
}

type fleetVM struct {
	name     string
	src, dst *vmtest.VM
	host, to int // indexes of its source and destination hosts
}

// newFleet starts n VM pairs spread over srcHosts source hosts and one
// destination, which registers every incoming VM.
func newFleet(t *testing.T, n, srcHosts int) *fleet {
	return newFleetTo(t, n, srcHosts, 1)
}

// newFleetTo is newFleet with dstHosts destinations: vm<i> goes from
// source i%srcHosts to destination i%dstHosts.
func newFleetTo(t *testing.T, n, srcHosts, dstHosts int) *fleet {
	q := vmtest.One(t)
	f := &fleet{dir: shortTempDir(t), vms: make([]fleetVM, n)}
	var names []string
	for h := range dstHosts {
		names = append(names, fmt.Sprintf("dst%d", h))
	}
	for h := range srcHosts {
		names = append(names, fmt.Sprintf("src%d", h))
	}
	f.pki = pki(t, names...)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			v := &f.vms[i]
			v.name, v.host, v.to = fmt.Sprintf("vm%d", i), i%srcHosts, i%dstHosts
			var err error
			v.src, err = vmtest.Start(ctx, vmtest.Options{Dir: f.dir, Name: "s" + v.name, RAM: fleetRAM, Disk: fleetDisk, Random: true, QEMU: q})
			if err != nil {
				errs[i] = err
				return
			}
			v.dst, errs[i] = vmtest.Start(ctx, vmtest.Options{Dir: f.dir, Name: "d" + v.name, RAM: fleetRAM, Disk: fleetDisk, Incoming: true, QEMU: q})
		})
	}
	wg.Wait()
	for i, v := range f.vms {
		for _, vm := range []*vmtest.VM{v.src, v.dst} {
			if vm != nil {
				vm.QMP.Close() // migtun drives them
				t.Cleanup(func() { vm.Signal(syscall.SIGCONT); vm.Close() })
			}
		}
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
	}
	for h := range dstHosts {
		name := fmt.Sprintf("dst%d", h)
		ctl, socks := "unix:"+filepath.Join(f.dir, name+".ctl"), filepath.Join(f.dir, name+"-socks")
		args := []string{"--control", ctl, "--socket-dir", socks}
		for _, v := range f.vms {
			if v.to == h {
				args = append(args, "--qmp", v.name+"=unix:"+v.dst.QMPPath)
			}
		}
		f.dsts = append(f.dsts, startServe(t, f.pki, name, nil, args...))
		f.dstCtls = append(f.dstCtls, ctl)
		f.socks = append(f.socks, socks)
	}
	for h := range srcHosts {
		name := fmt.Sprintf("src%d", h)
		ctl, socks := "unix:"+filepath.Join(f.dir, name+".ctl"), filepath.Join(f.dir, name+"-socks")
		f.srcs = append(f.srcs, startServe(t, f.pki, name, nil, "--control", ctl, "--socket-dir", socks))
		f.srcCtls = append(f.srcCtls, ctl)
		f.socks = append(f.socks, socks)
	}
	return f
}

// migrated is the outcome of one "migtun migrate".
type migrated struct {
	out  string
	err  error
	took time.Duration
}

// migrateAll runs "migtun migrate" for the VMs whose indexes are given,
// all at once, and returns each outcome by index.
func (f *fleet) migrateAll(t *testing.T, idx []int) map[int]migrated {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	var mu sync.Mutex
	res := map[int]migrated{}
	var wg sync.WaitGroup
	for _, i := range idx {
		v := f.vms[i]
		wg.Go(func() {
			start := time.Now()
			out, err := exec.CommandContext(ctx, migtunBin, "migrate", "--control", f.srcCtls[v.host], "--peer", f.dsts[v.to].Addr,
				"--qmp", "unix:"+v.src.QMPPath, "--dest-vm", v.name, "--copy-storage", "all", "--paused", "--timeout", "5m").CombinedOutput()
			mu.Lock()
			res[i] = migrated{out: string(out), err: err, took: time.Since(start)}
			mu.Unlock()
		})
	}
	wg.Wait()
	return res
}

// checkEqual takes the VMs' monitors back and compares RAM and disk.
func (f *fleet) checkEqual(t *testing.T, i int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	checkPausedAndEqual(ctx, t, f.vms[i].src, f.vms[i].dst)
}

// checkClean fails if a session is open on any host or a socket is left.
func (f *fleet) checkClean(t *testing.T) {
	t.Helper()
	checkHostsClean(t, append(slices.Clone(f.dstCtls), f.srcCtls...), f.socks...)
}

func seq(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}

// TestConcurrentMigrations runs 16 "migtun migrate" at once between two
// migtun processes, then 8 from two source hosts into one destination,
// and compares every guest's RAM and disk.
func TestConcurrentMigrations(t *testing.T) {
	for _, tc := range []struct {
		name     string
		vms, src int
	}{{"16-between-two-hosts", 16, 1}, {"two-sources-one-destination", 8, 2}} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFleet(t, tc.vms, tc.src)
			start := time.Now()
			res := f.migrateAll(t, seq(tc.vms))
			t.Logf("%d migrations from %d source host(s) took %v", tc.vms, tc.src, time.Since(start).Round(time.Millisecond))
			for i := range tc.vms {
				if r := res[i]; r.err != nil {
					t.Fatalf("%s: %v\n%s", f.vms[i].name, r.err, migTail(r.out, 10))
				}
				f.checkEqual(t, i)
			}
			f.checkClean(t)
		})
	}
}

// TestStuckDestinationVM stops the destination QEMU of one of four
// migrations (SIGSTOP, a hung QEMU): the other three complete,
// byte-identical; the stuck one fails naming its VM and leaves no session
// or socket. The same three migrate first without the fault, for
// comparison of their times.
func TestStuckDestinationVM(t *testing.T) {
	f := newFleet(t, 7, 1)
	base := f.migrateAll(t, []int{4, 5, 6})
	for i := 4; i < 7; i++ {
		if base[i].err != nil {
			t.Fatalf("%s without a fault: %v\n%s", f.vms[i].name, base[i].err, migTail(base[i].out, 10))
		}
	}
	if err := f.vms[0].dst.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	res := f.migrateAll(t, []int{0, 1, 2, 3})
	for i := 1; i < 4; i++ {
		if res[i].err != nil {
			t.Fatalf("%s beside a stuck VM: %v\n%s", f.vms[i].name, res[i].err, migTail(res[i].out, 10))
		}
		t.Logf("%s: %v beside the stuck VM; without a fault %s took %v", f.vms[i].name, res[i].took.Round(time.Millisecond),
			f.vms[i+3].name, base[i+3].took.Round(time.Millisecond))
		f.checkEqual(t, i)
	}
	stuck := res[0]
	if stuck.err == nil {
		t.Fatal("the migration into a stopped QEMU succeeded")
	}
	if !strings.Contains(stuck.out, `VM "vm0"`) {
		t.Errorf("the stuck migration's error does not name its VM:\n%s", migTail(stuck.out, 5))
	}
	t.Logf("the stuck migration failed after %v: %s", stuck.took.Round(time.Millisecond), migTail(stuck.out, 1))
	f.vms[0].dst.Signal(syscall.SIGCONT)
	f.checkClean(t)
}

// TestPeerStopsAnswering: host A migrates to B and to C at once, and C's
// migtun has stopped answering (SIGSTOP): A→B completes, byte-identical,
// and A→C fails; A is left with no session of either.
func TestPeerStopsAnswering(t *testing.T) {
	f := newFleetTo(t, 2, 1, 2) // vm0: A→B, vm1: A→C
	c := f.dsts[1]
	if err := syscall.Kill(c.PID(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(c.PID(), syscall.SIGCONT) })
	res := f.migrateAll(t, []int{0, 1})
	if res[0].err != nil {
		t.Fatalf("A→B beside a peer that does not answer: %v\n%s", res[0].err, migTail(res[0].out, 10))
	}
	f.checkEqual(t, 0)
	if res[1].err == nil {
		t.Fatal("a migration to a stopped migtun succeeded")
	}
	t.Logf("A→B took %v; A→C failed after %v: %s", res[0].took.Round(time.Millisecond), res[1].took.Round(time.Millisecond), migTail(res[1].out, 1))
	checkHostsClean(t, append([]string{f.dstCtls[0]}, f.srcCtls...), f.socks[0], f.socks[2])
}

// TestShutdownManySessions sends SIGTERM to a migtun holding 64 sessions,
// half of them with a peer that no longer answers (SIGSTOP): it exits
// within --drain-timeout plus 5 s, and the live peer has every one of its
// sessions ended.
func TestShutdownManySessions(t *testing.T) {
	dir := shortTempDir(t)
	ca := pki(t, "a", "b", "c")
	peers := []*sidecar.Proc{
		startServe(t, ca, "b", nil, "--control", "unix:"+filepath.Join(dir, "b.ctl"), "--socket-dir", filepath.Join(dir, "bs"), "--route", "main=unix:"+filepath.Join(dir, "b-main.sock")),
		startServe(t, ca, "c", nil, "--socket-dir", filepath.Join(dir, "cs"), "--route", "main=unix:"+filepath.Join(dir, "c-main.sock")),
	}
	aCtl := "unix:" + filepath.Join(dir, "a.ctl")
	a, err := sidecar.Start(migtunBin, nil, filepath.Join(dir, "a.log"), "serve", "--listen", "127.0.0.1:0",
		"--cert", filepath.Join(ca, "a.crt"), "--key", filepath.Join(ca, "a.key"), "--ca", filepath.Join(ca, "ca.crt"),
		"--control", aCtl, "--socket-dir", filepath.Join(dir, "as"), "--drain-timeout", "2s")
	if err != nil {
		t.Fatal(err)
	}
	defer a.Kill()
	client, err := control.NewClient(aCtl, &control.Options{Timeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ctx := context.Background()
	for i := range 64 {
		if _, err := client.Prepare(ctx, control.PrepareRequest{Peer: peers[i%2].Addr, Channels: []string{"main"}}); err != nil {
			t.Fatalf("prepare %d: %v", i, err)
		}
	}
	if err := syscall.Kill(peers[1].PID(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(peers[1].PID(), syscall.SIGCONT) })
	start := time.Now()
	if err := a.Stop(2*time.Second + 5*time.Second); err != nil {
		t.Fatalf("SIGTERM with 64 sessions open, 32 to a peer that does not answer: %v\n%s", err, a.Log(30))
	}
	t.Logf("migtun exited %v after SIGTERM (--drain-timeout 2s)", time.Since(start).Round(time.Millisecond))
	bc, err := control.NewClient("unix:"+filepath.Join(dir, "b.ctl"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer bc.Close()
	list, err := bc.Sessions(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ended := 0
	for _, s := range list {
		if s.State.Ended() {
			ended++
		} else {
			t.Errorf("the live peer's session %s is still %s", s.ID, s.State)
		}
	}
	if ended != 32 {
		t.Errorf("the live peer ended %d sessions, want 32", ended)
	}
}
