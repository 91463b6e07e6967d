package main

import (
	"bytes"
	"context"
	"os"
	"testing"
	"time"

	"github.com/migtun/migtun/internal/vmtest"
)

// dirtyBootSector is a 512-byte x86 boot sector that keeps rewriting guest
// memory: with AX as a counter, it fills the 512 KiB from 0x10000 to 0x8FFFF
// with AX (rep stosw, 64 KiB per segment), increments AX and starts over,
// for ever. SeaBIOS boots it from the VM's disk.
//
//	fa              cli
//	31 c0           xor  ax, ax
//	bb 00 10  outer: mov bx, 0x1000
//	8e c3     seg:   mov es, bx
//	31 ff           xor  di, di
//	b9 00 80        mov  cx, 0x8000
//	f3 ab           rep  stosw
//	81 c3 00 10     add  bx, 0x1000
//	81 fb 00 90     cmp  bx, 0x9000
//	72 ed           jb   seg
//	40              inc  ax
//	eb e7           jmp  outer
var dirtyBootSector = func() []byte {
	b := make([]byte, 512)
	copy(b, []byte{
		0xfa, 0x31, 0xc0, 0xbb, 0x00, 0x10, 0x8e, 0xc3, 0x31, 0xff, 0xb9, 0x00, 0x80, 0xf3, 0xab,
		0x81, 0xc3, 0x00, 0x10, 0x81, 0xfb, 0x00, 0x90, 0x72, 0xed, 0x40, 0xeb, 0xe7,
	})
	b[510], b[511] = 0x55, 0xaa
	return b
}()

// guestRegion reads the 512 KiB the boot sector rewrites from a VM's RAM.
func guestRegion(t *testing.T, vm *vmtest.VM) []byte {
	t.Helper()
	f, err := os.Open(vm.RAMPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 512<<10)
	if _, err := f.ReadAt(b, 0x10000); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestMigrateDirtyingGuest migrates a running guest that keeps rewriting
// half a megabyte of its memory as fast as it can: the migration must
// converge, and with --paused both sides stopped at completion must hold
// the same RAM and disk.
func TestMigrateDirtyingGuest(t *testing.T) {
	r := newMigrateRig(t, 256<<20, 16<<20)
	f, err := os.OpenFile(r.srcVM.DiskPath, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(dirtyBootSector, 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	reconnect(t, r.srcVM)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	if err := r.srcVM.QMP.Cont(ctx); err != nil {
		t.Fatal(err)
	}
	// Wait until the guest is seen rewriting its memory.
	deadline := time.Now().Add(30 * time.Second)
	for {
		a := guestRegion(t, r.srcVM)
		time.Sleep(100 * time.Millisecond)
		if !bytes.Equal(a, guestRegion(t, r.srcVM)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the guest does not rewrite its memory: did it boot the sector?")
		}
	}
	r.srcVM.QMP.Close() // migtun migrate needs the monitor
	out, err := r.migrateCmd(ctx, "--copy-storage", "all", "--paused")
	if err != nil {
		t.Fatalf("migtun migrate of a running, dirtying guest: %v\n%s", err, out)
	}
	t.Logf("migtun migrate converged; its output ends:\n%s", migTail(out, 6))
	reconnect(t, r.srcVM)
	reconnect(t, r.dstVM)
	for _, vm := range []*vmtest.VM{r.srcVM, r.dstVM} {
		st, err := vm.QMP.Status(ctx)
		if err != nil || st == "running" {
			t.Errorf("%s: status %q (%v), want stopped", vm.Options.Name, st, err)
		}
	}
	compareRAMOutsideBIOS(t, r.srcVM, r.dstVM)
	for _, p := range [][2]string{{r.srcVM.DiskPath, r.dstVM.DiskPath}} {
		a, err1 := vmtest.HashFile(p[0])
		b, err2 := vmtest.HashFile(p[1])
		if err1 != nil || err2 != nil || a != b {
			t.Fatalf("disks differ: %s %s (%v %v)", a, b, err1, err2)
		}
	}
	r.checkClean(t)
}

// biosArea is the legacy option-ROM and BIOS area of guest RAM. SeaBIOS
// keeps its drivers' data there (the virtio-blk queue it booted from), and
// one page of it was seen to differ after every migration of a booted guest,
// also with vapic off: a few bytes of that device structure (0xe8c20), which
// QEMU's device state on the destination accounts for, not the stream. The
// rest of RAM is compared byte for byte.
const biosAreaStart, biosAreaEnd = 0xc0000, 0x100000

func compareRAMOutsideBIOS(t *testing.T, src, dst *vmtest.VM) {
	t.Helper()
	a, err := os.ReadFile(src.RAMPath)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(dst.RAMPath)
	if err != nil {
		t.Fatal(err)
	}
	if len(a) != len(b) {
		t.Fatalf("RAM sizes differ: %d and %d", len(a), len(b))
	}
	if !bytes.Equal(a[:biosAreaStart], b[:biosAreaStart]) || !bytes.Equal(a[biosAreaEnd:], b[biosAreaEnd:]) {
		for i := range a {
			if (i < biosAreaStart || i >= biosAreaEnd) && a[i] != b[i] {
				t.Fatalf("RAM differs at offset 0x%x", i)
			}
		}
	}
	diff := 0
	for off := biosAreaStart; off < biosAreaEnd; off += 4096 {
		if !bytes.Equal(a[off:off+4096], b[off:off+4096]) {
			diff++
		}
	}
	t.Logf("RAM equal outside the BIOS area; %d of its 64 pages differ", diff)
}
