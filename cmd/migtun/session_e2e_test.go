package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/internal/sidecar"
	"github.com/migtun/migtun/internal/vmtest"
	"github.com/migtun/migtun/qmp"
)

// sessionRig is two migtun processes driven only through the CLI and their
// control sockets: the destination routes main, nbd and libvirt to local
// sockets in dir.
type sessionRig struct {
	dir                  string
	src, dst             *sidecar.Proc
	srcCtl, dstCtl       string
	dstIn, dstNBD, dstLV string
	socketDir            string
}

func newSessionRig(t *testing.T, transport string) *sessionRig {
	r := &sessionRig{dir: shortTempDir(t)}
	ca := pki(t, "src", "dst")
	r.dstIn, r.dstNBD, r.dstLV = filepath.Join(r.dir, "in.sock"), filepath.Join(r.dir, "nbd.sock"), filepath.Join(r.dir, "lv.sock")
	r.srcCtl, r.dstCtl = "unix:"+filepath.Join(r.dir, "src.ctl"), "unix:"+filepath.Join(r.dir, "dst.ctl")
	r.socketDir = filepath.Join(r.dir, "s")
	var extra []string
	if transport == "plain" {
		extra = []string{"--insecure-plaintext"}
	}
	r.dst = startServe(t, ca, "dst", nil, append([]string{"--transport", transport, "--control", r.dstCtl,
		"--route", "main=unix:" + r.dstIn, "--route", "nbd=unix:" + r.dstNBD, "--route", "libvirt=unix:" + r.dstLV}, extra...)...)
	r.src = startServe(t, ca, "src", nil, append([]string{"--transport", transport, "--control", r.srcCtl,
		"--socket-dir", r.socketDir}, extra...)...)
	return r
}

// prepare runs "migtun session prepare" and returns the session.
func (r *sessionRig) prepare(t *testing.T, channels ...string) control.SessionInfo {
	t.Helper()
	args := []string{"session", "prepare", "--control", r.srcCtl, "--peer", r.dst.Addr}
	for _, c := range channels {
		args = append(args, "--channel", c)
	}
	out, err := migtun(t, args...)
	if err != nil {
		t.Fatalf("session prepare: %v\n%s", err, out)
	}
	var info control.SessionInfo
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("session prepare printed %q: %v", out, err)
	}
	return info
}

func uriOf(t *testing.T, info control.SessionInfo, channel string) string {
	for _, c := range info.Channels {
		if c.Name == channel {
			return c.URI
		}
	}
	t.Fatalf("session has no channel %q: %+v", channel, info.Channels)
	return ""
}

// checkClean fails the test if a session is still open on either host or a
// session socket is left.
func (r *sessionRig) checkClean(t *testing.T) {
	t.Helper()
	checkHostsClean(t, []string{r.srcCtl, r.dstCtl}, r.socketDir)
}

// checkHostsClean fails the test if a session is still open at any of the
// control endpoints or a file is left in any of the socket directories.
func checkHostsClean(t *testing.T, controls []string, socketDirs ...string) {
	t.Helper()
	for _, ctl := range controls {
		out, err := migtun(t, "session", "list", "--control", ctl)
		if err != nil {
			t.Fatalf("session list: %v\n%s", err, out)
		}
		var list []control.SessionInfo
		json.Unmarshal([]byte(out), &list)
		for _, s := range list {
			if s.State == control.StatePrepared || s.State == control.StateActive || s.State == control.StateFinishing {
				t.Errorf("%s: session %s still %s", ctl, s.ID, s.State)
			}
		}
	}
	for _, d := range socketDirs {
		if left, _ := os.ReadDir(d); len(left) > 0 {
			t.Errorf("%d session sockets left in %s: %s", len(left), d, left[0].Name())
		}
	}
}

// TestSessionMigration migrates a VM with storage through a session made
// with "migtun session prepare", finishes it, and checks both hosts saw
// the same streams and bytes. Alongside, the libvirt channel carries a
// request/response exchange with a half close in each direction.
//
// It runs on each QEMU generation, with small guests: TestMigration moves
// the full-size ones.
func TestSessionMigration(t *testing.T) {
	vmtest.Each(t, testSessionMigration)
}

