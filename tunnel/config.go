package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"
)

// Transport names how streams cross the network between peers.
type Transport string

const (
	// TLS carries each stream as its own TLS 1.3 connection over TCP.
	TLS Transport = "tls"
	// QUIC carries each stream as a QUIC stream of one connection per peer.
	QUIC Transport = "quic"
	// Plain carries each stream as a TCP connection without encryption. The
	// peer is still authenticated: a key agreed over TLS signs every header.
	Plain Transport = "plain"
)

// ParseTransport parses "tls", "quic" or "plain".
func ParseTransport(s string) (Transport, error) {
	switch t := Transport(s); t {
	case TLS, QUIC, Plain:
		return t, nil
	}
	return "", fmt.Errorf("unknown transport %q (want tls, quic or plain)", s)
}

// Defaults of the Config durations.
const (
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultDialTimeout      = 5 * time.Second
	DefaultReplyTimeout     = 15 * time.Second
	// DefaultIdleTimeout lets a QUIC migration whose peer died fail within
	// about 4 seconds, as QEMU's source should learn quickly.
	DefaultIdleTimeout = 4 * time.Second
)

// DefaultSocketBuffer is the send and receive buffer of each tunnel TCP
// connection when Config.SocketBuffer is 0: enough for one stream to fill
// 1 Gbit/s over a 100ms round trip (12.5 MB in flight) with room for the
// queue of a router, where the kernel's autotuning stops at its limits
// (net.ipv4.tcp_wmem, often 4 MiB). The kernel allocates it only as data
// waits, and doubles the figure for its bookkeeping.
const DefaultSocketBuffer = 16 << 20

// CongestionKernel as Config.Congestion keeps the host's default TCP
// congestion control (net.ipv4.tcp_congestion_control).
const CongestionKernel = "kernel"

// Config configures both ends of the transport. The zero value of each field
// selects its default, except the TLS fields, which are required.
type Config struct {
	// Transport selects what Listen serves and what Dialer uses; default TLS.
	Transport Transport
	// ServerTLS authenticates this host to peers and peers to it (mutual TLS).
	// Its NextProtos are replaced by ALPN. Required for every transport:
	// plain uses it to agree on the keys that authenticate its streams.
	ServerTLS *tls.Config
	// ClientTLS returns the TLS configuration used to reach the peer whose
	// host (name or IP, without port) is serverName. Required.
	ClientTLS func(serverName string) *tls.Config
	// AllowPlaintext must be true to serve or dial the Plain transport.
	AllowPlaintext bool
	// DisableBulk keeps tls data streams inside crypto/tls records instead
	// of switching them to the bulk record layer (ALPNBulk) after the
	// accept reply; for comparison, or for a peer that must not use it.
	DisableBulk bool
	// Congestion is the TCP congestion control of the tunnel's TCP
	// connections, dialed and accepted (TCP_CONGESTION, per socket). Empty
	// picks bbr when the kernel has it — it holds the rate of a long path
	// with some loss, where cubic and reno back off at every loss — and the
	// host's default otherwise; CongestionKernel keeps the host's default;
	// any other name (cubic, reno, bbr) must be available in the kernel.
	Congestion string
	// SocketBuffer is the send and receive buffer of each tunnel TCP
	// connection in bytes: 0 means DefaultSocketBuffer, negative leaves
	// both to the kernel's autotuning. With CAP_NET_ADMIN it may exceed
	// net.core.wmem_max and rmem_max (SO_SNDBUFFORCE); without, the
	// kernel caps it there.
	SocketBuffer int
	// Stripes, above 1, stripes every data stream a Dialer opens over tls
	// across this many TCP connections to the peer (see OpenStriped), at
	// most MaxStripes: where one connection is held by its window (buffers
	// the kernel caps, a long path) or by a per-flow limit of the network,
	// a stream then gets the sum of its lanes. The peer must be of a
	// release that knows striping.
	Stripes int
	// HandshakeTimeout bounds the TLS or QUIC handshake plus the header read
	// of an incoming stream.
	HandshakeTimeout time.Duration
	// DialTimeout bounds connecting to a peer (a dropped SYN fails in this time).
	DialTimeout time.Duration
	// ReplyTimeout bounds waiting for the peer to accept or refuse a stream,
	// which includes the peer's own local connect.
	ReplyTimeout time.Duration
	// IdleTimeout is how long a QUIC connection may go without hearing from
	// the peer before it is declared dead (keepalives are sent at a third of
	// it); for TCP it is the keepalive idle time, with three probes a third
	// of it apart, and sent data unacknowledged for three times it ends the
	// connection (TCP_USER_TIMEOUT).
	IdleTimeout time.Duration
	// MaxHandshakes bounds the incoming TCP connections that have not yet
	// finished their handshake and header, each holding a descriptor and a
	// goroutine for up to HandshakeTimeout; more are closed at once and
	// refused with ReasonLimit. Default 256. (quic-go bounds its own.)
	MaxHandshakes int
	// Logger receives a line per refused stream (at most one a second for
	// each reason, with a count of those left out) and, at debug level, one
	// per handshake naming the certificate the peer presented; nil discards.
	Logger *slog.Logger
	// OnRefused, when set, is called once for every incoming stream refused by
	// this package (malformed, timed out, unauthorized) before the owner sees it.
	OnRefused func(Reason)
	// OnHandshake, when set, is called for every TLS or QUIC handshake that
	// succeeds, with the transport, "in" or "out", and how long it took (-1
	// when not known: quic-go completes incoming handshakes by itself).
	OnHandshake func(t Transport, direction string, took time.Duration)
}

