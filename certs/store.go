package certs

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/pem"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"sync"
	"time"
)

// reloadInterval is how often, at most, a Store looks at its files.
const reloadInterval = time.Second

// Config names the files a host uses.
type Config struct {
	// CertFile and KeyFile hold the host's PEM certificate and private key.
	// They are reloaded when they change.
	CertFile, KeyFile string

	// CAFile holds the PEM certificates of the CAs whose certificates peers
	// must present. It is read once, by Load.
	CAFile string

	// AllowedPeers lists peer names, matched case-insensitively against the
	// peer certificate's common name and DNS SANs. An entry "*.suffix"
	// matches any name made of one label followed by ".suffix". Empty: any
	// peer with a certificate from the CA is accepted.
	AllowedPeers []string

	// OnReload, when set, is called after every attempt to reload changed
	// certificate or key files: with the new leaf certificate, or with the
	// error that kept the old one in use. It is called from the handshake
	// or the Refresh that noticed the change, one call at a time and in
	// the order of the attempts, without the Store's lock held.
	OnReload func(leaf *x509.Certificate, err error)
}

// Store holds a host's loaded certificate and CA, and builds the TLS
// configurations that use them. It reloads the certificate and key when
// their files change, looking at them at most once per second during
// handshakes and whenever Refresh is called. A replacement is used only if
// the pair matches, chains to the CA and is valid now; otherwise the old
// pair is kept and the failure reported through Err and Config.OnReload.
// A pair that fails at its first sight is tried again at the next check
// before it is reported, as the two files are not replaced at one instant.
// A Store is safe for concurrent use.
type Store struct {
	cfg      Config
	pool     *x509.CertPool
	cache    tls.ClientSessionCache // shared by every ClientConfig; see connCache
	interval time.Duration          // minimum time between file checks

	report sync.Mutex // held across a check and its OnReload call

	mu      sync.Mutex
	cert    *tls.Certificate
	gen     uint64 // incremented on every successful reload
	stamps  [2]fs.FileInfo
	pending [2]fs.FileInfo // a pair that failed once, to be tried again
	checked time.Time
	statErr error // the files could not be looked at, at the last check
	loadErr error // the changed files last seen could not be used
}

// Load reads the CA, certificate and key named by cfg. Its errors name the
// file that failed and why.
func Load(cfg Config) (*Store, error) {
	switch {
	case cfg.CertFile == "":
		return nil, fmt.Errorf("%w: no certificate file", ErrInvalidConfig)
	case cfg.KeyFile == "":
		return nil, fmt.Errorf("%w: no key file", ErrInvalidConfig)
	case cfg.CAFile == "":
		return nil, fmt.Errorf("%w: no ca file", ErrInvalidConfig)
	}
	for _, p := range cfg.AllowedPeers {
		if p == "" || p == "*." {
			return nil, fmt.Errorf("%w: allowed peer %q", ErrInvalidConfig, p)
		}
	}
	cfg.AllowedPeers = slices.Clone(cfg.AllowedPeers)

	pool, err := loadPool(cfg.CAFile)
	if err != nil {
		return nil, err
	}
	stamps, err := statPair(cfg.CertFile, cfg.KeyFile)
	if err != nil {
		return nil, err
	}
	cert, err := loadPair(cfg.CertFile, cfg.KeyFile)
	if err != nil {
		return nil, err
	}
	s := &Store{
		cfg:      cfg,
		pool:     pool,
		interval: reloadInterval,
		cert:     cert,
		stamps:   stamps,
		checked:  time.Now(),
	}
	s.cache = tls.NewLRUClientSessionCache(256)
	return s, nil
}

// Err returns what keeps the files from being the ones presented: a file
// that could not be looked at, at the last check, or a replaced pair that
// could not be loaded. It is nil while the files in place are presented.
func (s *Store) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.statErr != nil {
		return s.statErr
	}
	return s.loadErr
}