func testSessionMigration(t *testing.T, q vmtest.QEMU) {
	ram, disk := int64(128<<20), int64(32<<20)
	for _, tc := range []struct {
		name      string
		transport string
		multifd   int
	}{{"tls/single", "tls", 0}, {"tls/multifd4", "tls", 4}, {"quic/multifd4", "quic", 4}} {
		t.Run(tc.name, func(t *testing.T) {
			r := newSessionRig(t, tc.transport)
			lvDone := serveLibvirtStandIn(t, r.dstLV)
			info := r.prepare(t, "libvirt", "main", "nbd")
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			src, dst := startVMs(ctx, t, q, r.dir, ram, disk)

			lvErr := make(chan error, 1)
			go func() { lvErr <- libvirtExchange(uriOf(t, info, "libvirt")) }()
			nbdPath := strings.TrimPrefix(uriOf(t, info, "nbd"), "unix:")
			if _, err := vmtest.Migrate(ctx, src, dst, vmtest.MigrateOptions{
				MainURI: uriOf(t, info, "main"), IncomingURI: "unix:" + r.dstIn,
				NBDServerPath: r.dstNBD, NBDClientPath: nbdPath, Multifd: tc.multifd,
				BeforeNBDStop: func(ctx context.Context) error { return r.waitChannelIdle(ctx, t, info.ID, "nbd") },
			}); err != nil {
				t.Fatal(err)
			}
			if err := <-lvErr; err != nil {
				t.Fatalf("libvirt channel: %v", err)
			}
			if err := <-lvDone; err != nil {
				t.Fatalf("libvirt stand-in: %v", err)
			}
			if err := vmtest.CompareImages(src, dst); err != nil {
				t.Fatal(err)
			}
			rep := finishSession(t, r.srcCtl, info.ID)
			for _, c := range rep.Session.Channels {
				want := int64(1)
				if c.Name == "main" {
					want = int64(1 + tc.multifd)
				}
				if c.Streams != want {
					t.Errorf("channel %s: %d streams, want %d", c.Name, c.Streams, want)
				}
				if c.Name == "main" && c.BytesForward < ram/2 {
					t.Errorf("channel main carried only %d bytes", c.BytesForward)
				}
			}
			for _, c := range rep.Session.Channels {
				t.Logf("finish: channel %-7s %d streams, %d bytes forward, %d back; the peer agrees", c.Name, c.Streams, c.BytesForward, c.BytesReturn)
			}
			r.checkClean(t)
		})
	}
}

