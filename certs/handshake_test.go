package certs

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

var alpn = []string{"migtun/1"}

// result is what one side of a handshake saw.
type result struct {
	state tls.ConnectionState
	err   error
}

// dial runs one connection over loopback TCP between a server using srv
// and a client using cli. The server sends one byte after its handshake;
// the client reads it, which also collects session tickets and any alert
// the server sent after the client's handshake finished.
func dial(t *testing.T, srv, cli *tls.Config) (server, client result) {
	t.Helper()
	return dialThen(t, srv, cli, nil)
}

// dialThen is dial calling then, if not nil, between the client's
// handshake and its read, that is before the client takes its ticket.
func dialThen(t *testing.T, srv, cli *tls.Config, then func()) (server, client result) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		tc := tls.Server(c, srv)
		err = tc.Handshake()
		if err == nil {
			_, err = tc.Write([]byte{'x'})
			io.Copy(io.Discard, tc) // until the client closes
		}
		done <- result{tc.ConnectionState(), err}
	}()

	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	tc := tls.Client(c, cli)
	err = tc.Handshake()
	if err == nil && then != nil {
		then()
	}
	if err == nil {
		_, err = io.ReadFull(tc, make([]byte, 1))
	}
	client = result{tc.ConnectionState(), err}
	tc.Close()
	return <-done, client
}

// mustDial is dial expecting success on both sides.
func mustDial(t *testing.T, srv, cli *tls.Config) (server, client tls.ConnectionState) {
	t.Helper()
	s, c := dial(t, srv, cli)
	if s.err != nil || c.err != nil {
		t.Fatalf("handshake: server: %v; client: %v", s.err, c.err)
	}
	return s.state, c.state
}

func TestHandshakeMutualAuth(t *testing.T) {
	dir := newCA(t)
	server := newHost(t, dir, "server", []string{"127.0.0.1"})
	client := newHost(t, dir, "client", nil)

	ss, cs := mustDial(t, server.ServerConfig(alpn), client.ClientConfig("127.0.0.1:4443", alpn))
	if cs.Version != tls.VersionTLS13 {
		t.Errorf("version %x, want TLS 1.3", cs.Version)
	}
	if cs.NegotiatedProtocol != "migtun/1" {
		t.Errorf("ALPN %q", cs.NegotiatedProtocol)
	}
	if got := PeerName(ss); got != "client" {
		t.Errorf("server sees peer %q, want client", got)
	}
	if got := PeerName(cs); got != "server" {
		t.Errorf("client sees peer %q, want server", got)
	}
	if PeerName(tls.ConnectionState{}) != "" {
		t.Error("PeerName of an empty state is not empty")
	}
}

func TestResumption(t *testing.T) {
	dir := newCA(t)
	server := newHost(t, dir, "server", nil)
	client := newHost(t, dir, "client", nil)
	srv := server.ServerConfig(alpn)

	_, cs := mustDial(t, srv, client.ClientConfig("server", alpn))
	if cs.DidResume {
		t.Fatal("first connection resumed")
	}
	// A new config from the same Store shares the session cache.
	ss, cs := mustDial(t, srv, client.ClientConfig("server", alpn))
	if !cs.DidResume || !ss.DidResume {
		t.Fatalf("second connection: client resumed %v, server resumed %v", cs.DidResume, ss.DidResume)
	}
	if PeerName(ss) != "client" || PeerName(cs) != "server" {
		t.Errorf("resumed peers: server sees %q, client sees %q", PeerName(ss), PeerName(cs))
	}
	// The ticket a resumed connection gets resumes too.
	if _, cs := mustDial(t, srv, client.ClientConfig("server", alpn)); !cs.DidResume {
		t.Error("third connection, on the ticket of a resumed one: not resumed")
	}
}

func TestOtherCARefused(t *testing.T) {
	dir, other := newCA(t), newCA(t)
	server := newHost(t, dir, "server", nil)
	stranger := newHost(t, other, "stranger", nil)

	// The stranger's server certificate is refused by our client.
	client := newHost(t, dir, "client", nil)
	_, c := dial(t, stranger.ServerConfig(alpn), client.ClientConfig("stranger", alpn))
	var unknown x509.UnknownAuthorityError
	if !errors.As(c.err, &unknown) {
		t.Errorf("client: %v, want x509.UnknownAuthorityError", c.err)
	}

	// The stranger's client certificate is refused by our server, even
	// though the stranger trusts our CA.
	if err := Issue(other, "intruder", nil); err != nil {
		t.Fatal(err)
	}
	intruder := loadHost(t, other, "intruder", dir)
	s, c := dial(t, server.ServerConfig(alpn), intruder.ClientConfig("server", alpn))
	if !errors.As(s.err, &unknown) {
		t.Errorf("server: %v, want x509.UnknownAuthorityError", s.err)
	}
	if c.err == nil {
		t.Error("client: handshake succeeded")
	}
}

