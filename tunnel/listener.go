package tunnel

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
)

// Incoming is a stream whose header has been read and checked, waiting for
// its owner to accept or refuse it. Exactly one of Accept and Refuse must be
// called.
type Incoming struct {
	// Header is the stream's header.
	Header Header
	// Peer is the authenticated name of the peer (its certificate's common
	// name, or for plain streams the name bound to the key it used).
	Peer string
	// Transport is the transport the stream arrived on.
	Transport Transport

	s        Stream
	payload  []byte       // accept reply payload
	bulk     bool         // a tls data stream that switches to the bulk record layer
	lanes    []*tlsStream // a striped stream's lanes, s the first; nil otherwise
	answered bool
}

// RemoteAddr returns the network address of the peer.
func (in *Incoming) RemoteAddr() net.Addr { return in.s.RemoteAddr() }

// Accept tells the peer the stream is accepted and returns it for use.
func (in *Incoming) Accept() (Stream, error) {
	if in.answered {
		return nil, errors.New("tunnel: stream already answered")
	}
	in.answered = true
	if in.lanes != nil {
		return in.acceptLanes()
	}
	s := in.s
	if in.bulk {
		// Derive the keys before accepting, so a failure can still be
		// refused; no TLS record follows the reply.
		bs, err := newBulkStream(in.s.(*tlsStream), false)
		if err != nil {
			refuse(in.s, err)
			return nil, fmt.Errorf("accepting stream: %w", err)
		}
		s = bs
	}
	b := reply{reason: ReasonOK, payload: in.payload}.appendBinary(make([]byte, 0, MaxReplyLen))
	if _, err := in.s.Write(b); err != nil {
		in.s.Abort()
		return nil, fmt.Errorf("accepting stream: %w", err)
	}
	if err := in.s.SetDeadline(time.Time{}); err != nil {
		in.s.Abort()
		return nil, fmt.Errorf("accepting stream: %w", err)
	}
	return s, nil
}

// Refuse tells the peer why the stream is refused and closes it. The reason
// is taken from err when it is a *RefusedError, else ReasonInternal with
// err's text.
func (in *Incoming) Refuse(err error) {
	if in.answered {
		return
	}
	in.answered = true
	if in.lanes != nil {
		for _, l := range in.lanes {
			refuse(l, err)
		}
		return
	}
	refuse(in.s, err)
}

// refuse writes a refusal reply and closes s.
func refuse(s Stream, err error) {
	var re *RefusedError
	if !errors.As(err, &re) {
		re = &RefusedError{Reason: ReasonInternal, Detail: err.Error()}
	}
	b := reply{reason: re.Reason, payload: []byte(re.Detail)}.appendBinary(make([]byte, 0, MaxReplyLen))
	_ = s.SetWriteDeadline(time.Now().Add(time.Second))
	if _, werr := s.Write(b); werr == nil {
		_ = s.CloseWrite()
	}
	s.Close()
}

// Listener serves the one port of a host: TCP for the tls and plain
// transports, UDP for quic.
type Listener struct {
	cfg  *Config
	tls  *tls.Config // built once, so session tickets resume across streams
	tcp  net.Listener
	quic *quic.Listener
	udp  net.PacketConn
	keys serverKeys

	incoming   chan *Incoming
	handshakes chan struct{} // a slot per TCP connection in its handshake
	lanes      laneGroups
	ctx        context.Context
	cancel     context.CancelFunc
	wg         sync.WaitGroup
	once       sync.Once

	logMu    sync.Mutex
	lastLog  map[Reason]time.Time
	quietLog map[Reason]int
}

// Listen starts serving addr ("host:port") with the transport of cfg.
func Listen(addr string, cfg *Config) (*Listener, error) {
	c, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	l := &Listener{cfg: c, tls: c.serverTLS(c.Transport != QUIC), incoming: make(chan *Incoming), ctx: ctx, cancel: cancel,
		handshakes: make(chan struct{}, c.MaxHandshakes), lastLog: map[Reason]time.Time{}, quietLog: map[Reason]int{},
		lanes: newLaneGroups(c.MaxHandshakes)}
	switch c.Transport {
	case QUIC:
		udp, err := net.ListenPacket("udp", addr)
		if err != nil {
			cancel()
			return nil, fmt.Errorf("listening on udp %s: %w", addr, err)
		}
		ql, err := quic.Listen(udp, l.tls, quicConfig(c))
		if err != nil {
			udp.Close()
			cancel()
			return nil, fmt.Errorf("listening on quic %s: %w", addr, err)
		}
		l.udp, l.quic = udp, ql
		l.wg.Add(1)
		go l.acceptQUIC()
	default:
		lc := net.ListenConfig{Control: c.tcpControl()}
		tcp, err := lc.Listen(context.Background(), "tcp", addr)
		if err != nil {
			cancel()
			return nil, fmt.Errorf("listening on tcp %s: %w", addr, err)
		}
		l.tcp = tcp
		l.wg.Add(1)
		go l.acceptTCP()
	}
	return l, nil
}

