package tunnel

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"time"

	"github.com/quic-go/quic-go"
)

// Stream is one migtun stream: a full-duplex byte stream between two peers.
// Close ends both directions after the bytes written so far; CloseWrite ends
// only this side's direction (the peer reads EOF) while reading goes on;
// Abort ends both directions at once and signals failure to the peer.
type Stream interface {
	net.Conn
	CloseWrite() error
	Abort() error
}

// RawConn returns the kernel socket under s when the bytes of s travel on it
// unchanged (the plain transport), so that a relay can move them with
// splice(2). It returns false for encrypted streams.
func RawConn(s Stream) (*net.TCPConn, bool) {
	p, ok := s.(*plainStream)
	if !ok {
		return nil, false
	}
	return p.TCPConn, true
}

// resetTCP closes c so that the peer sees a reset rather than a clean end.
func resetTCP(c net.Conn) error {
	if t, ok := c.(interface{ SetLinger(int) error }); ok {
		_ = t.SetLinger(0)
	}
	return c.Close()
}

// plainStream is a plain TCP stream.
type plainStream struct{ *net.TCPConn }

func (s *plainStream) Abort() error { return resetTCP(s.TCPConn) }

// tlsStream is one TLS connection carrying one stream.
type tlsStream struct{ *tls.Conn }

// Read reads from the stream. crypto/tls reports a TCP end without a
// close_notify at a record boundary as a clean io.EOF; a peer that died
// (killed, its host gone) ends that way, so such an end is reported as
// io.ErrUnexpectedEOF, a failure, while a peer's CloseWrite (close_notify
// first) stays io.EOF.
func (s *tlsStream) Read(b []byte) (int, error) {
	n, err := s.Conn.Read(b)
	if err == io.EOF {
		if tc, ok := s.NetConn().(*tcpConn); ok && tc.rawEOF.Load() {
			err = io.ErrUnexpectedEOF
		}
	}
	return n, err
}

// CloseWrite sends close_notify and half-closes the TCP connection.
func (s *tlsStream) CloseWrite() error {
	err := s.Conn.CloseWrite()
	if t, ok := s.NetConn().(interface{ CloseWrite() error }); ok {
		if err2 := t.CloseWrite(); err == nil {
			err = err2
		}
	}
	return err
}

func (s *tlsStream) Abort() error { return resetTCP(s.NetConn()) }

// quicStream adapts a QUIC stream to Stream.
type quicStream struct {
	*quic.Stream
	conn *quic.Conn
}

// Stream error codes sent in QUIC resets.
const (
	quicCodeClosed  quic.StreamErrorCode = 0
	quicCodeAborted quic.StreamErrorCode = 1
)

// Read and Write report a lost peer connection as a failure. quic-go's
// connection errors unwrap to net.ErrClosed, which would read as a close
// on purpose.
func (s *quicStream) Read(b []byte) (int, error) {
	n, err := s.Stream.Read(b)
	return n, quicErr(err)
}

func (s *quicStream) Write(b []byte) (int, error) {
	n, err := s.Stream.Write(b)
	return n, quicErr(err)
}

// PeerLostError is a stream's error when the connection to the peer was
// lost: idle timeout, stateless reset, a transport error, or the peer
// closing the connection with an error.
type PeerLostError struct{ Err error }

func (e *PeerLostError) Error() string { return "peer connection lost: " + e.Err.Error() }

func quicErr(err error) error {
	if err == nil || err == io.EOF {
		return err
	}
	var idle *quic.IdleTimeoutError
	var reset *quic.StatelessResetError
	var te *quic.TransportError
	var ae *quic.ApplicationError
	if errors.As(err, &idle) || errors.As(err, &reset) || errors.As(err, &te) || (errors.As(err, &ae) && ae.Remote) {
		return &PeerLostError{Err: err}
	}
	return err
}

func (s *quicStream) LocalAddr() net.Addr  { return s.conn.LocalAddr() }
func (s *quicStream) RemoteAddr() net.Addr { return s.conn.RemoteAddr() }

// CloseWrite sends FIN; reading goes on.
func (s *quicStream) CloseWrite() error { return s.Stream.Close() }

// Close ends the write side cleanly and stops reading.
func (s *quicStream) Close() error {
	s.Stream.CancelRead(quicCodeClosed)
	return s.Stream.Close()
}

// Abort resets both directions.
func (s *quicStream) Abort() error {
	s.Stream.CancelWrite(quicCodeAborted)
	s.Stream.CancelRead(quicCodeAborted)
	return nil
}

func (s *quicStream) SetDeadline(t time.Time) error      { return s.Stream.SetDeadline(t) }
func (s *quicStream) SetReadDeadline(t time.Time) error  { return s.Stream.SetReadDeadline(t) }
func (s *quicStream) SetWriteDeadline(t time.Time) error { return s.Stream.SetWriteDeadline(t) }
