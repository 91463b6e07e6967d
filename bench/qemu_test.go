package bench

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/migtun/migtun/internal/linkemu"
	"github.com/migtun/migtun/internal/vmtest"
)

// TestRunQEMU migrates a real guest (64 MiB RAM, a 16 MiB disk copied
// over NBD) through the direct path, socat and migtun (tls single
// channel, plain with multifd 2): each migration must complete with the
// guest RAM and disk identical on both sides (RunQEMU compares them), and
// report the bytes moved, time and CPU.
func TestRunQEMU(t *testing.T) {
	if _, err := vmtest.QEMUBinary(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%v (required when CI=true)", err)
		}
		t.Skipf("%v; skipping", err)
	}
	const ram, disk = 64 << 20, 16 << 20
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cfg := Config{Migtun: migtunBin, Transports: []string{"tls", "plain"}, Streams: []int{1, 2},
		Baselines: []string{Direct, Socat}, Size: ram, Disk: disk, Stall: 20 * time.Second}
	results, err := RunQEMU(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{Direct, Socat, "migtun/tls/1", "migtun/tls/2", "migtun/plain/1", "migtun/plain/2"}
	if len(results) != len(want) {
		t.Fatalf("%d results, want %v: %+v", len(results), want, results)
	}
	for i, r := range results {
		if r.Path != want[i] {
			t.Errorf("result %d is %s, want %s", i, r.Path, want[i])
		}
		if r.Skipped != "" && r.Path == Socat {
			t.Logf("%s skipped: %s", r.Path, r.Skipped)
			continue
		}
		if !r.OK() {
			t.Errorf("%s: %s%s", r.Path, r.Skipped, r.Err)
			continue
		}
		checkQEMUBytes(t, r, ram, disk)
		if r.CPUSeconds <= 0 || (r.Path != Direct && r.RelayCPUSeconds <= 0) {
			t.Errorf("%s: CPU %v s, relay %v s: want them measured", r.Path, r.CPUSeconds, r.RelayCPUSeconds)
		}
		t.Logf("%s: %.0f MB/s, %.2f CPU s/GB (relay %.2f)", r.Path, r.MBps, r.CPUPerGB, r.RelayCPUPerGB)
	}
	rep := NewQEMUReport(ram, results)
	rep.Disk = disk
	if rep.Mode != ModeQEMU || len(rep.Targets) != 1 {
		t.Fatalf("report mode %q, targets %+v", rep.Mode, rep.Targets)
	}
	var table bytes.Buffer
	if err := WriteTable(&table, rep); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(table.String(), "of guest RAM and a 16MiB disk (--copy-storage all) migrated by QEMU") ||
		!strings.Contains(table.String(), "qemu tls/1 vs socat") {
		t.Errorf("table:\n%s", table.String())
	}
}

// checkQEMUBytes checks the bytes a migration of ram and disk reported:
// QEMU sends every page once plus headers, and a paused guest dirties
// nothing, so not much more; the mirror copies the disk once.
func checkQEMUBytes(t *testing.T, r Result, ram, disk int64) {
	t.Helper()
	if r.DiskBytes != disk {
		t.Errorf("%s: the mirror copied %d bytes of a %d-byte disk", r.Path, r.DiskBytes, disk)
	}
	if sent := r.Bytes - r.DiskBytes; sent < ram || sent > 2*ram {
		t.Errorf("%s: QEMU sent %d bytes for %d of RAM", r.Path, sent, ram)
	}
}

// TestQEMUAcrossLossyLink migrates a real guest (64 MiB RAM, a 16 MiB disk)
// through two migtun processes across the emulated "lossy" link (40 ms
// round trip, 1% loss each way, 200 Mbit/s): with one channel, and with
// multifd 2 and every stream striped over three TLS connections (serve
// --stripes 3). RAM and disk must arrive byte-identical.
func TestQEMUAcrossLossyLink(t *testing.T) {
	why := ""
	if _, err := vmtest.QEMUBinary(); err != nil {
		why = err.Error()
	} else if os.Geteuid() != 0 {
		why = "the link emulator needs root"
	}
	if why != "" {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s (required when CI=true)", why)
		}
		t.Skip(why)
	}
	lc := linkemu.Profiles["lossy"]
	lc.Seed = 11
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	l, err := linkemu.Start(ctx, lc)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	const ram, disk = 64 << 20, 16 << 20
	for _, run := range []struct {
		streams int
		serve   []string
	}{{1, nil}, {2, []string{"--stripes=3"}}} {
		cfg := Config{Migtun: migtunBin, Transports: []string{"tls"}, Streams: []int{run.streams}, Size: ram, Disk: disk,
			Stall: 30 * time.Second, Link: l, ServeArgs: run.serve}
		results, err := RunQEMU(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		if len(results) != 1 {
			t.Fatalf("%d results, want one: %+v", len(results), results)
		}
		r := results[0]
		if !r.OK() {
			t.Errorf("%s %v: %s%s", r.Path, run.serve, r.Skipped, r.Err)
			continue
		}
		checkQEMUBytes(t, r, ram, disk)
		t.Logf("%s %v: %.1f MB/s across the link", r.Path, run.serve, r.MBps)
	}
	if a, b := l.Stats(); a.Lost == 0 || b.Lost == 0 {
		t.Errorf("the link lost nothing: %+v %+v", a, b)
	}
}

// TestBenchQEMUCommand runs "migtun bench --qemu" through the CLI with a
// small compressible guest, no disk and multifd 2 compressed by zstd, so
// the flags keep working (RunQEMU compares the RAM).
func TestBenchQEMUCommand(t *testing.T) {
	if _, err := vmtest.QEMUBinary(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%v (required when CI=true)", err)
		}
		t.Skipf("%v; skipping", err)
	}
	out, err := exec.Command(migtunBin, "bench", "--qemu", "--transport", "tls", "--streams", "2", "--baselines", "direct",
		"--size", "32MiB", "--disk", "0", "--guest", "compressible", "--multifd-compression", "zstd").CombinedOutput()
	if err != nil {
		t.Fatalf("migtun bench --qemu: %v\n%s", err, out)
	}
	for _, want := range []string{"32MiB of guest RAM migrated by QEMU through each path; a compressible guest; multifd-compression zstd", "migtun/tls/2", "direct"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}