// current returns the certificate to present and its generation,
// reloading it first if the files changed and the check is due.
func (s *Store) current() (*tls.Certificate, uint64) { return s.check(false) }

// check looks at the files if the reload interval has passed since the
// last look, or if force is set, and reloads them if they changed.
func (s *Store) check(force bool) (*tls.Certificate, uint64) {
	if s.cfg.OnReload == nil {
		cert, gen, _, _ := s.reload(force)
		return cert, gen
	}
	s.report.Lock()
	defer s.report.Unlock()
	cert, gen, tried, err := s.reload(force)
	if tried {
		if err != nil {
			s.cfg.OnReload(nil, err)
		} else {
			s.cfg.OnReload(cert.Leaf, nil)
		}
	}
	return cert, gen
}

// reload is check under the lock; tried reports whether changed files
// were loaded, and err why they were not used.
func (s *Store) reload(force bool) (cert *tls.Certificate, gen uint64, tried bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	if !force && now.Sub(s.checked) < s.interval {
		return s.cert, s.gen, false, nil
	}
	s.checked = now
	stamps, err := statPair(s.cfg.CertFile, s.cfg.KeyFile)
	if err != nil {
		// Reported once, not at every check while a file stays missing.
		err = fmt.Errorf("reload: %w", err)
		tried = s.statErr == nil || s.statErr.Error() != err.Error()
		s.statErr = err
		return s.cert, s.gen, tried, err
	}
	s.statErr = nil
	if samePair(stamps, s.stamps) {
		return s.cert, s.gen, false, nil
	}
	cert, err = loadPair(s.cfg.CertFile, s.cfg.KeyFile)
	if err == nil {
		err = s.verifyLeaf(cert.Leaf, now)
	}
	if again, serr := statPair(s.cfg.CertFile, s.cfg.KeyFile); serr != nil || !samePair(again, stamps) {
		return s.cert, s.gen, false, nil // replaced while being read: look again next time
	}
	if err != nil {
		if !samePair(stamps, s.pending) {
			// Perhaps one file of the two is replaced and the other not yet.
			s.pending = stamps
			return s.cert, s.gen, false, nil
		}
		// Remembered, so a broken pair is tried again only when the files
		// change again.
		s.stamps = stamps
		s.loadErr = fmt.Errorf("reload: %w", err)
		return s.cert, s.gen, true, s.loadErr
	}
	s.stamps, s.pending = stamps, [2]fs.FileInfo{}
	s.cert, s.loadErr = cert, nil
	s.gen++
	return s.cert, s.gen, true, nil
}

// verifyLeaf checks that a certificate about to be presented chains to the
// CA and is valid at now, so peers will not refuse it.
func (s *Store) verifyLeaf(leaf *x509.Certificate, now time.Time) error {
	_, err := leaf.Verify(x509.VerifyOptions{Roots: s.pool, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	if err != nil {
		return fmt.Errorf("certificate %s: %w", s.cfg.CertFile, err)
	}
	return nil
}

// Verify checks that the certificate presented now chains to the CA and
// is valid now: one that does not is refused by every peer.
func (s *Store) Verify() error {
	return s.verifyLeaf(s.Leaf(), time.Now())
}

// Refresh looks at the certificate and key files now, whenever the last
// look was, reloads them if they changed, and returns Err. Calling it on a
// timer makes a replacement take effect, and be reported to
// Config.OnReload, even while no handshake happens.
func (s *Store) Refresh() error {
	s.check(true)
	return s.Err()
}

// Leaf returns the certificate the Store presents now, as last loaded.
func (s *Store) Leaf() *x509.Certificate {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cert.Leaf
}

// generation returns the current certificate generation, reloading first
// if due.
func (s *Store) generation() uint64 {
	_, gen := s.current()
	return gen
}

// loadPool reads a PEM bundle of CA certificates.
func loadPool(path string) (*x509.CertPool, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("ca file: %w", err)
	}
	pool := x509.NewCertPool()
	n := 0
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("ca file %s: %w", path, err)
		}
		pool.AddCert(c)
		n++
	}
	if n == 0 {
		return nil, fmt.Errorf("ca file %s: %w", path, ErrNoCertificate)
	}
	return pool, nil
}