// Addr returns the address the listener serves.
func (l *Listener) Addr() net.Addr {
	if l.tcp != nil {
		return l.tcp.Addr()
	}
	return l.udp.LocalAddr()
}

// Accept waits for the next incoming stream.
func (l *Listener) Accept(ctx context.Context) (*Incoming, error) {
	select {
	case in := <-l.incoming:
		return in, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-l.ctx.Done():
		return nil, net.ErrClosed
	}
}

// Close stops accepting, closes streams still in their handshake and every
// QUIC connection, and waits for the listener's goroutines. Streams already
// handed out by Accept are their owners' to close. Close may be called more
// than once.
func (l *Listener) Close() error {
	var err error
	l.once.Do(func() {
		l.cancel()
		l.lanes.closeAll()
		if l.tcp != nil {
			err = l.tcp.Close()
		}
		if l.quic != nil {
			err = l.quic.Close()
			l.udp.Close()
		}
	})
	l.wg.Wait()
	return err
}

// logRefused counts a refusal and logs it, at most once a second for each
// reason: an unauthenticated flood must not flood the log too.
func (l *Listener) logRefused(remote net.Addr, err error) {
	r := ReasonOf(err)
	l.cfg.OnRefused(r)
	l.logMu.Lock()
	now := time.Now()
	if now.Sub(l.lastLog[r]) < time.Second {
		l.quietLog[r]++
		l.logMu.Unlock()
		return
	}
	quiet := l.quietLog[r]
	l.lastLog[r], l.quietLog[r] = now, 0
	l.logMu.Unlock()
	attrs := []any{slog.String("remote", remote.String()), slog.String("reason", r.String()), slog.String("err", err.Error())}
	if quiet > 0 {
		attrs = append(attrs, slog.Int("suppressed", quiet))
	}
	l.cfg.Logger.Warn("stream refused", attrs...)
}

// deliver hands in to Accept, or closes it if the listener is closing.
func (l *Listener) deliver(in *Incoming) {
	// The owner answers after its own local connect, bounded by DialTimeout;
	// the deadline stays until it does.
	_ = in.s.SetDeadline(time.Now().Add(l.cfg.ReplyTimeout))
	for _, s := range in.lanes {
		_ = s.SetDeadline(time.Now().Add(l.cfg.ReplyTimeout))
	}
	select {
	case l.incoming <- in:
	case <-l.ctx.Done():
		in.Refuse(&RefusedError{Reason: ReasonShuttingDown})
	}
}

func (l *Listener) acceptTCP() {
	defer l.wg.Done()
	var backoff time.Duration
	for {
		c, err := l.tcp.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || l.ctx.Err() != nil {
				return
			}
			// Out of descriptors or similar: wait and go on.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			l.cfg.Logger.Error("accept failed", slog.String("err", err.Error()))
			select {
			case <-time.After(backoff):
			case <-l.ctx.Done():
				return
			}
			continue
		}
		backoff = 0
		tc := c.(*net.TCPConn)
		select {
		case l.handshakes <- struct{}{}:
		default:
			// Too many connections in their handshake: refuse at once,
			// before any TLS work, rather than queue.
			tc.SetLinger(0)
			tc.Close()
			l.logRefused(tc.RemoteAddr(), &RefusedError{Reason: ReasonLimit, Detail: "too many connections in their handshake"})
			continue
		}
		_ = tc.SetKeepAliveConfig(keepAlive(l.cfg.IdleTimeout))
		_ = setUserTimeout(tc, userTimeout(l.cfg.IdleTimeout))
		l.wg.Add(1)
		go l.handshakeTCP(tc)
	}
}

// tlsRecordHandshake is the first byte of a TLS ClientHello.
const tlsRecordHandshake = 0x16

