// Package testpki makes throwaway certificate authorities and host
// certificates in memory for tests of packages that may not import certs.
package testpki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"testing"
	"time"
)

// CA is an in-memory certificate authority.
type CA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	Pool *x509.CertPool
}

// NewCA returns a fresh CA.
func NewCA(t testing.TB) *CA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &CA{cert: cert, key: key, Pool: pool}
}

// Issue returns a certificate for name, valid for 127.0.0.1, ::1 and
// localhost as well, for both client and server use.
func (ca *CA) Issue(t testing.TB, name string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{name, "localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// Host holds the TLS configurations of one test host.
type Host struct {
	Server *tls.Config
	cert   tls.Certificate
	pool   *x509.CertPool
	cache  tls.ClientSessionCache
}

// NewHost issues a certificate for name and builds mutual-TLS configs.
func (ca *CA) NewHost(t testing.TB, name string) *Host {
	cert := ca.Issue(t, name)
	return &Host{
		Server: &tls.Config{
			Certificates: []tls.Certificate{cert},
			ClientAuth:   tls.RequireAndVerifyClientCert,
			ClientCAs:    ca.Pool,
			MinVersion:   tls.VersionTLS13,
		},
		cert:  cert,
		pool:  ca.Pool,
		cache: tls.NewLRUClientSessionCache(64),
	}
}

// Client returns the client config for reaching serverName.
func (h *Host) Client(serverName string) *tls.Config {
	return &tls.Config{
		Certificates:       []tls.Certificate{h.cert},
		RootCAs:            h.pool,
		ServerName:         serverName,
		MinVersion:         tls.VersionTLS13,
		ClientSessionCache: h.cache,
	}
}

// Leaf returns the host's certificate.
func (h *Host) Leaf() *x509.Certificate {
	if h.cert.Leaf != nil {
		return h.cert.Leaf
	}
	leaf, err := x509.ParseCertificate(h.cert.Certificate[0])
	if err != nil {
		panic(err) // issued by this package: cannot be malformed
	}
	return leaf
}
