package image

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/migtun/migtun/deploy/internal/testbin"
)

// cannotRun names podman failures that say this machine cannot run
// containers at all (not that the image is wrong). crun fails so inside a
// container that may not raise RLIMIT_NOFILE, as on the development
// machines.
var cannotRun = []string{
	"setrlimit `RLIMIT_NOFILE`: Operation not permitted",
	"setrlimit RLIMIT_NOFILE: Operation not permitted",
}

// TestImagePodman loads the OCI archive into podman and runs the image:
// `migtun version`, then `migtun serve` answering /healthz on its control
// socket. Where podman cannot run containers the running part is skipped,
// saying why; loading the image is still checked.
func TestImagePodman(t *testing.T) {
	podman := testbin.NeedTool(t, "podman")
	b := build(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	ref := "localhost/" + RefName(testVersion)
	if out, err := exec.CommandContext(ctx, podman, "load", "-i", b.archive).CombinedOutput(); err != nil {
		t.Fatalf("podman load: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command(podman, "rmi", "-f", ref).Run() })
	out, err := exec.CommandContext(ctx, podman, "image", "inspect", "--format", "{{.Config.User}} {{json .Config.Entrypoint}}", ref).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != User+` ["`+BinaryPath+`"]` {
		t.Errorf("podman image inspect: %v: %q", err, out)
	}

	out, err = exec.CommandContext(ctx, podman, "run", "--rm", "--network=host", ref, "version").CombinedOutput()
	if err != nil {
		for _, s := range cannotRun {
			if strings.Contains(string(out), s) {
				t.Skipf("podman cannot run containers on this machine (%q); the image was loaded and inspected but not run here (TestImageRuns runs its binary outside a container)", strings.TrimSpace(string(out)))
			}
		}
		t.Fatalf("podman run %s version: %v\n%s", ref, err, out)
	}
	if !strings.Contains(string(out), testVersion) {
		t.Errorf("podman run %s version: %q, want %s", ref, out, testVersion)
	}

	bin := testbin.Migtun(t)
	pki := makePKI(t, bin)
	sockets := t.TempDir()
	// migtun wants its socket directory its own and 0700.
	if err := os.Chown(sockets, UID, GID); err != nil {
		t.Fatalf("giving the socket directory to the image's user: %v", err)
	}
	args := append([]string{"run", "--rm", "--network=host", "--stop-signal=SIGTERM",
		"-v", pki + ":/pki:ro", "-v", sockets + ":/run/migtun", ref},
		serveArgs("/pki", "/run/migtun")...)
	stop := serve(t, exec.CommandContext(ctx, podman, args...))
	checkHealthz(t, filepath.Join(sockets, "control.sock"))
	stop()
}
