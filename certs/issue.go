package certs

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// File names inside a CA directory.
const (
	caCertName = "ca.crt"
	caKeyName  = "ca.key"
	caCN       = "migtun CA"
)

// Validity periods.
const (
	caValidity   = 10 * 365 * 24 * time.Hour
	hostValidity = 2 * 365 * 24 * time.Hour
	clockSkew    = time.Hour // NotBefore is backdated by this much
)

// InitCA creates a new CA in dir, creating dir with mode 0700 if it is
// missing: ca.crt (PEM, 0644) and ca.key (PEM PKCS#8, 0600). The key is
// ECDSA P-256, the certificate is valid for 10 years and its common name is
// "migtun CA". InitCA refuses, with an error wrapping ErrExists, if ca.crt or
// ca.key already exists.
func InitCA(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("init ca: %w", err)
	}
	certPath := filepath.Join(dir, caCertName)
	keyPath := filepath.Join(dir, caKeyName)
	if err := checkAbsent(certPath, keyPath); err != nil {
		return fmt.Errorf("init ca: %w", err)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("init ca: generate key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return fmt.Errorf("init ca: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: caCN},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return fmt.Errorf("init ca: create certificate: %w", err)
	}
	if err := writePair(certPath, 0o644, der, keyPath, key); err != nil {
		return fmt.Errorf("init ca: %w", err)
	}
	return nil
}

// Issue writes NAME.crt and NAME.key (both 0600) into dir, signed by the CA
// in dir/ca.crt and dir/ca.key. The key is ECDSA P-256 and the certificate
// is valid for 2 years, usable both as a TLS server and a TLS client.
//
// The certificate's common name is name. Its subject alternative names are
// name and each of sans: entries that parse as IP addresses become IP SANs,
// the others DNS SANs. name must be non-empty and use only the characters
// [A-Za-z0-9._-]. Issue refuses, with an error wrapping ErrExists, to
// overwrite existing files.
func Issue(dir, name string, sans []string) error {
	now := time.Now()
	return issue(dir, name, sans, now.Add(-clockSkew), now.Add(hostValidity))
}

// issue is Issue with an explicit validity window, so tests can make
// expired certificates.
func issue(dir, name string, sans []string, notBefore, notAfter time.Time) error {
	if err := checkName(name); err != nil {
		return fmt.Errorf("issue: %w", err)
	}
	certPath := filepath.Join(dir, name+".crt")
	keyPath := filepath.Join(dir, name+".key")
	if err := checkAbsent(certPath, keyPath); err != nil {
		return fmt.Errorf("issue: %w", err)
	}
	ca, caKey, err := loadCA(dir)
	if err != nil {
		return fmt.Errorf("issue: %w", err)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("issue: generate key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return fmt.Errorf("issue: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	if err := addSANs(tmpl, append([]string{name}, sans...)); err != nil {
		return fmt.Errorf("issue: %w", err)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("issue: create certificate: %w", err)
	}
	if err := writePair(certPath, 0o600, der, keyPath, key); err != nil {
		return fmt.Errorf("issue: %w", err)
	}
	return nil
}

// checkName reports whether name is usable as a host name and file name.
func checkName(name string) error {
	if name == "" || name == "." || name == ".." {
		return fmt.Errorf("%w: %q", ErrInvalidName, name)
	}
	for _, r := range name {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' ||
			r == '.' || r == '_' || r == '-'
		if !ok {
			return fmt.Errorf("%w: %q: only [A-Za-z0-9._-] allowed", ErrInvalidName, name)
		}
	}
	return nil
}

// addSANs adds names to tmpl as IP or DNS SANs, skipping duplicates.
func addSANs(tmpl *x509.Certificate, names []string) error {
	seen := make(map[string]bool)
	for _, n := range names {
		if n == "" {
			return fmt.Errorf("%w: empty subject alternative name", ErrInvalidName)
		}
		if ip := net.ParseIP(n); ip != nil {
			if !seen[ip.String()] {
				seen[ip.String()] = true
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			}
			continue
		}
		if !seen[n] {
			seen[n] = true
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	return nil
}

// loadCA reads the CA certificate and key from dir.
func loadCA(dir string) (*x509.Certificate, crypto.Signer, error) {
	certPath := filepath.Join(dir, caCertName)
	keyPath := filepath.Join(dir, caKeyName)
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, nil, fmt.Errorf("ca certificate: %w", err)
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, nil, fmt.Errorf("ca key: %w", err)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("ca %s, %s: %w", certPath, keyPath, err)
	}
	signer, ok := pair.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, nil, fmt.Errorf("ca key %s: unsupported key type %T", keyPath, pair.PrivateKey)
	}
	if !pair.Leaf.IsCA {
		return nil, nil, fmt.Errorf("ca certificate %s: not a CA", certPath)
	}
	return pair.Leaf, signer, nil
}

// checkAbsent returns an error wrapping ErrExists if any path exists.
func checkAbsent(paths ...string) error {
	for _, p := range paths {
		_, err := os.Lstat(p)
		if err == nil {
			return fmt.Errorf("%w: %s", ErrExists, p)
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}

// writePair writes the key (0600) and then the certificate, never
// overwriting either; on failure it removes what it created.
func writePair(certPath string, certMode fs.FileMode, der []byte, keyPath string, key *ecdsa.PrivateKey) error {
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("marshal key: %w", err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := writeNew(keyPath, 0o600, keyPEM); err != nil {
		return err
	}
	if err := writeNew(certPath, certMode, certPEM); err != nil {
		os.Remove(keyPath)
		return err
	}
	return nil
}

// writeNew creates path exclusively with mode and writes data to it.
func writeNew(path string, mode fs.FileMode, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("%w: %s", ErrExists, path)
	}
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// newSerial returns a random 128-bit certificate serial number.
func newSerial() (*big.Int, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("serial number: %w", err)
	}
	return serial, nil
}
