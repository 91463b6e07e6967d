package main

import (
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/internal/sidecar"
	"github.com/migtun/migtun/internal/vmtest"
	"github.com/migtun/migtun/qmp"
)

// migrateRig is two migtun processes; the destination drives the VM "vm1"
// through its QMP socket.
type migrateRig struct {
	dir            string
	src, dst       *sidecar.Proc
	srcCtl, dstCtl string
	srcSocks       string
	dstSocks       string
	srcVM, dstVM   *vmtest.VM
}

func newMigrateRig(t *testing.T, q vmtest.QEMU, ram, disk int64, serveFlags ...string) *migrateRig {
	r := &migrateRig{dir: shortTempDir(t)}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	r.srcVM, r.dstVM = startVMs(ctx, t, q, r.dir, ram, disk)
	// migtun drives both QEMUs: the test lets go of their monitors.
	r.srcVM.QMP.Close()
	r.dstVM.QMP.Close()
	ca := pki(t, "src", "dst")
	r.srcCtl, r.dstCtl = "unix:"+filepath.Join(r.dir, "src.ctl"), "unix:"+filepath.Join(r.dir, "dst.ctl")
	r.srcSocks, r.dstSocks = filepath.Join(r.dir, "ss"), filepath.Join(r.dir, "ds")
	r.dst = startServe(t, ca, "dst", nil, append([]string{"--control", r.dstCtl, "--socket-dir", r.dstSocks,
		"--qmp", "vm1=unix:" + r.dstVM.QMPPath}, serveFlags...)...)
	r.src = startServe(t, ca, "src", nil, append([]string{"--control", r.srcCtl, "--socket-dir", r.srcSocks}, serveFlags...)...)
	return r
}

// reconnect gives the test the VM's monitor back.
func reconnect(t *testing.T, vm *vmtest.VM) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, vm.QMPPath)
	if err != nil {
		t.Fatalf("reconnecting to %s: %v", vm.QMPPath, err)
	}
	vm.QMP = c
}

// checkPausedAndEqual takes the VMs' monitors back after a migration of
// paused VMs, checks neither runs, and that RAM and disk are identical.
func checkPausedAndEqual(ctx context.Context, t *testing.T, src, dst *vmtest.VM) {
	t.Helper()
	reconnect(t, src)
	reconnect(t, dst)
	for _, vm := range []*vmtest.VM{src, dst} {
		st, err := vm.QMP.Status(ctx)
		if err != nil || st == "running" {
			t.Errorf("%s: status %q (%v), want paused", vm.Options.Name, st, err)
		}
	}
	if err := vmtest.CompareImages(src, dst); err != nil {
		t.Fatal(err)
	}
}

// migrateCmd runs "migtun migrate" and returns its output.
func (r *migrateRig) migrateCmd(ctx context.Context, extra ...string) (string, error) {
	args := append([]string{"migrate", "--control", r.srcCtl, "--peer", r.dst.Addr, "--qmp", "unix:" + r.srcVM.QMPPath,
		"--dest-vm", "vm1", "--timeout", "4m"}, extra...)
	out, err := exec.CommandContext(ctx, migtunBin, args...).CombinedOutput()
	return string(out), err
}

// checkClean fails if a session is open on either host or a session
// socket is left.
func (r *migrateRig) checkClean(t *testing.T) {
	t.Helper()
	checkHostsClean(t, []string{r.srcCtl, r.dstCtl}, r.srcSocks, r.dstSocks)
}

// TestMigrateCommand moves a paused VM with a random disk and RAM with
// "migtun migrate --copy-storage all --paused", single channel, with
// multifd 4, with multifd 2 compressed by zstd (and a small mirror
// buffer), with multifd 2 and every stream striped over three connections
// (serve --stripes 3), and in postcopy, and checks both images are
// identical, on each QEMU generation. The first generation's multifd run is full size, the others
// small.
func TestMigrateCommand(t *testing.T) {
	first := true
	vmtest.Each(t, func(t *testing.T, q vmtest.QEMU) {
		testMigrateCommand(t, q, first)
		first = false
	})
}