// loadPair reads and checks a certificate and its key.
func loadPair(certPath, keyPath string) (*tls.Certificate, error) {
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, fmt.Errorf("certificate file: %w", err)
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, fmt.Errorf("key file: %w", err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("certificate %s with key %s: %w", certPath, keyPath, err)
	}
	if cert.Leaf == nil { // GODEBUG=x509keypairleaf=0
		if cert.Leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, fmt.Errorf("certificate %s: %w", certPath, err)
		}
	}
	return &cert, nil
}

// statPair stats the certificate and key files.
func statPair(certPath, keyPath string) ([2]fs.FileInfo, error) {
	var st [2]fs.FileInfo
	var err error
	if st[0], err = os.Stat(certPath); err != nil {
		return st, fmt.Errorf("certificate file: %w", err)
	}
	if st[1], err = os.Stat(keyPath); err != nil {
		return st, fmt.Errorf("key file: %w", err)
	}
	return st, nil
}

// samePair reports whether a and b describe the same, unmodified pair of
// files.
func samePair(a, b [2]fs.FileInfo) bool { return sameFile(a[0], b[0]) && sameFile(a[1], b[1]) }

// sameFile reports whether a and b describe the same, unmodified file.
func sameFile(a, b fs.FileInfo) bool {
	if a == nil || b == nil {
		return false
	}
	return a.Size() == b.Size() && a.ModTime().Equal(b.ModTime()) && os.SameFile(a, b)
}

// connCache is the client session cache of one connection's config, over
// the Store's shared LRU. It files the ticket a connection receives under
// the generation of the certificate that connection presented, which is
// the one the ticket carries: after a rotation during the handshake, the
// generation current when the ticket arrives is newer, and a ticket filed
// under it would keep presenting the old certificate on resumption.
type connCache struct {
	store *Store
	mu    sync.Mutex
	gen   uint64 // generation of the certificate this connection uses
	known bool
}

// use records the generation of the certificate the connection presents,
// or whose ticket it tries to resume.
func (c *connCache) use(gen uint64) {
	c.mu.Lock()
	c.gen, c.known = gen, true
	c.mu.Unlock()
}

// Get implements tls.ClientSessionCache: only tickets of the current
// certificate are resumed.
func (c *connCache) Get(key string) (*tls.ClientSessionState, bool) {
	gen := c.store.generation()
	c.use(gen)
	return c.store.cache.Get(genKey(gen, key))
}

// Put implements tls.ClientSessionCache. A ticket whose certificate is not
// known (crypto/tls always calls Get or GetClientCertificate first) is
// dropped rather than filed under a guess.
func (c *connCache) Put(key string, cs *tls.ClientSessionState) {
	c.mu.Lock()
	gen, known := c.gen, c.known
	c.mu.Unlock()
	if known {
		c.store.cache.Put(genKey(gen, key), cs)
	}
}

// genKey prefixes a cache key with a generation.
func genKey(gen uint64, key string) string {
	return fmt.Sprintf("%d/%s", gen, key)
}

// ticketTag is the prefix of the generation a server records in the
// session tickets it issues.
const ticketTag = "migtun-gen:"

// genExtra encodes a generation for tls.SessionState.Extra.
func genExtra(gen uint64) []byte {
	return binary.BigEndian.AppendUint64([]byte(ticketTag), gen)
}

// extraGen finds the generation recorded in a session's Extra.
func extraGen(extra [][]byte) (uint64, bool) {
	for _, e := range extra {
		if len(e) == len(ticketTag)+8 && string(e[:len(ticketTag)]) == ticketTag {
			return binary.BigEndian.Uint64(e[len(ticketTag):]), true
		}
	}
	return 0, false
}
