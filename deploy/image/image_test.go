package image

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/migtun/migtun/deploy/internal/testbin"
)

const testVersion = "deploy-test" // what testbin.Migtun builds into migtun

func TestMain(m *testing.M) {
	code := m.Run()
	testbin.Cleanup()
	os.Exit(code)
}

// built is an image written as a layout and an archive, then read back.
type built struct {
	layoutDir, archive string
	img                v1.Image
}

func build(t *testing.T) *built {
	t.Helper()
	dir := t.TempDir()
	b := &built{layoutDir: filepath.Join(dir, "layout"), archive: filepath.Join(dir, "migtun-image.tar")}
	img, err := Build(Options{Binary: testbin.Migtun(t), Version: testVersion, Created: time.Unix(1700000000, 0)})
	if err != nil {
		t.Fatal(err)
	}
	if err := WriteLayout(img, b.layoutDir, testVersion); err != nil {
		t.Fatal(err)
	}
	if err := WriteArchive(b.layoutDir, b.archive); err != nil {
		t.Fatal(err)
	}
	b.img = readLayout(t, b.layoutDir)
	return b
}

// readLayout reads the one image of an OCI layout, checking its name.
func readLayout(t *testing.T, dir string) v1.Image {
	t.Helper()
	p, err := layout.FromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := p.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 {
		t.Fatalf("layout %s: %d manifests, want 1", dir, len(im.Manifests))
	}
	d := im.Manifests[0]
	if d.MediaType != types.OCIManifestSchema1 || d.Annotations["org.opencontainers.image.ref.name"] != RefName(testVersion) {
		t.Errorf("layout manifest %s named %q, want an OCI manifest named %s", d.MediaType, d.Annotations["org.opencontainers.image.ref.name"], RefName(testVersion))
	}
	img, err := idx.Image(d.Digest)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// TestImageConfig reads the image back from its layout and from its
// archive and checks the entrypoint, user, labels and layers.
func TestImageConfig(t *testing.T) {
	b := build(t)
	cf, err := b.img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	c := cf.Config
	if strings.Join(c.Entrypoint, " ") != BinaryPath || strings.Join(c.Cmd, " ") != "version" {
		t.Errorf("entrypoint %q cmd %q, want [%s] [version]", c.Entrypoint, c.Cmd, BinaryPath)
	}
	if c.User != "65532:65532" {
		t.Errorf("user %q, want 65532:65532 (not root)", c.User)
	}
	for k, want := range map[string]string{"org.opencontainers.image.title": "migtun", "org.opencontainers.image.version": testVersion} {
		if c.Labels[k] != want {
			t.Errorf("label %s=%q, want %q", k, c.Labels[k], want)
		}
	}
	if cf.OS != "linux" || cf.Architecture == "" || !cf.Created.Time.Equal(time.Unix(1700000000, 0)) {
		t.Errorf("os %q arch %q created %v", cf.OS, cf.Architecture, cf.Created)
	}
	m, err := b.img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if m.MediaType != types.OCIManifestSchema1 || m.Config.MediaType != types.OCIConfigJSON || len(m.Layers) != 1 || m.Layers[0].MediaType != types.OCILayer {
		t.Errorf("manifest %s, config %s, layers %+v: want OCI types and one layer", m.MediaType, m.Config.MediaType, m.Layers)
	}

	// The archive holds the same layout.
	dir := t.TempDir()
	untar(t, b.archive, dir)
	want, _ := b.img.Digest()
	if got, err := readLayout(t, dir).Digest(); err != nil || got != want {
		t.Errorf("archive's image %v (%v), layout's %v", got, err, want)
	}
}

// untar unpacks a tar file (the OCI archive) into dir.
func untar(t *testing.T, archive, dir string) {
	t.Helper()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, filepath.FromSlash(h.Name))
		if !strings.HasPrefix(path, dir+string(filepath.Separator)) {
			t.Fatalf("archive entry %q outside the layout", h.Name)
		}
		if h.Typeflag == tar.TypeDir {
			if err := os.MkdirAll(path, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestImageRuns extracts the image's file system, checks it holds only
// what it should and a static binary, and runs that binary: version, and
// serve answering /healthz.
func TestImageRuns(t *testing.T) {
	b := build(t)
	rc := mutate.Extract(b.img)
	defer rc.Close()
	root := t.TempDir()
	var names []string
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, strings.TrimSuffix(h.Name, "/"))
		if h.Name == BinaryPath[1:] {
			if h.Mode&0o111 == 0 || h.Uid != 0 {
				t.Errorf("%s: mode %o owner %d, want executable, owned by root", h.Name, h.Mode, h.Uid)
			}
			data, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(root, "migtun"), data, 0o755); err != nil {
				t.Fatal(err)
			}
		}
	}
	var want []string
	for _, e := range Contents(nil) {
		want = append(want, strings.TrimSuffix(e.Name, "/"))
	}
	if strings.Join(names, " ") != strings.Join(want, " ") {
		t.Errorf("layer holds %q, want %q", names, want)
	}
	bin := filepath.Join(root, "migtun")
	checkStatic(t, bin)

	out, err := exec.Command(bin, "version").CombinedOutput()
	if err != nil || !strings.Contains(string(out), testVersion) {
		t.Errorf("migtun version: %v: %q, want %s", err, out, testVersion)
	}
	pki := makePKI(t, bin)
	sockets := t.TempDir()
	os.Chmod(sockets, 0o700) // serve wants its control socket where only its user may enter
	stop := serve(t, exec.Command(bin, serveArgs(pki, sockets)...))
	checkHealthz(t, filepath.Join(sockets, "control.sock"))
	stop()
}

