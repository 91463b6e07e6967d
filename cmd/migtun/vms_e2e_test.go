package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/internal/vmtest"
)

// TestVMsAtRunTime: a destination started without any VM learns one
// through its control endpoint (PUT /v1/vms/NAME) and another by its QMP
// socket appearing in --qmp-dir; a real migration goes into each, RAM and
// disk identical; a removed VM, and a name never registered, are refused
// by name.
func TestVMsAtRunTime(t *testing.T) {
	requireTool(t, "qemu-system-x86_64")
	dir := shortTempDir(t)
	qmpDir := filepath.Join(dir, "qmp")
	if err := os.Mkdir(qmpDir, 0o700); err != nil {
		t.Fatal(err)
	}
	ca := pki(t, "src", "dst")
	dstCtl, srcCtl := "unix:"+filepath.Join(dir, "dst.ctl"), "unix:"+filepath.Join(dir, "src.ctl")
	dst := startServe(t, ca, "dst", nil, "--control", dstCtl, "--socket-dir", filepath.Join(dir, "ds"), "--qmp-dir", qmpDir+",peer=src")
	startServe(t, ca, "src", nil, "--control", srcCtl, "--socket-dir", filepath.Join(dir, "ss"))
	c, err := control.NewClient(dstCtl, &control.Options{Timeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := func(dir, name string, incoming bool) *vmtest.VM {
		vm, err := vmtest.Start(ctx, vmtest.Options{Dir: dir, Name: name, RAM: fleetRAM, Disk: fleetDisk, Random: !incoming, Incoming: incoming})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { vm.Close() })
		vm.QMP.Close() // migtun drives it
		return vm
	}
	migrateTo := func(src *vmtest.VM, name string) (string, error) {
		out, err := migtun(t, "migrate", "--control", srcCtl, "--peer", dst.Addr, "--qmp", "unix:"+src.QMPPath,
			"--dest-vm", name, "--copy-storage", "all", "--paused", "--timeout", "25s")
		return out, err
	}

	// Registered through the control endpoint, with migtun vm add.
	srcA, dstA := start(dir, "src-a", false), start(dir, "dst-a", true)
	if out, err := migtun(t, "vm", "add", "--control", dstCtl, "late", "unix:"+dstA.QMPPath, "--peer", "src"); err != nil {
		t.Fatalf("migtun vm add: %v\n%s", err, out)
	}
	if out, err := migrateTo(srcA, "late"); err != nil {
		t.Fatalf("migrating into a VM registered at run time: %v\n%s", err, migTail(out, 8))
	}
	checkPausedAndEqual(ctx, t, srcA, dstA)

	// Found in the QMP directory: its socket is dir/NAME.qmp.
	srcB, dstB := start(dir, "src-b", false), start(qmpDir, "placed", true)
	list, err := c.VMs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, v := range list {
		names = append(names, v.Name+"/"+v.Source)
	}
	if strings.Join(names, " ") != "late/api placed/dir" {
		t.Errorf("GET /v1/vms lists %v, want late/api placed/dir", names)
	}
	if out, err := migrateTo(srcB, "placed"); err != nil {
		t.Fatalf("migrating into a VM of --qmp-dir: %v\n%s", err, migTail(out, 8))
	}
	checkPausedAndEqual(ctx, t, srcB, dstB)

	// Removed, and never registered: refused by name.
	if err := c.RemoveVM(ctx, "late"); err != nil {
		t.Fatal(err)
	}
	if err := c.RemoveVM(ctx, "late"); !errors.Is(err, control.ErrNotFound) {
		t.Errorf("removing it twice: %v, want not_found", err)
	}
	srcC := start(dir, "src-c", false)
	for _, name := range []string{"late", "never"} {
		out, err := migrateTo(srcC, name)
		if err == nil || !strings.Contains(out, `unknown VM "`+name+`"`) {
			t.Errorf("migrating into %q: %v, want a refusal naming it:\n%s", name, err, migTail(out, 3))
		}
	}
	checkHostsClean(t, []string{srcCtl, dstCtl}, filepath.Join(dir, "ss"))
}