func TestExpiredRefused(t *testing.T) {
	dir := newCA(t)
	server := newHost(t, dir, "server", nil)
	client := newHost(t, dir, "client", nil)
	past := time.Now().Add(-48 * time.Hour)
	if err := issue(dir, "old", nil, past, past.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	old := loadHost(t, dir, "old", dir)

	var invalid x509.CertificateInvalidError
	s, _ := dial(t, server.ServerConfig(alpn), old.ClientConfig("server", alpn))
	if !errors.As(s.err, &invalid) || invalid.Reason != x509.Expired {
		t.Errorf("server: %v, want expired", s.err)
	}
	_, c := dial(t, old.ServerConfig(alpn), client.ClientConfig("old", alpn))
	if !errors.As(c.err, &invalid) || invalid.Reason != x509.Expired {
		t.Errorf("client: %v, want expired", c.err)
	}
}

func TestAllowedPeers(t *testing.T) {
	dir := newCA(t)
	server := newHost(t, dir, "server", []string{"server.a.example"}, "*.b.example")
	good := newHost(t, dir, "good", []string{"good.b.example"}, "*.a.example")
	bad := newHost(t, dir, "bad", []string{"bad.c.example", "x.y.b.example"})

	ss, _ := mustDial(t, server.ServerConfig(alpn), good.ClientConfig("server", alpn))
	if PeerName(ss) != "good" {
		t.Errorf("peer %q", PeerName(ss))
	}

	s, c := dial(t, server.ServerConfig(alpn), bad.ClientConfig("server", alpn))
	if !errors.Is(s.err, ErrPeerNotAllowed) {
		t.Fatalf("server: %v, want ErrPeerNotAllowed", s.err)
	}
	t.Logf("server: %v", s.err)
	if c.err == nil {
		t.Error("client: handshake succeeded")
	}

	// The client applies its policy to the server too.
	_, c = dial(t, bad.ServerConfig(alpn), good.ClientConfig("bad", alpn))
	if !errors.Is(c.err, ErrPeerNotAllowed) {
		t.Errorf("client: %v, want ErrPeerNotAllowed", c.err)
	}
}

// replace issues name in dir and moves its files over target's.
func replace(t *testing.T, dir, target, name string, sans []string) {
	t.Helper()
	if err := Issue(dir, name, sans); err != nil {
		t.Fatal(err)
	}
	for _, ext := range []string{".key", ".crt"} {
		if err := os.Rename(filepath.Join(dir, name+ext), filepath.Join(dir, target+ext)); err != nil {
			t.Fatal(err)
		}
	}
}

func TestRotation(t *testing.T) {
	dir := newCA(t)
	server := newHost(t, dir, "server", []string{"srv.example"})
	client := newHost(t, dir, "client", nil)
	server.interval, client.interval = 0, 0
	srv := server.ServerConfig(alpn)
	cli := client.ClientConfig("srv.example", alpn)
	mustDial(t, srv, cli)
	if _, cs := mustDial(t, srv, cli); !cs.DidResume {
		t.Fatal("no resumption before rotation")
	}

	replace(t, dir, "server", "server2", []string{"srv.example"})
	ss, cs := mustDial(t, srv, cli)
	if cs.DidResume || PeerName(cs) != "server2" {
		t.Errorf("after server rotation: resumed %v, client sees %q", cs.DidResume, PeerName(cs))
	}
	if _, cs := mustDial(t, srv, cli); !cs.DidResume {
		t.Error("no resumption after server rotation")
	}

	replace(t, dir, "client", "client2", nil)
	ss, cs = mustDial(t, srv, cli)
	if cs.DidResume || PeerName(ss) != "client2" {
		t.Errorf("after client rotation: resumed %v, server sees %q", cs.DidResume, PeerName(ss))
	}
	if server.Err() != nil || client.Err() != nil {
		t.Errorf("Err: server %v, client %v", server.Err(), client.Err())
	}
}

// TestRotationDuringHandshake rotates each host's certificate after its
// handshake presented the old one and before the session ticket of that
// handshake is filed: the ticket must stay tied to the old certificate, so
// the next connection does not resume it and presents the new one.
func TestRotationDuringHandshake(t *testing.T) {
	t.Run("client", func(t *testing.T) {
		dir := newCA(t)
		server := newHost(t, dir, "server", nil)
		client := newHost(t, dir, "client", nil)
		srv := server.ServerConfig(alpn)
		s, c := dialThen(t, srv, client.ClientConfig("server", alpn), func() {
			replace(t, dir, "client", "client2", nil)
			if err := client.Refresh(); err != nil {
				t.Fatal(err)
			}
		})
		if s.err != nil || c.err != nil || PeerName(s.state) != "client" {
			t.Fatalf("first connection: server %v, client %v, server sees %q", s.err, c.err, PeerName(s.state))
		}
		ss, cs := mustDial(t, srv, client.ClientConfig("server", alpn))
		if cs.DidResume || PeerName(ss) != "client2" {
			t.Errorf("after the client's rotation: resumed %v, server sees %q, want a full handshake showing client2", cs.DidResume, PeerName(ss))
		}
	})
	t.Run("client-resumed", func(t *testing.T) {
		dir := newCA(t)
		server := newHost(t, dir, "server", nil)
		client := newHost(t, dir, "client", nil)
		srv := server.ServerConfig(alpn)
		mustDial(t, srv, client.ClientConfig("server", alpn))
		s, c := dialThen(t, srv, client.ClientConfig("server", alpn), func() {
			replace(t, dir, "client", "client2", nil)
			if err := client.Refresh(); err != nil {
				t.Fatal(err)
			}
		})
		if s.err != nil || c.err != nil || !c.state.DidResume {
			t.Fatalf("second connection: server %v, client %v, resumed %v", s.err, c.err, c.state.DidResume)
		}
		ss, cs := mustDial(t, srv, client.ClientConfig("server", alpn))
		if cs.DidResume || PeerName(ss) != "client2" {
			t.Errorf("after the client's rotation: resumed %v, server sees %q, want a full handshake showing client2", cs.DidResume, PeerName(ss))
		}
	})
	t.Run("server-resumed", func(t *testing.T) {
		dir := newCA(t)
		server := newHost(t, dir, "server", []string{"srv.example"})
		client := newHost(t, dir, "client", nil)
		srv := server.ServerConfig(alpn)
		get, handshakes := srv.GetConfigForClient, 0
		// The second handshake resumes; the rotation comes right after its
		// ticket was accepted, before it issues a new one.
		srv.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			h, err := get(hello)
			if handshakes++; handshakes == 2 {
				unwrap := h.UnwrapSession
				h.UnwrapSession = func(identity []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
					ss, err := unwrap(identity, cs)
					replace(t, dir, "server", "server2", []string{"srv.example"})
					if rerr := server.Refresh(); rerr != nil {
						return nil, rerr
					}
					return ss, err
				}
			}
			return h, err
		}
		mustDial(t, srv, client.ClientConfig("srv.example", alpn))
		if _, cs := mustDial(t, srv, client.ClientConfig("srv.example", alpn)); !cs.DidResume {
			t.Fatal("second connection not resumed")
		}
		_, cs := mustDial(t, srv, client.ClientConfig("srv.example", alpn))
		if cs.DidResume || PeerName(cs) != "server2" {
			t.Errorf("after the server's rotation: resumed %v, client sees %q, want a full handshake showing server2", cs.DidResume, PeerName(cs))
		}
	})
	t.Run("server", func(t *testing.T) {
		dir := newCA(t)
		server := newHost(t, dir, "server", []string{"srv.example"})
		client := newHost(t, dir, "client", nil)
		srv := server.ServerConfig(alpn)
		verify, rotated := srv.VerifyConnection, false
		// The server's VerifyConnection runs after it presented its
		// certificate and before it sends the ticket.
		srv.VerifyConnection = func(cs tls.ConnectionState) error {
			if !rotated {
				rotated = true
				replace(t, dir, "server", "server2", []string{"srv.example"})
				if err := server.Refresh(); err != nil {
					return err
				}
			}
			return verify(cs)
		}
		if _, cs := mustDial(t, srv, client.ClientConfig("srv.example", alpn)); PeerName(cs) != "server" {
			t.Fatalf("first connection: client sees %q", PeerName(cs))
		}
		_, cs := mustDial(t, srv, client.ClientConfig("srv.example", alpn))
		if cs.DidResume || PeerName(cs) != "server2" {
			t.Errorf("after the server's rotation: resumed %v, client sees %q, want a full handshake showing server2", cs.DidResume, PeerName(cs))
		}
		if _, cs := mustDial(t, srv, client.ClientConfig("srv.example", alpn)); !cs.DidResume {
			t.Error("tickets issued after the rotation are not resumed")
		}
	})
}

