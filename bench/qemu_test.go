package bench

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/migtun/migtun/internal/vmtest"
)

// TestRunQEMU migrates a real 64 MiB guest through the direct path, socat
// and migtun (tls single channel, plain with multifd 2): each migration
// must complete with the guest RAM identical on both sides (RunQEMU
// compares it), and report the RAM sent, time and CPU.
func TestRunQEMU(t *testing.T) {
	if _, err := vmtest.QEMUBinary(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%v (required when CI=true)", err)
		}
		t.Skipf("%v; skipping", err)
	}
	const ram = 64 << 20
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cfg := Config{Migtun: migtunBin, Transports: []string{"tls", "plain"}, Streams: []int{1, 2},
		Baselines: []string{Direct, Socat}, Size: ram, Stall: 20 * time.Second}
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
		// QEMU sends every page once plus headers; a paused guest dirties
		// nothing, so not much more.
		if r.Bytes < ram || r.Bytes > 2*ram {
			t.Errorf("%s: QEMU sent %d bytes for %d of RAM", r.Path, r.Bytes, ram)
		}
		if r.CPUSeconds <= 0 || (r.Path != Direct && r.RelayCPUSeconds <= 0) {
			t.Errorf("%s: CPU %v s, relay %v s: want them measured", r.Path, r.CPUSeconds, r.RelayCPUSeconds)
		}
		t.Logf("%s: %.0f MB/s, %.2f CPU s/GB (relay %.2f)", r.Path, r.MBps, r.CPUPerGB, r.RelayCPUPerGB)
	}
	rep := NewQEMUReport(ram, results)
	if rep.Mode != ModeQEMU || len(rep.Targets) != 1 {
		t.Fatalf("report mode %q, targets %+v", rep.Mode, rep.Targets)
	}
	var table bytes.Buffer
	if err := WriteTable(&table, rep); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(table.String(), "of guest RAM migrated by QEMU") || !strings.Contains(table.String(), "qemu tls/1 vs socat") {
		t.Errorf("table:\n%s", table.String())
	}
}

// TestBenchQEMUCommand runs "migtun bench --qemu" through the CLI with a
// small guest, so the flag keeps working.
func TestBenchQEMUCommand(t *testing.T) {
	if _, err := vmtest.QEMUBinary(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%v (required when CI=true)", err)
		}
		t.Skipf("%v; skipping", err)
	}
	out, err := exec.Command(migtunBin, "bench", "--qemu", "--transport", "tls", "--streams", "1", "--baselines", "direct",
		"--size", "32MiB").CombinedOutput()
	if err != nil {
		t.Fatalf("migtun bench --qemu: %v\n%s", err, out)
	}
	for _, want := range []string{"32MiB of guest RAM migrated by QEMU", "migtun/tls/1", "direct"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}
