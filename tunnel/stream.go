package tunnel

import (
	"crypto/tls"
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