func TestReloadThrottled(t *testing.T) {
	dir := newCA(t)
	server := newHost(t, dir, "server", nil)
	client := newHost(t, dir, "client", nil)
	server.interval = time.Hour // however slow the machine, the test is within it
	replace(t, dir, "server", "server2", []string{"server"})
	// Within the interval the old certificate is still served.
	_, cs := mustDial(t, server.ServerConfig(alpn), client.ClientConfig("server", alpn))
	if PeerName(cs) != "server" {
		t.Errorf("client sees %q before the reload interval passed", PeerName(cs))
	}
}

func TestReloadFailureKeepsOld(t *testing.T) {
	dir := newCA(t)
	server := newHost(t, dir, "server", nil)
	client := newHost(t, dir, "client", nil)
	server.interval = 0
	srv := server.ServerConfig(alpn)

	keyPath := filepath.Join(dir, "server.key")
	if err := os.WriteFile(keyPath, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, cs := mustDial(t, srv, client.ClientConfig("server", alpn))
	if PeerName(cs) != "server" {
		t.Errorf("client sees %q", PeerName(cs))
	}
	server.Refresh() // the second sight of the broken pair, if the handshake had only one
	if server.Err() == nil {
		t.Fatal("Err is nil after a broken reload")
	}
	t.Logf("Err: %v", server.Err())

	os.Remove(keyPath)
	replace(t, dir, "server", "server2", []string{"server"})
	_, cs = mustDial(t, srv, client.ClientConfig("server", alpn))
	if PeerName(cs) != "server2" || server.Err() != nil {
		t.Errorf("after repair: client sees %q, Err %v", PeerName(cs), server.Err())
	}
}

func TestReloadReported(t *testing.T) {
	dir := newCA(t)
	server := newHost(t, dir, "server", []string{"server"})
	client := newHost(t, dir, "client", nil)
	server.interval = 0
	type report struct {
		cn  string
		err error
	}
	var reports []report
	server.cfg.OnReload = func(leaf *x509.Certificate, err error) {
		r := report{err: err}
		if leaf != nil {
			r.cn = leaf.Subject.CommonName
		}
		reports = append(reports, r)
	}
	srv := server.ServerConfig(alpn)
	dialServer := func() {
		t.Helper()
		mustDial(t, srv, client.ClientConfig("server", alpn))
	}

	dialServer()
	if len(reports) != 0 {
		t.Fatalf("reports with unchanged files: %+v", reports)
	}
	replace(t, dir, "server", "server2", []string{"server"})
	dialServer()
	dialServer()
	if len(reports) != 1 || reports[0].cn != "server2" || reports[0].err != nil {
		t.Fatalf("after one rotation: reports %+v, want one for server2", reports)
	}

	keyPath := filepath.Join(dir, "server.key")
	key, err := os.ReadFile(keyPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(keyPath); err != nil {
		t.Fatal(err)
	}
	dialServer()
	dialServer()
	if len(reports) != 2 || reports[1].err == nil || !errors.Is(reports[1].err, os.ErrNotExist) {
		t.Fatalf("with the key file missing: reports %+v, want one more, with the error", reports)
	}
	if err := os.WriteFile(keyPath, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A broken pair may be half-way through a replacement at its first
	// sight: it is reported at the second.
	server.Refresh()
	if len(reports) != 2 {
		t.Fatalf("a broken key at its first sight: reports %+v, want no new one", reports)
	}
	server.Refresh()
	if len(reports) != 3 || reports[2].err == nil {
		t.Fatalf("with a broken key: reports %+v, want one more, with the error", reports)
	}
	t.Logf("broken key reported as: %v", reports[2].err)
	if err := os.WriteFile(keyPath, key, 0o600); err != nil {
		t.Fatal(err)
	}
	dialServer()
	if len(reports) != 4 || reports[3].cn != "server2" || reports[3].err != nil {
		t.Fatalf("after the repair: reports %+v, want one more for server2", reports)
	}
}

func TestRefresh(t *testing.T) {
	dir := newCA(t)
	server := newHost(t, dir, "server", nil)
	server.interval = 0
	reloaded := ""
	server.cfg.OnReload = func(leaf *x509.Certificate, err error) {
		if err == nil {
			reloaded = leaf.Subject.CommonName
		}
	}
	replace(t, dir, "server", "server2", nil)
	if err := server.Refresh(); err != nil || reloaded != "server2" || server.Leaf().Subject.CommonName != "server2" {
		t.Fatalf("Refresh: %v; reported %q, leaf %q; want server2 without a handshake", err, reloaded, server.Leaf().Subject.CommonName)
	}
	// A key moved away and back unchanged: an error while it is away, none
	// once it is back, and nothing to reload.
	keyPath := filepath.Join(dir, "server.key")
	if err := os.Rename(keyPath, keyPath+".away"); err != nil {
		t.Fatal(err)
	}
	if err := server.Refresh(); err == nil {
		t.Fatal("Refresh with the key file missing: no error")
	}
	if err := os.Rename(keyPath+".away", keyPath); err != nil {
		t.Fatal(err)
	}
	if err := server.Refresh(); err != nil {
		t.Fatalf("Refresh with the key file back: %v", err)
	}
	if err := os.WriteFile(keyPath, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := server.Refresh(); err != nil {
		t.Fatalf("Refresh at the first sight of a broken key: %v; want it looked at again first", err)
	}
	if err := server.Refresh(); err == nil || server.Leaf().Subject.CommonName != "server2" {
		t.Fatalf("Refresh with a broken key: %v, leaf %q; want an error and server2 kept", err, server.Leaf().Subject.CommonName)
	}
}

// TestReloadRefusesUnusable checks that replaced files peers would refuse
// (another CA, expired) are not presented, and that a key replaced before
// its certificate is not reported as a failure.
func TestReloadRefusesUnusable(t *testing.T) {
	dir, other := newCA(t), newCA(t)
	server := newHost(t, dir, "server", nil)
	server.interval = 0
	var failures []error
	server.cfg.OnReload = func(_ *x509.Certificate, err error) {
		if err != nil {
			failures = append(failures, err)
		}
	}
	move := func(fromDir, name, ext string) {
		t.Helper()
		if err := os.Rename(filepath.Join(fromDir, name+ext), filepath.Join(dir, "server"+ext)); err != nil {
			t.Fatal(err)
		}
	}

	// The key first, then the certificate, with a check in between.
	if err := Issue(dir, "server2", nil); err != nil {
		t.Fatal(err)
	}
	move(dir, "server2", ".key")
	server.Refresh()
	move(dir, "server2", ".crt")
	if err := server.Refresh(); err != nil || server.Leaf().Subject.CommonName != "server2" || len(failures) != 0 {
		t.Fatalf("key then certificate: %v, leaf %q, failures %v; want server2 and no failure", err, server.Leaf().Subject.CommonName, failures)
	}

	past := time.Now().Add(-48 * time.Hour)
	if err := issue(dir, "old", nil, past, past.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := Issue(other, "stranger", nil); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		dir, name string
		want      x509.InvalidReason
	}{{dir, "old", x509.Expired}, {other, "stranger", -1}} {
		move(c.dir, c.name, ".crt")
		move(c.dir, c.name, ".key")
		server.Refresh()
		err := server.Refresh()
		var invalid x509.CertificateInvalidError
		var unknown x509.UnknownAuthorityError
		switch {
		case c.want == x509.Expired && !(errors.As(err, &invalid) && invalid.Reason == x509.Expired),
			c.want == -1 && !errors.As(err, &unknown):
			t.Errorf("%s: Refresh: %v, want it refused", c.name, err)
		}
		if server.Leaf().Subject.CommonName != "server2" {
			t.Errorf("%s: presents %q, want server2 kept", c.name, server.Leaf().Subject.CommonName)
		}
		t.Logf("%s refused: %v", c.name, err)
	}
	if len(failures) != 2 {
		t.Errorf("failures reported: %v, want two", failures)
	}
}

func TestWrongServerNameRefused(t *testing.T) {
	dir := newCA(t)
	server := newHost(t, dir, "server", []string{"srv.example", "192.0.2.1"})
	client := newHost(t, dir, "client", nil)
	for _, name := range []string{"other.example", "192.0.2.2"} {
		_, c := dial(t, server.ServerConfig(alpn), client.ClientConfig(name+":4443", alpn))
		var wrong x509.HostnameError
		if !errors.As(c.err, &wrong) {
			t.Errorf("dialing %s: %v, want x509.HostnameError", name, c.err)
			continue
		}
		t.Logf("dialing %s: %v", name, c.err)
	}
}
