package tunnel

import (
	"context"
	"crypto/hmac"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
)

// Dialer opens streams to peers. It keeps one QUIC connection per peer and,
// for plain streams, the key agreed with each peer. It is safe for
// concurrent use.
type Dialer struct {
	cfg *Config

	mu        sync.Mutex
	quicConns map[string]*quicPeer
	plainKeys map[string]*clientKey
	udp       *quic.Transport
	udpConn   *net.UDPConn // under udp; quic.Transport does not close it
	closed    bool

	// dialing bounds the TCP connections in their connect and TLS
	// handshake at once, so that a burst (many striped streams) stays
	// within what a peer takes in its handshake (MaxHandshakes) instead of
	// being reset there.
	dialing chan struct{}
	// gather serializes reserving the dials of a striped stream's lanes,
	// so that each stream's lanes dial together and reach the peer within
	// its handshake timeout, rather than interleave with other streams'.
	gather sync.Mutex
}

// maxDialing is Dialer.dialing's bound: a quarter of a peer's default
// handshake limit, so four hosts may burst at one peer at once.
const maxDialing = DefaultMaxHandshakes / 4

// quicPeer is the QUIC connection to one peer, or the dial that makes it.
type quicPeer struct {
	ready chan struct{} // closed when conn or err is set
	conn  *quic.Conn
	err   error
}

// NewDialer returns a Dialer for cfg.
func NewDialer(cfg *Config) (*Dialer, error) {
	c, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	return &Dialer{cfg: c, quicConns: make(map[string]*quicPeer), plainKeys: make(map[string]*clientKey),
		dialing: make(chan struct{}, maxDialing)}, nil
}

// ErrDialerClosed is returned by Open after Close.
var ErrDialerClosed = errors.New("tunnel: dialer closed")

// Open opens a stream to the peer at addr ("host:port"), sends h, and waits
// for the peer to accept it. A refusal is returned as a *RefusedError. With
// Config.Stripes above 1, a tls data stream is striped (OpenStriped).
func (d *Dialer) Open(ctx context.Context, addr string, h Header) (Stream, error) {
	if h.Kind != KindData && h.Kind != KindControl {
		return nil, fmt.Errorf("tunnel: cannot open a %s stream", h.Kind)
	}
	if h.Kind == KindData && d.cfg.Stripes > 1 {
		return d.OpenStriped(ctx, addr, h, d.cfg.Stripes)
	}
	return d.openOne(ctx, addr, h)
}

// openOne opens a stream that is not striped.
func (d *Dialer) openOne(ctx context.Context, addr string, h Header) (Stream, error) {
	wire, err := h.AppendBinary(make([]byte, 0, MaxHeaderLen))
	if err != nil {
		return nil, err
	}
	switch {
	case d.cfg.Transport == QUIC:
		return d.openQUIC(ctx, addr, wire)
	case d.cfg.Transport == Plain && h.Kind == KindControl:
		// Control messages carry session secrets: they always travel
		// encrypted, over TLS on the same port.
		return d.openTLS(ctx, addr, h.Kind, wire)
	case d.cfg.Transport == Plain:
		s, err := d.openPlain(ctx, addr, wire)
		if errors.Is(err, &RefusedError{Reason: ReasonUnauthorized}) {
			// The peer may have restarted and forgotten our key: agree on a
			// new one and try once more.
			d.forgetPlainKey(addr)
			s, err = d.openPlain(ctx, addr, wire)
		}
		return s, err
	default:
		return d.openTLS(ctx, addr, h.Kind, wire)
	}
}

// Close closes the QUIC connections. Streams already open are aborted with
// their connection.
func (d *Dialer) Close() error {
	d.mu.Lock()
	d.closed = true
	peers := d.quicConns
	d.quicConns = map[string]*quicPeer{}
	udp, udpConn := d.udp, d.udpConn
	d.mu.Unlock()
	for _, p := range peers {
		<-p.ready
		if p.conn != nil {
			p.conn.CloseWithError(0, "closing")
		}
	}
	if udp != nil {
		err := udp.Close()
		if cerr := udpConn.Close(); err == nil {
			err = cerr
		}
		return err
	}
	return nil
}

