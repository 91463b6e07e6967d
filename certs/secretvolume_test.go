package certs

import (
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// secretVolume lays out a directory the way the kubelet lays out a mounted
// Secret (and cert-manager's CSI driver its volumes): the files live in a
// timestamped directory, "..data" is a symlink to it, and each visible
// name is a symlink through "..data". An update writes a new timestamped
// directory, points a "..data_tmp" symlink at it, renames that over
// "..data" and removes the old directory; no visible file is ever
// rewritten.
type secretVolume struct {
	t   *testing.T
	dir string
	gen int
	cur string // the timestamped directory "..data" points at
}

// newSecretVolume makes the volume with files (name → content) in it.
func newSecretVolume(t *testing.T, files map[string][]byte) *secretVolume {
	v := &secretVolume{t: t, dir: filepath.Join(t.TempDir(), "tls")}
	if err := os.Mkdir(v.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	v.update(files)
	for name := range files {
		if err := os.Symlink(filepath.Join("..data", name), filepath.Join(v.dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	return v
}

// update swaps in a new generation of the files, as the kubelet does.
func (v *secretVolume) update(files map[string][]byte) {
	t := v.t
	t.Helper()
	v.gen++
	ts := fmt.Sprintf("..2026_12_02_04_30_%02d.%09d", v.gen, 100000000+v.gen)
	if err := os.Mkdir(filepath.Join(v.dir, ts), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(v.dir, ts, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	tmp := filepath.Join(v.dir, "..data_tmp")
	if err := os.Symlink(ts, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(v.dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if v.cur != "" {
		if err := os.RemoveAll(filepath.Join(v.dir, v.cur)); err != nil {
			t.Fatal(err)
		}
	}
	v.cur = ts
}

// path returns a visible name's path, as a pod's container sees it.
func (v *secretVolume) path(name string) string { return filepath.Join(v.dir, name) }

// secretFiles issues name from the CA in dir and returns the files of a
// kubernetes.io/tls Secret holding it, as cert-manager writes them.
func secretFiles(t *testing.T, dir, name string) map[string][]byte {
	t.Helper()
	if err := Issue(dir, name, []string{name + ".example"}); err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	for file, src := range map[string]string{"tls.crt": name + ".crt", "tls.key": name + ".key", "ca.crt": "ca.crt"} {
		data, err := os.ReadFile(filepath.Join(dir, src))
		if err != nil {
			t.Fatal(err)
		}
		files[file] = data
	}
	return files
}

// TestSecretVolumeSwap checks that a certificate rotated the way the
// kubelet updates a mounted Secret, by swapping the "..data" symlink, is
// picked up, reported once, and picked up again at the next swap.
func TestSecretVolumeSwap(t *testing.T) {
	pki := newCA(t)
	vol := newSecretVolume(t, secretFiles(t, pki, "node1"))
	var reloads []string
	s, err := Load(Config{CertFile: vol.path("tls.crt"), KeyFile: vol.path("tls.key"), CAFile: vol.path("ca.crt"),
		OnReload: func(leaf *x509.Certificate, err error) {
			if err != nil {
				reloads = append(reloads, "error: "+err.Error())
				return
			}
			reloads = append(reloads, leaf.Subject.CommonName)
		}})
	if err != nil {
		t.Fatal(err)
	}
	if got := s.Leaf().Subject.CommonName; got != "node1" {
		t.Fatalf("loaded %q, want node1", got)
	}
	for i, name := range []string{"node1-renewed", "node1-renewed-again"} {
		vol.update(secretFiles(t, pki, name))
		if err := s.Refresh(); err != nil {
			t.Fatalf("swap %d: Refresh: %v", i+1, err)
		}
		if got := s.Leaf().Subject.CommonName; got != name {
			t.Fatalf("swap %d: presenting %q, want %q", i+1, got, name)
		}
		// Nothing changed since: no reload, nothing reported.
		if err := s.Refresh(); err != nil {
			t.Fatalf("swap %d: second Refresh: %v", i+1, err)
		}
	}
	if want := []string{"node1-renewed", "node1-renewed-again"}; fmt.Sprint(reloads) != fmt.Sprint(want) {
		t.Errorf("reported %q, want %q", reloads, want)
	}
}