// handshakeTCP authenticates one TCP connection and reads its header.
func (l *Listener) handshakeTCP(c *net.TCPConn) {
	defer l.wg.Done()
	release := sync.OnceFunc(func() { <-l.handshakes })
	defer release()
	stop := context.AfterFunc(l.ctx, func() { c.Close() })
	defer stop()
	_ = c.SetDeadline(time.Now().Add(l.cfg.HandshakeTimeout))
	var first [1]byte
	if _, err := io.ReadFull(c, first[:]); err != nil {
		reason := ReasonMalformed
		if isTimeout(err) {
			reason = ReasonTimeout
		}
		l.logRefused(c.RemoteAddr(), &RefusedError{Reason: reason, Detail: "no header: " + err.Error()})
		c.Close()
		return
	}
	pc := &tcpConn{TCPConn: c, first: first[:], bounded: boundTLSReads && !l.cfg.DisableBulk}
	var in *Incoming
	var err error
	if first[0] == tlsRecordHandshake {
		in, err = l.handshakeTLS(pc, release)
	} else {
		in, err = l.readPlain(pc)
	}
	if err != nil {
		l.logRefused(c.RemoteAddr(), err)
		return
	}
	if in == nil { // handled here (plain key exchange)
		return
	}
	if !stop() { // the listener is closing
		in.Refuse(&RefusedError{Reason: ReasonShuttingDown})
		return
	}
	release() // authenticated: no longer counted while it waits for its owner
	l.deliver(in)
}

// handshakeTLS runs the TLS handshake and reads the header. It returns
// (nil, nil) for a stream it served itself. release gives back the
// connection's handshake slot, for a lane that waits for the others.
func (l *Listener) handshakeTLS(pc *tcpConn, release func()) (*Incoming, error) {
	tc := tls.Server(pc, l.tls)
	s := &tlsStream{Conn: tc}
	start := time.Now()
	if err := tc.HandshakeContext(l.ctx); err != nil {
		pc.Close()
		return nil, &RefusedError{Reason: ReasonHandshake, Detail: err.Error()}
	}
	l.cfg.OnHandshake(TLS, "in", time.Since(start))
	cs := tc.ConnectionState()
	l.cfg.logHandshake(TLS, "in", pc.RemoteAddr(), cs)
	peer := peerName(cs)
	var buf [MaxHeaderLen]byte
	h, _, err := readHeader(tc, &buf)
	if err != nil {
		refuse(s, err)
		return nil, err
	}
	bulk := h.Kind == KindData && cs.NegotiatedProtocol == ALPNBulk
	if !bulk {
		pc.bounded = false // stays inside crypto/tls: let it read ahead
	}
	if h.Kind == KindPlainKey {
		if !l.cfg.AllowPlaintext {
			err := &RefusedError{Reason: ReasonPlainDisabled, Detail: "this port does not allow plaintext"}
			refuse(s, err)
			return nil, err
		}
		id, err := l.keys.issue(cs, peer)
		if err != nil {
			refuse(s, err)
			return nil, err
		}
		in := &Incoming{s: s, payload: id[:]}
		if _, err := in.Accept(); err == nil {
			s.Close()
		}
		return nil, nil
	}
	if h.lane.count > 0 {
		return l.joinLane(h, peer, s, bulk, release)
	}
	return &Incoming{Header: h, Peer: peer, Transport: TLS, s: s, bulk: bulk}, nil
}

// readPlain reads and authenticates a plain stream's header.
func (l *Listener) readPlain(pc *tcpConn) (*Incoming, error) {
	s := &plainStream{TCPConn: pc.TCPConn}
	if !l.cfg.AllowPlaintext {
		err := &RefusedError{Reason: ReasonPlainDisabled, Detail: "this port does not allow plaintext"}
		refuse(s, err)
		return nil, err
	}
	var buf [MaxHeaderLen]byte
	h, wire, err := readHeader(io.MultiReader(bytes.NewReader(pc.first), pc.TCPConn), &buf)
	if err == nil && h.lane.count > 0 {
		err = errLaneTransport
	}
	if err != nil {
		refuse(s, err)
		return nil, err
	}
	peer, mac, err := l.keys.verify(wire)
	if err != nil {
		refuse(s, err)
		return nil, err
	}
	return &Incoming{Header: h, Peer: peer, Transport: Plain, s: s, payload: mac}, nil
}

func (l *Listener) acceptQUIC() {
	defer l.wg.Done()
	for {
		conn, err := l.quic.Accept(l.ctx)
		if err != nil {
			return // closed
		}
		// quic-go completed the handshake before Accept returned; the time
		// it took is not exposed: -1 says so.
		l.cfg.OnHandshake(QUIC, "in", -1)
		l.wg.Add(1)
		go l.serveQUICConn(conn)
	}
}

