// Package endpoint is the one type of a local socket address in migtun: a
// UNIX socket path or a TCP address, written "unix:PATH" or
// "tcp:HOST:PORT". Routes, forwards, control endpoints, QMP sockets and
// QEMU's migration URIs all use it, so the form is parsed in one place.
//
//	ep, err := endpoint.Parse("unix:/run/migtun/control.sock")
//	ln, err := ep.Listen()      // a stale socket file is replaced, a live one refused
//	c, err := ep.Dial(ctx, 5*time.Second)
package endpoint

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"
)

// Endpoint is a local socket: a UNIX socket path or a TCP address.
type Endpoint struct {
	// Network is "unix" or "tcp".
	Network string
	// Address is the socket path for "unix", host:port for "tcp".
	Address string
}

// Unix returns the endpoint of a UNIX socket path.
func Unix(path string) Endpoint { return Endpoint{Network: "unix", Address: path} }

// TCP returns the endpoint of a TCP host:port.
func TCP(addr string) Endpoint { return Endpoint{Network: "tcp", Address: addr} }

// String returns the endpoint in the form Parse reads. It is also QEMU's
// form of a migration URI ("unix:/path", "tcp:host:port").
func (e Endpoint) String() string { return e.Network + ":" + e.Address }

// IsZero reports whether e is the zero Endpoint.
func (e Endpoint) IsZero() bool { return e == Endpoint{} }

// Parse reads "unix:PATH" or "tcp:HOST:PORT". A UNIX path must be
// absolute; a TCP address needs a host and a numeric port.
func Parse(s string) (Endpoint, error) {
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
		if err := CheckHostPort(addr); err != nil {
			return Endpoint{}, fmt.Errorf("endpoint %q: %w", s, err)
		}
	default:
		return Endpoint{}, fmt.Errorf("endpoint %q: unknown network %q (want unix or tcp)", s, network)
	}
	return Endpoint{Network: network, Address: addr}, nil
}

// ParseUnix reads "unix:PATH" only, for sockets that must be UNIX sockets
// (QMP, the control socket).
func ParseUnix(s string) (Endpoint, error) {
	ep, err := Parse(s)
	if err != nil {
		return Endpoint{}, err
	}
	if ep.Network != "unix" {
		return Endpoint{}, fmt.Errorf("endpoint %q: want unix:PATH", s)
	}
	return ep, nil
}

// CheckHostPort checks a host:port with a non-empty host and a port from 0
// to 65535.
func CheckHostPort(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
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

// Dial connects to e within timeout (0: no bound but ctx's).
func (e Endpoint) Dial(ctx context.Context, timeout time.Duration) (net.Conn, error) {
	d := net.Dialer{Timeout: timeout}
	return d.DialContext(ctx, e.Network, e.Address)
}

// Listen opens a listener on e. A stale UNIX socket file (nothing listening
// on it) is replaced; a live one or any other kind of file is an error. The
// socket file is removed when the listener is closed. The file's mode is
// what the process umask leaves (migtun serve runs under 077).
func (e Endpoint) Listen() (net.Listener, error) {
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