func (d *Dialer) dialTCP(ctx context.Context, addr string) (*net.TCPConn, error) {
	nd := net.Dialer{Timeout: d.cfg.DialTimeout, KeepAliveConfig: keepAlive(d.cfg.IdleTimeout), Control: d.cfg.tcpControl()}
	c, err := nd.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dialing peer %s: %w", addr, err)
	}
	tc := c.(*net.TCPConn)
	_ = setUserTimeout(tc, userTimeout(d.cfg.IdleTimeout))
	return tc, nil
}

// handshake runs a client TLS handshake on c under the handshake timeout.
func (d *Dialer) handshake(ctx context.Context, c net.Conn, addr string) (*tls.Conn, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		c.Close()
		return nil, err
	}
	pc := &tcpConn{TCPConn: c.(*net.TCPConn), bounded: boundTLSReads && !d.cfg.DisableBulk}
	tc := tls.Client(pc, d.cfg.clientTLS(host, true))
	hctx, cancel := context.WithTimeout(ctx, d.cfg.HandshakeTimeout)
	defer cancel()
	start := time.Now()
	if err := tc.HandshakeContext(hctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("tls handshake with %s: %w", addr, err)
	}
	d.cfg.OnHandshake(TLS, "out", time.Since(start))
	d.cfg.logHandshake(TLS, "out", c.RemoteAddr(), tc.ConnectionState())
	switch p := tc.ConnectionState().NegotiatedProtocol; {
	case p == ALPN:
		pc.bounded = false // no bulk record layer: let crypto/tls read ahead
	case p == ALPNBulk && !d.cfg.DisableBulk:
	default:
		c.Close()
		return nil, fmt.Errorf("tls handshake with %s: peer speaks %q, want %q", addr, p, ALPN)
	}
	return tc, nil
}

// testHookBeforeReply, when set by a test, runs after a header was sent and
// before its reply is read.
var testHookBeforeReply func()

// exchange writes a header on s and reads the reply under the reply timeout.
func (d *Dialer) exchange(ctx context.Context, s Stream, wire []byte) (reply, error) {
	deadline := time.Now().Add(d.cfg.ReplyTimeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	_ = s.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = s.SetDeadline(time.Now()) })
	defer stop()
	if _, err := s.Write(wire); err != nil {
		return reply{}, fmt.Errorf("sending header: %w", err)
	}
	if testHookBeforeReply != nil {
		testHookBeforeReply()
	}
	r, err := readReply(s)
	if err != nil {
		return reply{}, err
	}
	if err := r.err(); err != nil {
		return r, err
	}
	if !stop() {
		return reply{}, ctx.Err()
	}
	_ = s.SetDeadline(time.Time{})
	return r, nil
}

// reserveDials takes n of the maxDialing dials, all at once.
func (d *Dialer) reserveDials(ctx context.Context, addr string, n int) error {
	d.gather.Lock()
	defer d.gather.Unlock()
	for i := range n {
		select {
		case d.dialing <- struct{}{}:
		case <-ctx.Done():
			for range i {
				<-d.dialing
			}
			return fmt.Errorf("dialing peer %s: %w", addr, ctx.Err())
		}
	}
	return nil
}

// dialTLS connects to addr and runs the TLS handshake, at most maxDialing
// at once.
func (d *Dialer) dialTLS(ctx context.Context, addr string) (*tlsStream, error) {
	if err := d.reserveDials(ctx, addr, 1); err != nil {
		return nil, err
	}
	return d.dialTLSReserved(ctx, addr)
}

// dialTLSReserved is dialTLS for a dial already reserved, which it gives
// back once the handshake is over.
func (d *Dialer) dialTLSReserved(ctx context.Context, addr string) (*tlsStream, error) {
	defer func() { <-d.dialing }()
	c, err := d.dialTCP(ctx, addr)
	if err != nil {
		return nil, err
	}
	tc, err := d.handshake(ctx, c, addr)
	if err != nil {
		return nil, err
	}
	return &tlsStream{Conn: tc}, nil
}

