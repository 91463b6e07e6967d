package qmp

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/digitalocean/go-qemu/qemu"
	goqmp "github.com/digitalocean/go-qemu/qmp"
	"github.com/digitalocean/go-qemu/qmp/raw"

	"github.com/migtun/migtun/internal/leaktest"
)

// requireQEMU returns the QEMU binary, skipping the test when it is missing
// (failing it under CI=true).
func requireQEMU(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("qemu-system-x86_64 not found (required when CI=true): %v", err)
		}
		t.Skipf("qemu-system-x86_64 not on PATH: %v", err)
	}
	return bin
}

// startQEMU starts QEMU with no machine and a QMP socket and returns a
// connected client and a channel receiving QEMU's exit; the test's cleanup
// kills QEMU if it is still running.
func startQEMU(ctx context.Context, t *testing.T) (*Client, chan error) {
	t.Helper()
	bin := requireQEMU(t)
	sock := filepath.Join(socketDir(t), "qmp.sock")
	cmd := exec.Command(bin, "-machine", "none", "-nodefaults", "-display", "none",
		"-qmp", "unix:"+sock+",server=on,wait=off")
	var stderr limitedBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	c, err := Dial(ctx, sock) // QEMU may not have created the socket yet
	if err != nil {
		t.Fatalf("Dial: %v; stderr: %s", err, stderr.String())
	}
	t.Cleanup(func() { c.Close() })
	return c, exited
}

func TestRealQEMU(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	c, exited := startQEMU(ctx, t)
	if c.Version().Major < 7 {
		t.Logf("QEMU %s is older than the 7.2 reference", c.Version())
	}

	st, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st != "prelaunch" && st != "running" && st != "paused" {
		t.Errorf("status = %q", st)
	}
	caps, err := c.QueryMigrateCapabilities(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := caps["multifd"]; !ok {
		t.Errorf("no multifd capability in %v", caps)
	}

	var qe *Error
	if err := c.Execute(ctx, "no-such-command", nil, nil); !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Errorf("unknown command = %v, want CommandNotFound", err)
	}
	if err := c.Quit(ctx); err != nil {
		t.Fatalf("Quit: %v", err)
	}
	select {
	case err := <-exited:
		exited <- err // for the cleanup
	case <-ctx.Done():
		t.Fatal("QEMU did not exit after quit")
	}
}

// TestRealQEMUGoQEMU drives QEMU through go-qemu's generated raw API and its
// qemu.Domain, running over this package's Client.
func TestRealQEMUGoQEMU(t *testing.T) {
	leaktest.Check(t)
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	c, _ := startQEMU(ctx, t)

	rm := raw.NewMonitor(c)
	st, err := rm.QueryStatus()
	if err != nil {
		t.Fatalf("QueryStatus: %v", err)
	}
	if st.Status != raw.RunStateRunning && st.Status != raw.RunStatePrelaunch {
		t.Errorf("QueryStatus = %+v", st)
	}
	v, err := rm.QueryVersion()
	if err != nil {
		t.Fatalf("QueryVersion: %v", err)
	}
	if got := (Version{Major: int(v.Qemu.Major), Minor: int(v.Qemu.Minor), Micro: int(v.Qemu.Micro), Package: v.Package}); got != c.Version() {
		t.Errorf("QueryVersion = %+v, greeting said %+v", v, c.Version())
	}

	// A QMP error keeps its class through go-qemu.
	var qe *Error
	if _, err := c.Run([]byte(`{"execute": "no-such-command"}`)); !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Errorf("Run(no-such-command) = %v, want CommandNotFound", err)
	}

	// A reply longer than bufio.Scanner's 64 KiB limit comes through.
	schema, err := c.Run([]byte(`{"execute": "query-qmp-schema"}`))
	if err != nil {
		t.Fatalf("query-qmp-schema: %v", err)
	}
	if len(schema) <= 64<<10 {
		t.Errorf("query-qmp-schema reply is only %d bytes", len(schema))
	}

	// stop and cont, sent through go-qemu, come back as go-qemu events.
	evs, err := c.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := rm.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if err := rm.Cont(); err != nil {
		t.Fatalf("Cont: %v", err)
	}
	var got []goqmp.Event
	for len(got) < 2 {
		select {
		case e, ok := <-evs:
			if !ok {
				t.Fatalf("events closed after %+v", got)
			}
			if e.Event == "STOP" || e.Event == "RESUME" {
				got = append(got, e)
			}
		case <-ctx.Done():
			t.Fatalf("events so far %+v: %v", got, ctx.Err())
		}
	}
	if got[0].Event != "STOP" || got[1].Event != "RESUME" || got[0].Timestamp.Seconds == 0 {
		t.Errorf("events = %+v, want STOP then RESUME", got)
	}

	// go-qemu's Domain works over the client too; closing it disconnects
	// the client, which closes the event channel.
	d, err := qemu.NewDomain(c, "test")
	if err != nil {
		t.Fatal(err)
	}
	if s, err := d.Status(); err != nil || s != qemu.StatusRunning {
		t.Errorf("Domain.Status = %v, %v", s, err)
	}
	if devs, err := d.BlockDevices(); err != nil || len(devs) != 0 { // -nodefaults: no drives
		t.Errorf("Domain.BlockDevices = %+v, %v", devs, err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	for range evs {
	}
	if err := c.Connect(); !errors.Is(err, ErrClosed) {
		t.Errorf("Connect after Domain.Close = %v, want ErrClosed", err)
	}
}