// DefaultMaxHandshakes is the default of Config.MaxHandshakes.
const DefaultMaxHandshakes = 256

// ErrNoTLS is returned when a Config lacks its TLS settings.
var ErrNoTLS = errors.New("tunnel: ServerTLS and ClientTLS are required")

// withDefaults returns a copy of c with every zero field set to its default,
// or an error if c cannot work.
func (c *Config) withDefaults() (*Config, error) {
	var out Config
	if c != nil {
		out = *c
	}
	if out.Transport == "" {
		out.Transport = TLS
	}
	if _, err := ParseTransport(string(out.Transport)); err != nil {
		return nil, err
	}
	if out.Transport == Plain && !out.AllowPlaintext {
		return nil, errors.New("tunnel: the plain transport needs AllowPlaintext (--insecure-plaintext)")
	}
	if out.ServerTLS == nil || out.ClientTLS == nil {
		return nil, ErrNoTLS
	}
	if err := checkCongestion(out.Congestion); err != nil {
		return nil, err
	}
	if out.SocketBuffer == 0 {
		out.SocketBuffer = DefaultSocketBuffer
	}
	if out.Stripes < 0 || out.Stripes > MaxStripes {
		return nil, fmt.Errorf("tunnel: %d stripes: want 0 or 1 (none) to %d", out.Stripes, MaxStripes)
	}
	if out.HandshakeTimeout <= 0 {
		out.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if out.DialTimeout <= 0 {
		out.DialTimeout = DefaultDialTimeout
	}
	if out.ReplyTimeout <= 0 {
		out.ReplyTimeout = DefaultReplyTimeout
	}
	if out.IdleTimeout <= 0 {
		out.IdleTimeout = DefaultIdleTimeout
	}
	if out.MaxHandshakes <= 0 {
		out.MaxHandshakes = DefaultMaxHandshakes
	}
	if out.Logger == nil {
		out.Logger = slog.New(slog.DiscardHandler)
	}
	if out.OnRefused == nil {
		out.OnRefused = func(Reason) {}
	}
	if out.OnHandshake == nil {
		out.OnHandshake = func(Transport, string, time.Duration) {}
	}
	return &out, nil
}

// logHandshake logs, at debug level, a handshake that succeeded and the
// certificate the peer presented (or presented when the resumed session
// was made), so an operator can see a rotated certificate take effect.
func (c *Config) logHandshake(t Transport, direction string, remote net.Addr, cs tls.ConnectionState) {
	if !c.Logger.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	attrs := []slog.Attr{slog.String("transport", string(t)), slog.String("direction", direction),
		slog.String("remote", remote.String()), slog.String("peer", peerName(cs)), slog.Bool("resumed", cs.DidResume),
		slog.String("alpn", cs.NegotiatedProtocol)}
	if len(cs.PeerCertificates) > 0 {
		leaf := cs.PeerCertificates[0]
		attrs = append(attrs, slog.String("peer_serial", leaf.SerialNumber.Text(16)),
			slog.Time("peer_not_after", leaf.NotAfter.UTC()))
	}
	c.Logger.LogAttrs(context.Background(), slog.LevelDebug, "tunnel handshake", attrs...)
}

// nextProtos returns the ALPN protocols to offer or accept, most preferred
// first. Only TCP (not QUIC) has the bulk record layer.
func (c *Config) nextProtos(tcp bool) []string {
	if tcp && !c.DisableBulk {
		return []string{ALPNBulk, ALPN}
	}
	return []string{ALPN}
}

// serverTLS returns the server TLS configuration with migtun's ALPN and
// TLS 1.3 as the only version; tcp says whether it serves TCP or QUIC.
// A configuration that GetConfigForClient returns for a handshake gets the
// same settings.
func (c *Config) serverTLS(tcp bool) *tls.Config {
	t := c.pinTLS(c.ServerTLS, tcp)
	if get := t.GetConfigForClient; get != nil {
		t.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			h, err := get(hello)
			if h == nil || err != nil {
				return h, err
			}
			return c.pinTLS(h, tcp), nil
		}
	}
	return t
}

// pinTLS returns a copy of t with migtun's ALPN and TLS 1.3 only.
func (c *Config) pinTLS(t *tls.Config, tcp bool) *tls.Config {
	t = t.Clone()
	t.NextProtos = c.nextProtos(tcp)
	t.MinVersion = tls.VersionTLS13
	t.MaxVersion = tls.VersionTLS13
	return t
}

func (c *Config) clientTLS(serverName string, tcp bool) *tls.Config {
	t := c.ClientTLS(serverName)
	if t == nil {
		return nil
	}
	return c.pinTLS(t, tcp)
}