func testMigrateCommand(t *testing.T, q vmtest.QEMU, fullSize bool) {
	for _, tc := range []struct {
		name  string
		extra []string
		serve []string
	}{
		{"single", nil, nil},
		{"multifd4", []string{"--multifd", "4", "--json"}, nil},
		{"zstd", []string{"--multifd", "2", "--multifd-compression", "zstd", "--mirror-buffer", "4MiB", "--json"}, nil},
		{"striped", []string{"--multifd", "2", "--json"}, []string{"--stripes", "3", "--metrics-listen", "127.0.0.1:0"}},
		{"postcopy", []string{"--postcopy", "--json"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ram, disk := int64(128<<20), int64(32<<20)
			if fullSize && tc.name == "multifd4" && !testing.Short() {
				ram, disk = vmtest.DefaultRAM, vmtest.DefaultDisk
			}
			r := newMigrateRig(t, q, ram, disk, tc.serve...)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			start := time.Now()
			out, err := r.migrateCmd(ctx, append([]string{"--copy-storage", "all", "--paused"}, tc.extra...)...)
			if err != nil {
				t.Fatalf("migtun migrate: %v\n%s", err, out)
			}
			t.Logf("migtun migrate took %v; its output ends:\n%s", time.Since(start).Round(time.Millisecond), migTail(out, 8))
			checkPausedAndEqual(ctx, t, r.srcVM, r.dstVM)
			if tc.name == "zstd" {
				for _, vm := range []*vmtest.VM{r.srcVM, r.dstVM} {
					p, err := vm.QMP.QueryMigrateParameters(ctx)
					if err != nil || p["multifd-compression"] != "zstd" {
						t.Errorf("%s QEMU: multifd-compression %v (%v), want zstd", vm.Options.Name, p["multifd-compression"], err)
					}
				}
			}
			if tc.name == "striped" {
				checkStriped(t, r.dst.LogPath, 3)
			}
			if tc.name == "postcopy" {
				// The switch comes after the first pass; a paused guest may
				// complete before QEMU reports it, so this is logged only.
				t.Logf("switched to postcopy: %v", strings.Contains(out, `"postcopy":true`))
			}
			if tc.extra != nil {
				if !strings.Contains(out, `"event":"result"`) {
					t.Errorf("--json printed no result line:\n%s", migTail(out, 5))
				}
			} else if !strings.Contains(out, "migrated: session") || !strings.Contains(out, "downtime") {
				t.Errorf("no summary printed:\n%s", out)
			}
			r.checkClean(t)
		})
	}
}

// checkStriped checks, through the metrics of the destination's serve
// (log at logPath), that it took each data stream over lanes connections:
// peer connections accepted are at least lanes per data stream.
func checkStriped(t *testing.T, logPath string, lanes int) {
	t.Helper()
	m := scrapeMetrics(t, logPath)
	var streams, conns float64
	for line := range strings.Lines(m) {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		v, err := strconv.ParseFloat(f[1], 64)
		switch {
		case err != nil:
		case strings.HasPrefix(f[0], "migtun_streams_total{"):
			streams += v
		case strings.HasPrefix(f[0], "migtun_peer_connections_total{") && strings.Contains(f[0], `direction="in"`):
			conns += v
		}
	}
	if streams < 3 || conns < float64(lanes)*streams {
		t.Errorf("the destination took %v data streams over %v connections; want %d connections a stream:\n%s\n%s",
			streams, conns, lanes, grepLines(m, "migtun_streams_total"), grepLines(m, "migtun_peer_connections_total"))
	}
}

// TestMigrateDestinationKilled kills the destination QEMU while a running
// source guest migrates: migtun migrate must fail naming the step, the
// source guest must keep running, and neither host may keep a session.
func TestMigrateDestinationKilled(t *testing.T) {
	t.Parallel() // it mostly waits
	vmtest.Each(t, testMigrateDestinationKilled)
}

func testMigrateDestinationKilled(t *testing.T, q vmtest.QEMU) {
	// 256 MiB at 16 MB/s take about 16 s: the kill comes after 16 MiB.
	r := newMigrateRig(t, q, 256<<20, 16<<20)
	reconnect(t, r.srcVM)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if err := r.srcVM.QMP.Cont(ctx); err != nil {
		t.Fatal(err)
	}
	r.srcVM.QMP.Close() // migtun migrate needs the monitor
	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	go func() {
		out, err := r.migrateCmd(ctx, "--copy-storage", "all", "--max-bandwidth", "16000000")
		done <- result{out, err}
	}()
	// Wait until RAM is flowing through the session, then kill the
	// destination QEMU.
	for {
		out, err := migtun(t, "session", "list", "--control", r.dstCtl)
		if err != nil {
			t.Fatal(err, out)
		}
		var list []control.SessionInfo
		json.Unmarshal([]byte(out), &list)
		flowing := false
		for _, s := range list {
			for _, c := range s.Channels {
				if c.Name == "main" && c.BytesForward > 16<<20 {
					flowing = true
				}
			}
		}
		if flowing {
			break
		}
		select {
		case res := <-done:
			t.Fatalf("migtun migrate ended before the kill: %v\n%s", res.err, res.out)
		case <-time.After(100 * time.Millisecond):
		}
	}
	// The destination QEMU dies as a crash would.
	r.dstVM.Close()
	res := <-done
	if res.err == nil {
		t.Fatalf("migtun migrate succeeded without a destination:\n%s", res.out)
	}
	if !strings.Contains(res.out, "perform") {
		t.Errorf("the error does not name the step:\n%s", migTail(res.out, 5))
	}
	t.Logf("migtun migrate failed as it should:\n%s", migTail(res.out, 3))
	reconnect(t, r.srcVM)
	st, err := r.srcVM.QMP.QueryStatus(ctx)
	if err != nil || st.Status != "running" {
		t.Fatalf("source guest %+v (%v) after the failure, want running", st, err)
	}
	jobs, err := r.srcVM.QMP.QueryBlockJobs(ctx)
	if err != nil || len(jobs) != 0 {
		t.Errorf("source block jobs left: %+v (%v)", jobs, err)
	}
	r.checkClean(t)
}

func migTail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