// serveQUICConn accepts the streams of one peer connection.
func (l *Listener) serveQUICConn(conn *quic.Conn) {
	defer l.wg.Done()
	cs := conn.ConnectionState().TLS
	l.cfg.logHandshake(QUIC, "in", conn.RemoteAddr(), cs)
	peer := peerName(cs)
	for {
		qs, err := conn.AcceptStream(l.ctx)
		if err != nil {
			conn.CloseWithError(0, "")
			return
		}
		l.wg.Add(1)
		go l.readQUICStream(&quicStream{Stream: qs, conn: conn}, peer)
	}
}

func (l *Listener) readQUICStream(s *quicStream, peer string) {
	defer l.wg.Done()
	_ = s.SetDeadline(time.Now().Add(l.cfg.HandshakeTimeout))
	var buf [MaxHeaderLen]byte
	h, _, err := readHeader(s, &buf)
	if err == nil && h.Kind == KindPlainKey {
		err = &RefusedError{Reason: ReasonUnknownKind, Detail: "plain keys are issued over tls"}
	}
	if err == nil && h.lane.count > 0 {
		err = errLaneTransport
	}
	if err != nil {
		refuse(s, err)
		l.logRefused(s.RemoteAddr(), err)
		return
	}
	l.deliver(&Incoming{Header: h, Peer: peer, Transport: QUIC, s: s})
}

// peerName returns the verified peer certificate's common name, or its first
// DNS name when the common name is empty.
func peerName(cs tls.ConnectionState) string {
	if len(cs.PeerCertificates) == 0 {
		return ""
	}
	c := cs.PeerCertificates[0]
	if c.Subject.CommonName != "" {
		return c.Subject.CommonName
	}
	if len(c.DNSNames) > 0 {
		return c.DNSNames[0]
	}
	return ""
}

// tcpConn is the TCP connection under a TLS stream. On the listening side
// its first byte was read to tell TLS from plain, and Read returns it
// first. It records whether the peer's end (EOF) was read.
//
// While bounded, Read never returns bytes beyond the end of the TLS record
// being read: it follows the 5-byte record headers and returns at most the
// rest of the current header or body. crypto/tls reads ahead whatever the
// socket has, so without the bound the first bytes of the bulk record layer
// that a peer sends right after its last TLS record could end up in
// crypto/tls's buffer, lost to the bulk layer.
type tcpConn struct {
	*net.TCPConn
	first  []byte
	rawEOF atomic.Bool

	bounded bool
	rec     recordBound
}

// boundTLSReads is whether new TLS connections bound their reads to TLS
// records; a test turns it off to show what the bound prevents.
var boundTLSReads = true

func (c *tcpConn) Read(b []byte) (int, error) {
	if !c.bounded {
		return c.read(b)
	}
	b = c.rec.limit(b)
	n, err := c.read(b)
	c.rec.advance(b[:n])
	return n, err
}

// recordBound follows the TLS records of a byte stream (a 5-byte header
// whose last two bytes are the body's length, then the body) so that a
// reader can stop at the end of each header and each body.
type recordBound struct {
	hdr  [5]byte
	hdrN int // bytes of the current record header seen
	left int // bytes of the current record body not yet seen
}

// limit shortens b to what may be read without passing the end of the
// current record header or body.
func (r *recordBound) limit(b []byte) []byte {
	if r.left > 0 {
		return b[:min(len(b), r.left)]
	}
	return b[:min(len(b), len(r.hdr)-r.hdrN)]
}

// advance takes note of p, bytes read into a buffer shortened by limit.
func (r *recordBound) advance(p []byte) {
	if r.left > 0 {
		r.left -= len(p)
		return
	}
	r.hdrN += copy(r.hdr[r.hdrN:], p)
	if r.hdrN == len(r.hdr) {
		r.hdrN = 0
		r.left = int(binary.BigEndian.Uint16(r.hdr[3:]))
	}
}

// atBoundary reports whether the bytes seen end with a whole record.
func (r *recordBound) atBoundary() bool { return r.hdrN == 0 && r.left == 0 }

func (c *tcpConn) read(b []byte) (int, error) {
	if len(c.first) > 0 {
		n := copy(b, c.first)
		c.first = c.first[n:]
		return n, nil
	}
	n, err := c.TCPConn.Read(b)
	if err == io.EOF {
		c.rawEOF.Store(true)
	}
	return n, err
}

// atRecordBoundary reports whether everything read so far ends with a
// whole TLS record: nothing is left of the stream in a buffer of ours and,
// reads being bounded, none in crypto/tls's. (Unbounded, it only says the
// first byte was taken.)
func (c *tcpConn) atRecordBoundary() bool {
	return len(c.first) == 0 && c.rec.atBoundary()
}