// openTLS opens a stream of kind over TLS. A data stream on a connection
// that negotiated ALPNBulk switches to the bulk record layer once the
// reply is read.
func (d *Dialer) openTLS(ctx context.Context, addr string, kind Kind, wire []byte) (Stream, error) {
	if err := d.reserveDials(ctx, addr, 1); err != nil {
		return nil, err
	}
	return d.openTLSReserved(ctx, addr, kind, wire)
}

// openTLSReserved is openTLS for a dial already reserved.
func (d *Dialer) openTLSReserved(ctx context.Context, addr string, kind Kind, wire []byte) (Stream, error) {
	s, err := d.dialTLSReserved(ctx, addr)
	if err != nil {
		return nil, err
	}
	if _, err := d.exchange(ctx, s, wire); err != nil {
		s.Abort()
		return nil, err
	}
	pc := s.NetConn().(*tcpConn)
	if kind != KindData || s.ConnectionState().NegotiatedProtocol != ALPNBulk {
		pc.bounded = false
		return s, nil
	}
	bs, err := newBulkStream(s, true)
	if err != nil {
		s.Abort()
		return nil, err
	}
	return bs, nil
}

func (d *Dialer) openPlain(ctx context.Context, addr string, wire []byte) (Stream, error) {
	key, err := d.plainKey(ctx, addr)
	if err != nil {
		return nil, err
	}
	c, err := d.dialTCP(ctx, addr)
	if err != nil {
		return nil, err
	}
	s := &plainStream{TCPConn: c}
	signed := append([]byte(nil), wire...)
	mac := key.sign(signed)
	r, err := d.exchange(ctx, s, signed)
	if err != nil {
		s.Abort()
		return nil, err
	}
	if !hmac.Equal(r.payload, acceptMAC(key.key, mac)) {
		s.Abort()
		return nil, &RefusedError{Reason: ReasonUnauthorized, Detail: "peer did not prove it holds the plain key"}
	}
	return s, nil
}

// plainKey returns the key agreed with the peer at addr, agreeing on one
// over TLS first if there is none.
func (d *Dialer) plainKey(ctx context.Context, addr string) (*clientKey, error) {
	d.mu.Lock()
	k := d.plainKeys[addr]
	d.mu.Unlock()
	if k != nil {
		return k, nil
	}
	s, err := d.dialTLS(ctx, addr)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	h := Header{Kind: KindPlainKey, Channel: "plain-key"}
	wire, _ := h.AppendBinary(nil)
	r, err := d.exchange(ctx, s, wire)
	if err != nil {
		return nil, fmt.Errorf("agreeing on a plain key with %s: %w", addr, err)
	}
	if len(r.payload) != keyIDLen {
		return nil, fmt.Errorf("agreeing on a plain key with %s: key ID of %d bytes", addr, len(r.payload))
	}
	k = &clientKey{id: plainKeyID(r.payload)}
	if k.key, err = exportPlainKey(s.ConnectionState(), k.id); err != nil {
		return nil, err
	}
	d.mu.Lock()
	d.plainKeys[addr] = k
	d.mu.Unlock()
	return k, nil
}

func (d *Dialer) forgetPlainKey(addr string) {
	d.mu.Lock()
	delete(d.plainKeys, addr)
	d.mu.Unlock()
}

func (d *Dialer) openQUIC(ctx context.Context, addr string, wire []byte) (Stream, error) {
	for attempt := 0; ; attempt++ {
		conn, err := d.quicConn(ctx, addr)
		if err != nil {
			return nil, err
		}
		octx, cancel := context.WithTimeout(ctx, d.cfg.ReplyTimeout)
		qs, err := conn.OpenStreamSync(octx)
		cancel()
		if err != nil {
			d.dropQUIC(addr, conn)
			if attempt == 0 && conn.Context().Err() != nil {
				continue // the connection had died: dial a new one
			}
			return nil, fmt.Errorf("opening quic stream to %s: %w", addr, err)
		}
		s := &quicStream{Stream: qs, conn: conn}
		if _, err := d.exchange(ctx, s, wire); err != nil {
			s.Abort()
			if attempt == 0 && conn.Context().Err() != nil {
				d.dropQUIC(addr, conn)
				continue
			}
			return nil, err
		}
		return s, nil
	}
}

