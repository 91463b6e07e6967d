package certs

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"math"
	"net"
	"slices"
	"strings"
	"sync/atomic"
)

// ServerConfig returns a TLS 1.3 server configuration that requires a
// client certificate from the CA, presents the Store's current certificate,
// offers the ALPN protocols alpn and enforces Config.AllowedPeers. Session
// tickets are enabled so clients can resume; tickets issued before the
// server's certificate was rotated are not accepted.
//
// Each handshake runs on its own copy, which GetConfigForClient returns; a
// caller that changes the config should change what that returns too (a
// handshake that bypasses it issues tickets that are never resumed).
// Tickets are encrypted with keys of the returned config, shared by every
// listener built from it; call ServerConfig once, not per connection.
func (s *Store) ServerConfig(alpn []string) *tls.Config {
	cfg := &tls.Config{
		MinVersion:       tls.VersionTLS13,
		MaxVersion:       tls.VersionTLS13,
		ClientAuth:       tls.RequireAndVerifyClientCert,
		ClientCAs:        s.pool,
		NextProtos:       slices.Clone(alpn),
		VerifyConnection: s.verifyConnection,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			cert, _ := s.current()
			return cert, nil
		},
	}
	// Used only by handshakes that bypass GetConfigForClient.
	cfg.WrapSession = func(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
		return wrapTicket(cfg, cs, ss, noGeneration)
	}
	cfg.UnwrapSession = func(identity []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
		ss, _, err := s.unwrapTicket(cfg, identity, cs)
		return ss, err
	}
	cfg.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		return s.handshakeConfig(cfg), nil
	}
	return cfg
}

// noGeneration marks a ticket whose certificate is not known: it is never
// resumed.
const noGeneration = math.MaxUint64

// handshakeConfig is the configuration of one incoming handshake. It
// remembers the generation of the certificate the handshake presents, or
// of the ticket it resumes, and records that one in the ticket it issues:
// the generation current when the ticket is sent may be newer after a
// rotation, and a ticket marked with it would let clients resume a session
// that shows them the old certificate. Tickets are encrypted with base's
// keys, so every handshake of a listener can resume the others' tickets.
func (s *Store) handshakeConfig(base *tls.Config) *tls.Config {
	cfg := base.Clone()
	cfg.GetConfigForClient = nil
	var gen atomic.Uint64
	gen.Store(noGeneration)
	cfg.GetCertificate = func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
		cert, g := s.current()
		gen.Store(g)
		return cert, nil
	}
	cfg.WrapSession = func(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
		return wrapTicket(base, cs, ss, gen.Load())
	}
	cfg.UnwrapSession = func(identity []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
		ss, g, err := s.unwrapTicket(base, identity, cs)
		if ss != nil {
			gen.Store(g)
		}
		return ss, err
	}
	return cfg
}

// wrapTicket marks a session ticket with the generation of the certificate
// its handshake presented and encrypts it with keys's ticket keys.
func wrapTicket(keys *tls.Config, cs tls.ConnectionState, ss *tls.SessionState, gen uint64) ([]byte, error) {
	ss.Extra = append(ss.Extra, genExtra(gen))
	return keys.EncryptTicket(cs, ss)
}

// unwrapTicket decrypts a session ticket with keys's ticket keys and
// returns it with its generation if it was issued with the current
// certificate; otherwise nil, for a full handshake.
func (s *Store) unwrapTicket(keys *tls.Config, identity []byte, cs tls.ConnectionState) (*tls.SessionState, uint64, error) {
	ss, err := keys.DecryptTicket(identity, cs)
	if err != nil || ss == nil {
		return ss, 0, err
	}
	g, ok := extraGen(ss.Extra)
	if !ok || g != s.generation() {
		return nil, 0, nil
	}
	return ss, g, nil
}

// ClientConfig returns a TLS 1.3 client configuration that verifies the
// server against the CA and serverName, presents the Store's current
// certificate, offers the ALPN protocols alpn and enforces
// Config.AllowedPeers on the server's certificate. serverName is a host
// name or IP address; a ":port" suffix is ignored. All configs from one
// Store share a session cache, so new connections resume, but only
// sessions made with the current certificate.
//
// Call it for each connection: the config remembers which certificate its
// handshake presented, to file the connection's session ticket under it.
// Connections that share a config at the same time may file their tickets
// under each other's certificates.
func (s *Store) ClientConfig(serverName string, alpn []string) *tls.Config {
	if host, _, err := net.SplitHostPort(serverName); err == nil {
		serverName = host
	}
	serverName = strings.TrimSuffix(strings.TrimPrefix(serverName, "["), "]")
	cache := &connCache{store: s}
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		MaxVersion:         tls.VersionTLS13,
		RootCAs:            s.pool,
		ServerName:         serverName,
		NextProtos:         slices.Clone(alpn),
		ClientSessionCache: cache,
		VerifyConnection:   s.verifyConnection,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			cert, gen := s.current()
			cache.use(gen)
			return cert, nil
		},
	}
}

// verifyConnection applies Config.AllowedPeers to a handshake whose peer
// certificate crypto/tls has already verified against the CA. It runs on
// full and resumed handshakes alike.
func (s *Store) verifyConnection(cs tls.ConnectionState) error {
	if len(s.cfg.AllowedPeers) == 0 {
		return nil
	}
	if len(cs.PeerCertificates) == 0 {
		return fmt.Errorf("%w: no peer certificate", ErrPeerNotAllowed)
	}
	cert := cs.PeerCertificates[0]
	names := peerNames(cert)
	for _, pattern := range s.cfg.AllowedPeers {
		for _, name := range names {
			if matchName(pattern, name) {
				return nil
			}
		}
	}
	return fmt.Errorf("%w: %s", ErrPeerNotAllowed, describe(cert))
}

// PeerName returns the common name, or failing that the first DNS SAN, of
// the verified peer certificate in cs, or "" if there is none.
func PeerName(cs tls.ConnectionState) string {
	if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return ""
	}
	cert := cs.VerifiedChains[0][0]
	if cert.Subject.CommonName != "" {
		return cert.Subject.CommonName
	}
	if len(cert.DNSNames) > 0 {
		return cert.DNSNames[0]
	}
	return ""
}

// peerNames lists the names of cert that AllowedPeers is matched against.
func peerNames(cert *x509.Certificate) []string {
	names := make([]string, 0, 1+len(cert.DNSNames))
	if cert.Subject.CommonName != "" {
		names = append(names, cert.Subject.CommonName)
	}
	return append(names, cert.DNSNames...)
}

// describe names a certificate in error messages.
func describe(cert *x509.Certificate) string {
	return fmt.Sprintf("CN=%q DNS=%q", cert.Subject.CommonName, cert.DNSNames)
}

// matchName reports whether name matches pattern, which is an exact name or
// "*.suffix" matching exactly one leftmost label. Case and a trailing dot
// are ignored.
func matchName(pattern, name string) bool {
	pattern = strings.ToLower(strings.TrimSuffix(pattern, "."))
	name = strings.ToLower(strings.TrimSuffix(name, "."))
	suffix, ok := strings.CutPrefix(pattern, "*.")
	if !ok {
		return pattern == name
	}
	label, rest, ok := strings.Cut(name, ".")
	return ok && label != "" && rest == suffix
}
