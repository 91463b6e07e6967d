package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/migtun/migtun/tunnel"
)

// Endpoint is a local socket: a UNIX socket path or a TCP address.
type Endpoint struct {
	// Network is "unix" or "tcp".
	Network string
	// Address is the socket path for "unix", host:port for "tcp".
	Address string
}

// String returns the endpoint in the form ParseEndpoint reads ("session"
// for SessionSocket).
func (e Endpoint) String() string {
	if e == SessionSocket {
		return "session"
	}
	return e.Network + ":" + e.Address
}

// URI returns the endpoint as QEMU's migrate command takes it
// ("unix:/path" or "tcp:host:port").
func (e Endpoint) URI() string { return e.String() }

// ParseEndpoint reads "unix:PATH" or "tcp:HOST:PORT". A UNIX path must be
// absolute; a TCP address needs a host and a numeric port.
func ParseEndpoint(s string) (Endpoint, error) {
	network, addr, ok := strings.Cut(s, ":")
	if !ok {
		return Endpoint{}, fmt.Errorf("endpoint %q: want unix:PATH or tcp:HOST:PORT", s)
	}
	switch network {
	case "unix":
		if !strings.HasPrefix(addr, "/") {
			return Endpoint{}, fmt.Errorf("endpoint %q: the UNIX socket path must be absolute", s)
		}
		if strings.ContainsRune(addr, 0) {
			return Endpoint{}, fmt.Errorf("endpoint %q: the path contains a NUL byte", s)
		}
		if len(addr) > 107 {
			return Endpoint{}, fmt.Errorf("endpoint %q: the path is longer than a UNIX socket address allows (107 bytes)", s)
		}
	case "tcp":
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			return Endpoint{}, fmt.Errorf("endpoint %q: %v", s, err)
		}
		if err := checkHostPort(host, port); err != nil {
			return Endpoint{}, fmt.Errorf("endpoint %q: %w", s, err)
		}
	default:
		return Endpoint{}, fmt.Errorf("endpoint %q: unknown network %q (want unix or tcp)", s, network)
	}
	return Endpoint{Network: network, Address: addr}, nil
}

func checkHostPort(host, port string) error {
	if host == "" {
		return errors.New("missing host")
	}
	if strings.ContainsAny(host, " /\x00") {
		return fmt.Errorf("bad host %q", host)
	}
	p := 0
	for _, c := range port {
		if c < '0' || c > '9' || p > 65535 {
			return fmt.Errorf("bad port %q", port)
		}
		p = p*10 + int(c-'0')
	}
	if port == "" || p > 65535 {
		return fmt.Errorf("bad port %q", port)
	}
	return nil
}

// Route maps a channel to the local endpoint its streams are delivered to on
// the destination host.
type Route struct {
	Channel string
	Target  Endpoint
}

// SessionSocket is the target of a route that delivers each session's
// streams to a UNIX socket named after the session, in this host's own
// socket directory: <socket-dir>/<first 12 hex digits of the ID>-<channel>.sock,
// the same name the source's session listener has. libvirt's UNIX-socket
// migration needs this: it makes the destination QEMU listen on the path the
// source QEMU connects to. The name is built here from the session ID and a
// validated channel name; no path comes from the wire.
var SessionSocket = Endpoint{Network: "session"}

// ParseRoute reads "CHANNEL=unix:PATH", "CHANNEL=tcp:HOST:PORT" or
// "CHANNEL=session" (see SessionSocket).
func ParseRoute(s string) (Route, error) {
	ch, target, ok := strings.Cut(s, "=")
	if !ok {
		return Route{}, fmt.Errorf("route %q: want CHANNEL=unix:PATH or CHANNEL=tcp:HOST:PORT", s)
	}
	if !tunnel.ValidChannel(ch) {
		return Route{}, fmt.Errorf("route %q: bad channel name %q (1-%d of a-z 0-9 - _ .)", s, ch, tunnel.MaxChannelLen)
	}
	if target == "session" {
		return Route{Channel: ch, Target: SessionSocket}, nil
	}
	ep, err := ParseEndpoint(target)
	if err != nil {
		return Route{}, fmt.Errorf("route %q: %w", s, err)
	}
	return Route{Channel: ch, Target: ep}, nil
}

// Forward is a local listener on the source host whose connections become
// streams of a channel to a peer.
type Forward struct {
	Listen  Endpoint
	Peer    string // host:port of the peer's migtun
	Channel string
}

// String returns the forward in the form ParseForward reads.
func (f Forward) String() string { return f.Listen.String() + "=" + f.Peer + "/" + f.Channel }

// ParseForward reads "unix:PATH=PEERHOST:PORT/CHANNEL" or
// "tcp:HOST:PORT=PEERHOST:PORT/CHANNEL".
func ParseForward(s string) (Forward, error) {
	i := strings.LastIndex(s, "=")
	if i < 0 {
		return Forward{}, fmt.Errorf("forward %q: want unix:PATH=PEERHOST:PORT/CHANNEL", s)
	}
	listen, rest := s[:i], s[i+1:]
	peer, ch, ok := strings.Cut(rest, "/")
	if !ok {
		return Forward{}, fmt.Errorf("forward %q: missing /CHANNEL after the peer address", s)
	}
	ep, err := ParseEndpoint(listen)
	if err != nil {
		return Forward{}, fmt.Errorf("forward %q: %w", s, err)
	}
	host, port, err := net.SplitHostPort(peer)
	if err != nil {
		return Forward{}, fmt.Errorf("forward %q: peer %q: %v", s, peer, err)
	}
	if err := checkHostPort(host, port); err != nil {
		return Forward{}, fmt.Errorf("forward %q: peer %q: %w", s, peer, err)
	}
	if !tunnel.ValidChannel(ch) {
		return Forward{}, fmt.Errorf("forward %q: bad channel name %q (1-%d of a-z 0-9 - _ .)", s, ch, tunnel.MaxChannelLen)
	}
	return Forward{Listen: ep, Peer: peer, Channel: ch}, nil
}

// dial connects to e within timeout.
func (e Endpoint) dial(ctx context.Context, timeout time.Duration) (net.Conn, error) {
	d := net.Dialer{Timeout: timeout}
	return d.DialContext(ctx, e.Network, e.Address)
}

// listen opens a listener on e. A stale UNIX socket file (nothing listening
// on it) is replaced; a live one or any other kind of file is an error. The
// socket file is removed when the listener is closed.
func (e Endpoint) listen() (net.Listener, error) {
	if e.Network == "unix" {
		if fi, err := os.Lstat(e.Address); err == nil {
			if fi.Mode().Type() != os.ModeSocket {
				return nil, fmt.Errorf("listening on %s: %s exists and is not a socket", e, e.Address)
			}
			// Our own configured path: if a connect succeeds, someone is
			// serving it and we must not steal it.
			if c, err := net.DialTimeout("unix", e.Address, time.Second); err == nil {
				c.Close()
				return nil, fmt.Errorf("listening on %s: another process is listening there", e)
			}
			if err := os.Remove(e.Address); err != nil {
				return nil, fmt.Errorf("listening on %s: removing stale socket: %w", e, err)
			}
		}
	}
	ln, err := net.Listen(e.Network, e.Address)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", e, err)
	}
	return ln, nil
}