// quicConn returns the live QUIC connection to addr, dialing one if needed.
// Concurrent callers share one dial.
func (d *Dialer) quicConn(ctx context.Context, addr string) (*quic.Conn, error) {
	for {
		d.mu.Lock()
		if d.closed {
			d.mu.Unlock()
			return nil, ErrDialerClosed
		}
		p := d.quicConns[addr]
		if p == nil {
			return d.newQUICConn(ctx, addr) // unlocks d.mu
		}
		d.mu.Unlock()
		select {
		case <-p.ready:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if p.err != nil {
			return nil, p.err
		}
		if p.conn.Context().Err() == nil {
			return p.conn, nil
		}
		d.dropQUIC(addr, p.conn)
	}
}

// newQUICConn dials addr and records the connection. It is called with d.mu
// held and releases it.
func (d *Dialer) newQUICConn(ctx context.Context, addr string) (*quic.Conn, error) {
	if d.udp == nil {
		udp, err := net.ListenUDP("udp", nil)
		if err != nil {
			d.mu.Unlock()
			return nil, fmt.Errorf("opening udp socket: %w", err)
		}
		d.udp = &quic.Transport{Conn: udp}
		d.udpConn = udp
	}
	tr := d.udp
	p := &quicPeer{ready: make(chan struct{})}
	d.quicConns[addr] = p
	d.mu.Unlock()

	p.conn, p.err = d.dialQUIC(ctx, tr, addr)
	close(p.ready)
	if p.err != nil {
		d.mu.Lock()
		if d.quicConns[addr] == p {
			delete(d.quicConns, addr)
		}
		d.mu.Unlock()
		return nil, p.err
	}
	return p.conn, nil
}

func (d *Dialer) dialQUIC(ctx context.Context, tr *quic.Transport, addr string) (*quic.Conn, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	udpAddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("resolving %s: %w", addr, err)
	}
	dctx, cancel := context.WithTimeout(ctx, d.cfg.DialTimeout+d.cfg.HandshakeTimeout)
	defer cancel()
	start := time.Now()
	conn, err := tr.Dial(dctx, udpAddr, d.cfg.clientTLS(host, false), quicConfig(d.cfg))
	if err != nil {
		return nil, fmt.Errorf("quic handshake with %s: %w", addr, err)
	}
	d.cfg.OnHandshake(QUIC, "out", time.Since(start))
	d.cfg.logHandshake(QUIC, "out", conn.RemoteAddr(), conn.ConnectionState().TLS)
	return conn, nil
}

// dropQUIC forgets the connection to addr if it is conn, so the next Open
// dials again.
func (d *Dialer) dropQUIC(addr string, conn *quic.Conn) {
	d.mu.Lock()
	defer d.mu.Unlock()
	p := d.quicConns[addr]
	if p == nil {
		return
	}
	select {
	case <-p.ready:
		if p.conn == conn {
			delete(d.quicConns, addr)
		}
	default:
	}
}

// quicConfig sizes QUIC for bulk transfer: large flow-control windows so one
// stream can fill a fast link, keepalives so a dead peer is noticed.
func quicConfig(c *Config) *quic.Config {
	return &quic.Config{
		HandshakeIdleTimeout:           c.HandshakeTimeout,
		MaxIdleTimeout:                 c.IdleTimeout,
		KeepAlivePeriod:                c.IdleTimeout / 3,
		InitialStreamReceiveWindow:     4 << 20,
		MaxStreamReceiveWindow:         64 << 20,
		InitialConnectionReceiveWindow: 8 << 20,
		MaxConnectionReceiveWindow:     256 << 20,
		MaxIncomingStreams:             4096,
	}
}

// userTimeout is how long sent data may stay unacknowledged on a tunnel
// TCP connection: three idle timeouts.
func userTimeout(idle time.Duration) time.Duration { return 3 * idle }

// keepAlive is the TCP keepalive of tunnel connections: a peer silent for
// idle is probed three times a third of idle apart, so a dead peer of an
// idle or receiving connection is noticed within about twice idle.
func keepAlive(idle time.Duration) net.KeepAliveConfig {
	return net.KeepAliveConfig{Enable: true, Idle: idle, Interval: idle / 3, Count: 3}
}
