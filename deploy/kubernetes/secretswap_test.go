package kubernetes

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/migtun/migtun/deploy/internal/testbin"
)

// secretVolume writes files the way the kubelet updates a mounted Secret:
// into a new timestamped directory, then a "..data_tmp" symlink to it
// renamed over "..data"; the visible names are symlinks through "..data"
// and are never rewritten.
type secretVolume struct {
	dir, cur string
	gen      int
}

func (v *secretVolume) write(t *testing.T, files map[string][]byte) {
	t.Helper()
	v.gen++
	ts := fmt.Sprintf("..2026_12_02_05_00_%02d.%09d", v.gen, 200000000+v.gen)
	if err := os.MkdirAll(filepath.Join(v.dir, ts), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(v.dir, ts, name), data, 0o440); err != nil {
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
	for name := range files {
		link := filepath.Join(v.dir, name)
		if _, err := os.Lstat(link); os.IsNotExist(err) {
			if err := os.Symlink(filepath.Join("..data", name), link); err != nil {
				t.Fatal(err)
			}
		}
	}
	if v.cur != "" {
		if err := os.RemoveAll(filepath.Join(v.dir, v.cur)); err != nil {
			t.Fatal(err)
		}
	}
	v.cur = ts
}

// testCA signs host certificates as cert-manager's CA issuer would.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "migtun-ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// secret returns a kubernetes.io/tls Secret's files for a host
// certificate expiring at notAfter.
func (ca *testCA) secret(t *testing.T, serial int64, notAfter time.Time) map[string][]byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "migtun"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: notAfter, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return map[string][]byte{
		"tls.crt": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		"tls.key": pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}),
		"ca.crt":  ca.pem,
	}
}

var expiryLine = regexp.MustCompile(`(?m)^migtun_certificate_expiry_timestamp_seconds ([0-9.e+]+)$`)

// TestSecretSwapReload runs migtun serve on certificate files laid out as
// a mounted Secret (the DaemonSet's /etc/migtun/tls) and renews the Secret
// the way the kubelet does, twice: each time the expiry migtun reports in
// its metrics moves to the new certificate's, with no reload failure.
func TestSecretSwapReload(t *testing.T) {
	bin := testbin.Migtun(t)
	ca := newTestCA(t)
	vol := &secretVolume{dir: filepath.Join(t.TempDir(), "tls")}
	expiry := time.Now().Add(10 * time.Hour).Truncate(time.Second)
	vol.write(t, ca.secret(t, 100, expiry))

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := l.Addr().String()
	l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "serve", "--listen", "127.0.0.1:0",
		"--cert", filepath.Join(vol.dir, "tls.crt"), "--key", filepath.Join(vol.dir, "tls.key"), "--ca", filepath.Join(vol.dir, "ca.crt"),
		"--metrics-listen", metricsAddr, "--socket-dir", filepath.Join(t.TempDir(), "sockets"))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var logs strings.Builder
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		if err := cmd.Wait(); err != nil {
			t.Errorf("migtun serve: %v\n%s", err, logs.String())
		}
	}()
	sc := bufio.NewScanner(stdout)
	if !sc.Scan() || !strings.HasPrefix(sc.Text(), "migtun ready") {
		t.Fatalf("no ready line: %q\n%s", sc.Text(), logs.String())
	}
	go io.Copy(io.Discard, stdout)

	waitExpiry := func(want time.Time) {
		t.Helper()
		var last string
		for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); {
			resp, err := http.Get("http://" + metricsAddr + "/metrics")
			if err != nil {
				t.Fatal(err)
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(string(body), "\nmigtun_certificate_reload_failed 1") {
				t.Fatalf("reload failed:\n%s", logs.String())
			}
			if m := expiryLine.FindSubmatch(body); m != nil {
				last = string(m[1])
				if v, err := strconv.ParseFloat(last, 64); err == nil && int64(v) == want.Unix() {
					return
				}
			}
			time.Sleep(100 * time.Millisecond) // migtun looks at its files once a second
		}
		t.Fatalf("certificate expiry in metrics %s, want %d (%v)\n%s", last, want.Unix(), want, logs.String())
	}
	waitExpiry(expiry)
	for i := 1; i <= 2; i++ {
		expiry = expiry.Add(24 * time.Hour)
		vol.write(t, ca.secret(t, int64(100+i), expiry))
		waitExpiry(expiry)
	}
}
