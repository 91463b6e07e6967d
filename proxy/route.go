package proxy

import (
	"fmt"
	"strings"

	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/tunnel"
)

// Route maps a channel to the local endpoint its streams are delivered to on
// the destination host.
type Route struct {
	Channel string
	Target  endpoint.Endpoint
}

// String returns the route in the form ParseRoute reads.
func (r Route) String() string { return r.Channel + "=" + targetString(r.Target) }

// SessionSocket is the target of a route that delivers each session's
// streams to a UNIX socket named after the session, in this host's own
// socket directory: <socket-dir>/<first 12 hex digits of the ID>-<channel>.sock,
// the same name the source's session listener has. libvirt's UNIX-socket
// migration needs this: it makes the destination QEMU listen on the path the
// source QEMU connects to. The name is built here from the session ID and a
// validated channel name; no path comes from the wire.
var SessionSocket = endpoint.Endpoint{Network: "session"}

// targetString writes a route target: "session" for SessionSocket, else
// the endpoint.
func targetString(ep endpoint.Endpoint) string {
	if ep == SessionSocket {
		return "session"
	}
	return ep.String()
}

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
	ep, err := endpoint.Parse(target)
	if err != nil {
		return Route{}, fmt.Errorf("route %q: %w", s, err)
	}
	return Route{Channel: ch, Target: ep}, nil
}

// Forward is a local listener on the source host whose connections become
// streams of a channel to a peer.
type Forward struct {
	Listen  endpoint.Endpoint
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
	ep, err := endpoint.Parse(listen)
	if err != nil {
		return Forward{}, fmt.Errorf("forward %q: %w", s, err)
	}
	if err := endpoint.CheckHostPort(peer); err != nil {
		return Forward{}, fmt.Errorf("forward %q: peer %q: %w", s, peer, err)
	}
	if !tunnel.ValidChannel(ch) {
		return Forward{}, fmt.Errorf("forward %q: bad channel name %q (1-%d of a-z 0-9 - _ .)", s, ch, tunnel.MaxChannelLen)
	}
	return Forward{Listen: ep, Peer: peer, Channel: ch}, nil
}