// checkStatic fails unless bin is an ELF executable without an
// interpreter or shared libraries.
func checkStatic(t *testing.T, bin string) {
	t.Helper()
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Error("migtun in the image has an ELF interpreter: not static")
		}
	}
	if libs, err := f.ImportedLibraries(); err != nil || len(libs) > 0 {
		t.Errorf("migtun in the image needs shared libraries %q (%v)", libs, err)
	}
}

// makePKI makes a CA and a host certificate readable by the image's user.
func makePKI(t *testing.T, bin string) string {
	t.Helper()
	pki := filepath.Join(t.TempDir(), "pki")
	for _, args := range [][]string{{"certs", "init", "--dir", pki}, {"certs", "issue", "--dir", pki, "--name", "host", "--san", "127.0.0.1"}} {
		if out, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
			t.Fatalf("migtun %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	for p, mode := range map[string]os.FileMode{pki: 0o755, filepath.Join(pki, "host.key"): 0o644} {
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
	}
	return pki
}

// serveArgs are the arguments of a serve with its files under pki and its
// control socket in sockets, both as the process sees them.
func serveArgs(pki, sockets string) []string {
	return []string{"serve", "--listen", "127.0.0.1:0",
		"--cert", filepath.Join(pki, "host.crt"), "--key", filepath.Join(pki, "host.key"), "--ca", filepath.Join(pki, "ca.crt"),
		"--control", "unix:" + filepath.Join(sockets, "control.sock"), "--socket-dir", sockets}
}

// serve starts cmd, waits for its ready line and returns a func that
// stops it with SIGTERM and checks it exits cleanly.
func serve(t *testing.T, cmd *exec.Cmd) (stop func()) {
	t.Helper()
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "migtun ready") {
				done <- nil
				io.Copy(io.Discard, stdout)
				return
			}
		}
		done <- io.ErrUnexpectedEOF
	}()
	if err := <-done; err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("%s: no ready line\n%s", cmd.Args, logs.String())
	}
	return func() {
		t.Helper()
		cmd.Process.Signal(syscall.SIGTERM)
		if err := cmd.Wait(); err != nil {
			t.Errorf("%s: %v\n%s", cmd.Args, err, logs.String())
		}
	}
}

// checkHealthz asks the control socket for /healthz.
func checkHealthz(t *testing.T, sock string) {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		}}}
	resp, err := c.Get("http://migtun/healthz")
	if err != nil {
		t.Fatalf("GET /healthz: %v", err)
	}
	defer resp.Body.Close()
	var h struct{ Status string }
	if err := json.NewDecoder(resp.Body).Decode(&h); err != nil || resp.StatusCode != http.StatusOK || h.Status != "ok" {
		t.Errorf("GET /healthz: %s %q %v", resp.Status, h.Status, err)
	}
}
