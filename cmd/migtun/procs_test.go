package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/migtun/migtun/internal/sidecar"
)

// migtunBin is the binary the end-to-end tests drive, built by TestMain.
var migtunBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "migtun-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	migtunBin = filepath.Join(dir, "migtun")
	args := []string{"build", "-o", migtunBin}
	if raceEnabled {
		args = append(args, "-race")
	}
	build := exec.Command("go", append(args, ".")...)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building migtun:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// migtun runs a short migtun command and returns its combined output.
func migtun(t *testing.T, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, migtunBin, args...).CombinedOutput()
	return string(out), err
}

// pki creates a CA and certificates for the named hosts (valid for
// 127.0.0.1) with the CLI, and returns the directory.
func pki(t *testing.T, hosts ...string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "pki")
	if out, err := migtun(t, "certs", "init", "--dir", dir); err != nil {
		t.Fatalf("certs init: %v\n%s", err, out)
	}
	for _, h := range hosts {
		if out, err := migtun(t, "certs", "issue", "--dir", dir, "--name", h, "--san", "127.0.0.1"); err != nil {
			t.Fatalf("certs issue: %v\n%s", err, out)
		}
	}
	return dir
}

// startServe starts "migtun serve" with host's certificate and extra args,
// waits for its ready line, and stops it when the test ends (printing its
// log if the test failed). wrap, if set, prefixes the command (for strace).
func startServe(t *testing.T, pkiDir, host string, wrap []string, args ...string) *sidecar.Proc {
	t.Helper()
	return startServeAt(t, pkiDir, host, "127.0.0.1:0", wrap, args...)
}

// startServeAt is startServe with the tunnel port at listen.
func startServeAt(t *testing.T, pkiDir, host, listen string, wrap []string, args ...string) *sidecar.Proc {
	t.Helper()
	full := append([]string{"serve", "--listen", listen,
		"--cert", filepath.Join(pkiDir, host+".crt"), "--key", filepath.Join(pkiDir, host+".key"),
		"--ca", filepath.Join(pkiDir, "ca.crt"), "--log-level", "debug"}, args...)
	p, err := sidecar.Start(migtunBin, wrap, filepath.Join(t.TempDir(), host+".log"), full...)
	if err != nil {
		t.Fatalf("%s: %v", host, err)
	}
	t.Cleanup(func() {
		stopServe(t, p)
		if t.Failed() {
			t.Logf("%s log:\n%s", host, p.Log(60))
		}
	})
	return p
}

// stopServe sends SIGTERM and expects a clean exit.
func stopServe(t *testing.T, p *sidecar.Proc) {
	t.Helper()
	if err := p.Stop(40 * time.Second); err != nil {
		t.Errorf("migtun serve after SIGTERM: %v", err)
	}
}

// requireTool finds a program the end-to-end tests need: under CI=true a
// missing one fails the test, elsewhere it skips with a message.
func requireTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s is not installed; CI must install it (make deps)", name)
	}
	t.Skipf("%s is not installed; run 'make deps' to install it", name)
	return ""
}

// cannot ends a test that cannot run on this machine (no root, no network
// namespaces, no nftables): under CI=true it fails, elsewhere it skips
// with the reason.
func cannot(t *testing.T, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf(format+" (required when CI=true)", args...)
	}
	t.Skipf(format, args...)
}

// requireRootFor ends the test through cannot unless it runs as root.
func requireRootFor(t *testing.T, what string) {
	t.Helper()
	if os.Geteuid() != 0 {
		cannot(t, "needs root for %s", what)
	}
}
