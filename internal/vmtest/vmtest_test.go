package vmtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/migtun/migtun/qmp"
)

const (
	testRAM  = 64 << 20
	testDisk = 32 << 20
)

// requireQEMU skips the test when QEMU is missing, or fails it under CI=true.
func requireQEMU(t *testing.T) {
	t.Helper()
	if _, err := QEMUBinary(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%v (required when CI=true)", err)
		}
		t.Skipf("%v; skipping", err)
	}
}

// shortDir returns a short temporary directory (UNIX socket paths are
// limited to 108 bytes), removed when the test ends.
func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "vmt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// startVM starts a VM closed when the test ends (registered after the
// directory cleanup, so it runs first).
func startVM(t *testing.T, o Options) *VM {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	v, err := Start(ctx, o)
	if err != nil {
		t.Fatalf("Start %s: %v", o.Name, err)
	}
	t.Cleanup(func() {
		if err := v.Close(); err != nil {
			t.Errorf("Close %s: %v", o.Name, err)
		}
		if v.Alive() {
			t.Errorf("%s still running after Close", o.Name)
		}
	})
	return v
}

// shmFiles lists this process's RAM files in /dev/shm.
func shmFiles(t *testing.T) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(ramDir, fmt.Sprintf("migtun-vmtest-%d-*", os.Getpid())))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestStartKeepsContent checks that QEMU's prealloc keeps a prefilled RAM
// file's content, that the RAM file leaves /dev/shm, and that Close stops
// QEMU.
func TestStartKeepsContent(t *testing.T) {
	requireQEMU(t)
	dir := shortDir(t)
	const seed = 42
	v := startVM(t, Options{Dir: dir, Name: "src", RAM: testRAM, Disk: testDisk, Random: true, Seed: seed})

	if st, err := v.QMP.Status(t.Context()); err != nil || st != "prelaunch" {
		t.Fatalf("status = %q, %v; want prelaunch", st, err)
	}
	if left := shmFiles(t); len(left) != 0 {
		t.Errorf("RAM file still linked in /dev/shm: %v", left)
	}

	// Regenerate the expected content from the seed.
	for _, c := range []struct {
		path string
		size int64
		seed uint64
	}{{v.RAMPath, testRAM, seed}, {v.DiskPath, testDisk, seed + 1}} {
		want := filepath.Join(dir, "want")
		f, err := os.Create(want)
		if err != nil {
			t.Fatal(err)
		}
		if err := FillRandom(t.Context(), f, c.size, c.seed); err != nil {
			t.Fatal(err)
		}
		f.Close()
		if err := compareFiles(want, c.path); err != nil {
			t.Errorf("%s changed by QEMU: %v", c.path, err)
		}
	}

	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	if v.Alive() {
		t.Fatal("QEMU still running after Close")
	}
	if err := v.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestStartFailsCleanly(t *testing.T) {
	requireQEMU(t)
	dir := shortDir(t)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	_, err := Start(ctx, Options{Dir: dir, RAM: testRAM, Disk: testDisk, Accel: "no-such-accel"})
	if err == nil || !strings.Contains(err.Error(), "QEMU exited") {
		t.Fatalf("Start with a bad accelerator = %v, want QEMU exited", err)
	}
	if left := shmFiles(t); len(left) != 0 {
		t.Errorf("RAM files left behind: %v", left)
	}
}

// TestMigrateDirect migrates QEMU to QEMU without migtun, on each QEMU
// generation, and checks the images are equal.
func TestMigrateDirect(t *testing.T) {
	Each(t, testMigrateDirect)
}

func testMigrateDirect(t *testing.T, q QEMU) {
	for _, multifd := range []int{0, 4} {
		t.Run(fmt.Sprintf("multifd=%d", multifd), func(t *testing.T) {
			dir := shortDir(t)
			src := startVM(t, Options{Dir: dir, Name: "src", RAM: testRAM, Disk: testDisk, Random: true, QEMU: q})
			dst := startVM(t, Options{Dir: dir, Name: "dst", RAM: testRAM, Disk: testDisk, Incoming: true, QEMU: q})
			if got := src.QMP.Version().String(); !strings.HasPrefix(got, q.Name+".") {
				t.Fatalf("QMP reports QEMU %s, want %s", got, q.Name)
			}
			if err := CompareImages(src, dst); !errors.Is(err, ErrMismatch) {
				t.Fatalf("images equal before migrating: %v", err)
			}

			in := "unix:" + filepath.Join(dir, "in.sock")
			nbd := filepath.Join(dir, "nbd.sock")
			stages := map[string]int{}
			ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
			defer cancel()
			res, err := Migrate(ctx, src, dst, MigrateOptions{
				MainURI: in, IncomingURI: in, NBDServerPath: nbd, NBDClientPath: nbd,
				Multifd: multifd,
				Progress: func(stage string, _ *qmp.MigrationInfo, _ *qmp.BlockJob) {
					stages[stage]++
				},
			})
			if err != nil {
				t.Fatalf("Migrate: %v\nsource log: %s\ndestination log: %s", err, src.logTail(), dst.logTail())
			}
			t.Logf("multifd=%d: mirror %v (%d bytes), migration %v (%d RAM bytes, downtime %d ms), stages %v",
				multifd, res.Mirror, res.DiskBytes, res.Migration, res.RAMBytes, res.Info.Downtime, stages)
			if res.RAMBytes < testRAM || res.DiskBytes != testDisk {
				t.Errorf("transferred %d RAM / %d disk bytes, want >= %d / %d", res.RAMBytes, res.DiskBytes, testRAM, testDisk)
			}
			if multifd > 0 && (res.Info.RAM == nil || res.Info.RAM.MultifdBytes == 0) {
				t.Errorf("multifd enabled but no multifd bytes: %+v", res.Info.RAM)
			}
			for _, v := range []*VM{src, dst} {
				st, err := v.QMP.Status(ctx)
				if err != nil {
					t.Fatal(err)
				}
				t.Logf("%s status after migration: %s", v.Options.Name, st)
			}
			if err := CompareImages(src, dst); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestMigrateFailure checks that a failed migration reports QEMU's reason
// and undoes the mirror and the NBD export.
func TestMigrateFailure(t *testing.T) {
	requireQEMU(t)
	dir := shortDir(t)
	src := startVM(t, Options{Dir: dir, Name: "src", RAM: testRAM, Disk: testDisk, Random: true})
	dst := startVM(t, Options{Dir: dir, Name: "dst", RAM: testRAM, Disk: testDisk, Incoming: true})
	nbd := filepath.Join(dir, "nbd.sock")
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	_, err := Migrate(ctx, src, dst, MigrateOptions{
		MainURI:       "unix:" + filepath.Join(dir, "nobody-listens.sock"),
		IncomingURI:   "unix:" + filepath.Join(dir, "in.sock"),
		NBDServerPath: nbd, NBDClientPath: nbd,
	})
	if err == nil {
		t.Fatal("Migrate to a socket nobody listens on succeeded")
	}
	t.Logf("Migrate: %v", err)
	jobs, err := src.QMP.QueryBlockJobs(ctx)
	if err != nil || len(jobs) != 0 {
		t.Errorf("block jobs after failed Migrate: %+v, %v", jobs, err)
	}
	// The export is gone, so a new NBD server can start.
	if err := dst.QMP.NBDServerStartUnix(ctx, nbd+"2"); err != nil {
		t.Errorf("NBD server still running after failed Migrate: %v", err)
	}
	if st, err := src.QMP.Status(ctx); err != nil || st != "prelaunch" {
		t.Errorf("source status = %q, %v; want prelaunch", st, err)
	}
}

func TestSelected(t *testing.T) {
	for _, tc := range []struct {
		env  string
		want []string
		err  bool
	}{
		{"", KnownGenerations, false},
		{"all", KnownGenerations, false},
		{"10.0", []string{"10.0"}, false},
		{"10.0, 7.2,10.0", []string{"7.2", "10.0"}, false},
		{"8.2", nil, true},
	} {
		t.Setenv(SelectEnv, tc.env)
		got, err := Selected()
		if (err != nil) != tc.err || fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("%s=%q: %v, %v; want %v (error %v)", SelectEnv, tc.env, got, err, tc.want, tc.err)
		}
	}
}

func TestGenerationOf(t *testing.T) {
	for v, want := range map[string]string{
		"7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)":      "7.2",
		"10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)": "10.0",
	} {
		if got := generationOf(v); got != want {
			t.Errorf("generationOf(%q) = %q, want %q", v, got, want)
		}
	}
}

// TestFindGenerationMissing names where to get a generation that is not
// installed.
func TestFindGenerationMissing(t *testing.T) {
	t.Setenv("MIGTUN_QEMU_NEXT", t.TempDir())
	_, err := FindGeneration("10.0")
	if !errors.Is(err, ErrNoQEMU) || !strings.Contains(err.Error(), "qemu-next.sh") {
		t.Fatalf("FindGeneration with an empty prefix: %v", err)
	}
}