// waitChannelIdle waits until a session channel has no stream open on the
// source: its connections have ended in both directions.
func (r *sessionRig) waitChannelIdle(ctx context.Context, t *testing.T, id, channel string) error {
	for {
		out, err := migtun(t, "session", "show", "--control", r.srcCtl, id)
		if err != nil {
			return errors.New(out)
		}
		var info control.SessionInfo
		if err := json.Unmarshal([]byte(out), &info); err != nil {
			return err
		}
		for _, c := range info.Channels {
			if c.Name == channel && c.ActiveStreams == 0 {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// finishSession runs "migtun session finish" and requires both hosts to
// agree.
func finishSession(t *testing.T, ctl, id string) control.FinishReport {
	t.Helper()
	out, err := migtun(t, "session", "finish", "--control", ctl, id)
	if err != nil {
		t.Fatalf("session finish: %v\n%s", err, out)
	}
	var rep control.FinishReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	if len(rep.Mismatch) != 0 || rep.Session.State != control.StateFinished {
		t.Fatalf("finish report: state %s, mismatches %q\n%s", rep.Session.State, rep.Mismatch, out)
	}
	return rep
}

// startVMs starts a random source VM and an empty destination VM of QEMU
// generation q, closed when the test ends.
func startVMs(ctx context.Context, t *testing.T, q vmtest.QEMU, dir string, ram, disk int64) (src, dst *vmtest.VM) {
	t.Helper()
	src, err := vmtest.Start(ctx, vmtest.Options{Dir: dir, Name: "src", RAM: ram, Disk: disk, Random: true, QEMU: q})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	dst, err = vmtest.Start(ctx, vmtest.Options{Dir: dir, Name: "dst", RAM: ram, Disk: disk, Incoming: true, QEMU: q})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dst.Close() })
	return src, dst
}

const (
	lvRequest  = "REQUEST: migrate domain web1, then tell me how it went"
	lvResponse = "RESPONSE: done"
)

// serveLibvirtStandIn answers one connection on path the way a daemon that
// reads a whole request before answering would: read to EOF (the client's
// half close), answer, half-close its side, and check the client then
// closes too.
func serveLibvirtStandIn(t *testing.T, path string) <-chan error {
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		defer ln.Close()
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		req, err := io.ReadAll(c)
		if err != nil || string(req) != lvRequest {
			done <- errors.Join(errors.New("request not received whole: "+string(req)), err)
			return
		}
		if _, err := io.WriteString(c, lvResponse); err != nil {
			done <- err
			return
		}
		done <- c.(*net.UnixConn).CloseWrite()
	}()
	t.Cleanup(func() { ln.Close() })
	return done
}

// libvirtExchange sends the request through uri, half-closes, and reads
// the response to its end.
func libvirtExchange(uri string) error {
	c, err := net.Dial("unix", strings.TrimPrefix(uri, "unix:"))
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Minute))
	if _, err := io.WriteString(c, lvRequest); err != nil {
		return err
	}
	if err := c.(*net.UnixConn).CloseWrite(); err != nil {
		return err
	}
	resp, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if string(resp) != lvResponse {
		return errors.New("response not received whole: " + string(resp))
	}
	return nil
}

// TestSessionAbortMidMigration aborts a session while a running guest is
// migrating: the source QEMU must see the failure, keep the guest running,
// and both hosts must be left clean.
func TestSessionAbortMidMigration(t *testing.T) {
	q := vmtest.One(t)
	t.Parallel() // it mostly waits
	r := newSessionRig(t, "tls")
	info := r.prepare(t, "main")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	src, dst := startVMs(ctx, t, q, r.dir, 256<<20, 16<<20)
	if err := src.QMP.Cont(ctx); err != nil {
		t.Fatal(err)
	}
	if err := dst.QMP.MigrateIncoming(ctx, "unix:"+r.dstIn); err != nil {
		t.Fatal(err)
	}
	// Slow enough that the migration is still running when it is aborted.
	if err := src.QMP.MigrateSetParameters(ctx, map[string]any{"max-bandwidth": 32 << 20}); err != nil {
		t.Fatal(err)
	}
	if err := src.QMP.Migrate(ctx, uriOf(t, info, "main")); err != nil {
		t.Fatal(err)
	}
	for {
		mi, err := src.QMP.QueryMigrate(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if mi.RAM != nil && mi.RAM.Transferred > 16<<20 {
			break
		}
		if mi.Status != qmp.MigrationActive && mi.Status != qmp.MigrationSetup {
			t.Fatalf("migration %s before the abort: %s", mi.Status, mi.ErrorDesc)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if out, err := migtun(t, "session", "abort", "--control", r.srcCtl, "--reason", "test", info.ID); err != nil {
		t.Fatalf("session abort: %v\n%s", err, out)
	}
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	_, migErr := src.QMP.WaitMigration(wctx, 50*time.Millisecond, nil)
	if migErr == nil || errors.Is(migErr, context.DeadlineExceeded) {
		t.Fatalf("source migration after abort: %v; want it failed", migErr)
	}
	status, err := src.QMP.Status(ctx)
	if err != nil || status != "running" {
		t.Fatalf("source guest is %q (%v) after the abort, want running", status, err)
	}
	t.Logf("source migration failed as it should (%v); guest %s", migErr, status)
	r.checkClean(t)
}
