package certs

import (
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// newCA makes a CA in a fresh temporary directory.
func newCA(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "pki")
	if err := InitCA(dir); err != nil {
		t.Fatalf("InitCA: %v", err)
	}
	return dir
}

// newHost issues name in dir and loads it.
func newHost(t *testing.T, dir, name string, sans []string, allowed ...string) *Store {
	t.Helper()
	if err := Issue(dir, name, sans); err != nil {
		t.Fatalf("Issue(%q): %v", name, err)
	}
	return loadHost(t, dir, name, dir, allowed...)
}

// loadHost loads name's files from dir with the CA from caDir.
func loadHost(t *testing.T, dir, name, caDir string, allowed ...string) *Store {
	t.Helper()
	s, err := Load(Config{
		CertFile:     filepath.Join(dir, name+".crt"),
		KeyFile:      filepath.Join(dir, name+".key"),
		CAFile:       filepath.Join(caDir, "ca.crt"),
		AllowedPeers: allowed,
	})
	if err != nil {
		t.Fatalf("Load(%q): %v", name, err)
	}
	return s
}

func checkMode(t *testing.T, path string, want fs.FileMode) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got&^want != 0 {
		t.Errorf("%s: mode %v, want at most %v", path, got, want)
	}
}

func TestInitCAIssueLoad(t *testing.T) {
	dir := newCA(t)
	checkMode(t, dir, 0o700)
	checkMode(t, filepath.Join(dir, "ca.crt"), 0o644)
	checkMode(t, filepath.Join(dir, "ca.key"), 0o600)

	if err := Issue(dir, "host-a", []string{"10.0.0.1", "a.example", "host-a", "::1"}); err != nil {
		t.Fatalf("Issue: %v", err)
	}
	checkMode(t, filepath.Join(dir, "host-a.crt"), 0o600)
	checkMode(t, filepath.Join(dir, "host-a.key"), 0o600)

	s := loadHost(t, dir, "host-a", dir)
	leaf := s.cert.Leaf
	if leaf.Subject.CommonName != "host-a" {
		t.Errorf("CN = %q", leaf.Subject.CommonName)
	}
	if want := []string{"host-a", "a.example"}; !slices.Equal(leaf.DNSNames, want) {
		t.Errorf("DNSNames = %q, want %q", leaf.DNSNames, want)
	}
	if len(leaf.IPAddresses) != 2 || !leaf.IPAddresses[0].Equal(net.ParseIP("10.0.0.1")) ||
		!leaf.IPAddresses[1].Equal(net.IPv6loopback) {
		t.Errorf("IPAddresses = %v", leaf.IPAddresses)
	}
	if d := time.Until(leaf.NotAfter); d < hostValidity-2*time.Hour || d > hostValidity {
		t.Errorf("NotAfter in %v, want about %v", d, hostValidity)
	}
	if len(leaf.ExtKeyUsage) != 2 {
		t.Errorf("ExtKeyUsage = %v, want server and client auth", leaf.ExtKeyUsage)
	}
	if leaf.Issuer.CommonName != "migtun CA" {
		t.Errorf("issuer = %q", leaf.Issuer.CommonName)
	}
	if s.Err() != nil {
		t.Errorf("Err = %v", s.Err())
	}
}

func TestInitCARefusesExisting(t *testing.T) {
	dir := newCA(t)
	before, _ := os.ReadFile(filepath.Join(dir, "ca.key"))
	if err := InitCA(dir); !errors.Is(err, ErrExists) {
		t.Fatalf("second InitCA: %v, want ErrExists", err)
	}
	os.Remove(filepath.Join(dir, "ca.crt"))
	if err := InitCA(dir); !errors.Is(err, ErrExists) {
		t.Fatalf("InitCA with only ca.key: %v, want ErrExists", err)
	}
	after, _ := os.ReadFile(filepath.Join(dir, "ca.key"))
	if string(before) != string(after) {
		t.Error("ca.key was overwritten")
	}
}

func TestIssueRefuses(t *testing.T) {
	dir := newCA(t)
	if err := Issue(dir, "host", nil); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		sans []string
		want error
	}{
		{"", nil, ErrInvalidName},
		{".", nil, ErrInvalidName},
		{"..", nil, ErrInvalidName},
		{"../evil", nil, ErrInvalidName},
		{"a/b", nil, ErrInvalidName},
		{`a\b`, nil, ErrInvalidName},
		{"sp ace", nil, ErrInvalidName},
		{"ünï", nil, ErrInvalidName},
		{"ok", []string{""}, ErrInvalidName},
		{"host", nil, ErrExists},
		{"ca", nil, ErrExists},
	}
	for _, tt := range tests {
		err := Issue(dir, tt.name, tt.sans)
		if !errors.Is(err, tt.want) {
			t.Errorf("Issue(%q, %q) = %v, want %v", tt.name, tt.sans, err, tt.want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "ok.key")); err == nil {
		t.Error("failed Issue left ok.key behind")
	}
	if err := Issue(t.TempDir(), "host", nil); err == nil {
		t.Error("Issue without a CA succeeded")
	}
}

func TestLoadErrors(t *testing.T) {
	dir := newCA(t)
	if err := Issue(dir, "host", nil); err != nil {
		t.Fatal(err)
	}
	crt, key, ca := filepath.Join(dir, "host.crt"), filepath.Join(dir, "host.key"), filepath.Join(dir, "ca.crt")
	missing := filepath.Join(dir, "missing.pem")
	tests := []struct {
		cfg  Config
		want error
	}{
		{Config{KeyFile: key, CAFile: ca}, ErrInvalidConfig},
		{Config{CertFile: crt, KeyFile: key, CAFile: ca, AllowedPeers: []string{""}}, ErrInvalidConfig},
		{Config{CertFile: crt, KeyFile: key, CAFile: missing}, fs.ErrNotExist},
		{Config{CertFile: crt, KeyFile: key, CAFile: key}, ErrNoCertificate},
		{Config{CertFile: missing, KeyFile: key, CAFile: ca}, fs.ErrNotExist},
		{Config{CertFile: crt, KeyFile: filepath.Join(dir, "ca.key"), CAFile: ca}, nil},
	}
	for i, tt := range tests {
		_, err := Load(tt.cfg)
		if err == nil {
			t.Errorf("%d: Load succeeded", i)
			continue
		}
		if tt.want != nil && !errors.Is(err, tt.want) {
			t.Errorf("%d: Load = %v, want %v", i, err, tt.want)
		}
		t.Logf("%d: %v", i, err)
	}
}

func TestMatchName(t *testing.T) {
	tests := []struct {
		pattern, name string
		want          bool
	}{
		{"host-a", "host-a", true},
		{"Host-A", "host-a.", true},
		{"host-a", "host-b", false},
		{"*.example", "a.example", true},
		{"*.example", "A.Example", true},
		{"*.example", "a.b.example", false},
		{"*.example", "example", false},
		{"*.example", ".example", false},
		{"*.b.example", "a.b.example", true},
	}
	for _, tt := range tests {
		if got := matchName(tt.pattern, tt.name); got != tt.want {
			t.Errorf("matchName(%q, %q) = %v", tt.pattern, tt.name, got)
		}
	}
}
