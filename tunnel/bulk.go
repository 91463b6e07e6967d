package tunnel

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
	"time"
)

// The bulk record layer carries the bytes of tls data streams. crypto/tls
// hands back one record of at most 16 KiB per Read, so a relay over it makes
// one local write per 16 KiB and copies every record out of crypto/tls's
// buffer. Both ends of a data stream whose connection negotiated ALPNBulk
// therefore leave crypto/tls after the accept reply and speak records of
// their own on the TCP connection:
//
//	type (1) | length (3, big endian) | ciphertext (length) | tag (16)
//
// sealed with AES-256-GCM under a key per direction derived from the TLS
// exporter, the 4 header bytes as additional data, and a nonce made of a
// per-direction IV and a record counter that starts at 0. A record is
// opened only when it is whole, and nothing of it is delivered unless it
// authenticates. A record replayed, dropped, reordered or reflected to its
// sender fails to open, because its counter or key is not the one expected.
// CloseWrite sends an authenticated end record; a TCP end without it is
// io.ErrUnexpectedEOF, never a clean io.EOF.

// ALPNBulk is the ALPN protocol of a TLS connection whose data stream
// switches to the bulk record layer after the accept reply. A client offers
// it before ALPN; a server that does not know it picks ALPN, and the stream
// stays inside crypto/tls.
const ALPNBulk = "migtun/1+bulk"

const (
	bulkLabel     = "EXPORTER-migtun-bulk"
	bulkHeaderLen = 4
	bulkTagLen    = 16
	// bulkMaxPayload is the largest payload of a record, sent and accepted.
	bulkMaxPayload = 256 << 10
	bulkRecordMax  = bulkHeaderLen + bulkMaxPayload + bulkTagLen

	bulkTypeData = 1
	bulkTypeEnd  = 2
)

// bulkPool holds buffers of one whole record. Read, Write and WriteTo take
// one only while they seal or open a record, so an idle stream holds none;
// ReadFrom holds one while it runs, as a relay's copy buffer would.
var bulkPool = sync.Pool{New: func() any { b := make([]byte, bulkRecordMax); return &b }}

// Errors of the bulk record layer. A stream that returned one of them is
// unusable in that direction.
var (
	// ErrBulkAuth is a record that failed authentication: tampered with,
	// replayed, reordered, from the other direction, or not a record at all.
	ErrBulkAuth = errors.New("tunnel: bulk record failed authentication")
	// ErrBulkMalformed is a record header of an unknown type or length.
	ErrBulkMalformed = errors.New("tunnel: malformed bulk record header")
	errBulkExhausted = errors.New("tunnel: bulk record counter exhausted")
	errBulkEnded     = errors.New("tunnel: write after CloseWrite")
)

// bulkCipher seals or opens the records of one direction.
type bulkCipher struct {
	aead  cipher.AEAD
	iv    [12]byte
	nonce [12]byte
	seq   uint64
}

// nextNonce returns the nonce of the next record and advances the counter.
// The counter never wraps: the last value is refused.
func (c *bulkCipher) nextNonce() ([]byte, error) {
	if c.seq == math.MaxUint64 {
		return nil, errBulkExhausted
	}
	c.nonce = c.iv
	var ctr [8]byte
	binary.BigEndian.PutUint64(ctr[:], c.seq)
	for i := range ctr {
		c.nonce[4+i] ^= ctr[i]
	}
	c.seq++
	return c.nonce[:], nil
}

// newBulkCipher expands secret into the key and IV of one direction.
func newBulkCipher(secret []byte, dir string) (*bulkCipher, error) {
	key, err := hkdf.Expand(sha256.New, secret, "migtun bulk key "+dir, 32)
	if err != nil {
		return nil, err
	}
	iv, err := hkdf.Expand(sha256.New, secret, "migtun bulk iv "+dir, 12)
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	c := &bulkCipher{aead: aead}
	copy(c.iv[:], iv)
	return c, nil
}

// bulkCiphers returns the sending and receiving ciphers of the client (or
// server) end, from the 32-byte exporter secret. The two directions have
// separate keys and IVs, so a record reflected to its sender never opens.
func bulkCiphers(secret []byte, client bool) (send, recv *bulkCipher, err error) {
	c2s, err := newBulkCipher(secret, "client to server")
	if err != nil {
		return nil, nil, err
	}
	s2c, err := newBulkCipher(secret, "server to client")
	if err != nil {
		return nil, nil, err
	}
	if client {
		return c2s, s2c, nil
	}
	return s2c, c2s, nil
}

// bulkReader opens the records of one direction.
type bulkReader struct {
	mu    sync.Mutex
	src   io.Reader
	c     *bulkCipher
	hdr   [bulkHeaderLen]byte
	hdrN  int     // header bytes of the current record read so far
	bp    *[]byte // pooled buffer of the current record's body, if any
	have  int     // body bytes of the current record read so far
	plain []byte  // opened bytes not yet returned, in *bp
	err   error   // sticky: io.EOF after the end record, or a failure
}

// release returns the record buffer to the pool.
func (r *bulkReader) release() {
	if r.bp != nil {
		bulkPool.Put(r.bp)
		r.bp, r.plain = nil, nil
	}
}

// fail records a failure that ends this direction for good.
func (r *bulkReader) fail(err error) error {
	r.err = err
	r.release()
	return err
}

// readRecord reads and opens the next record. When direct has room for the
// whole body, the body is read and opened in place in direct, and direct
// reports so; otherwise it lands in a pooled buffer. A timeout keeps what
// was read, so the next call resumes the record. io.EOF means the end
// record arrived.
func (r *bulkReader) readRecord(direct []byte) (payload []byte, inDirect bool, err error) {
	for r.hdrN < bulkHeaderLen {
		n, err := r.src.Read(r.hdr[r.hdrN:])
		r.hdrN += n
		if err != nil && r.hdrN < bulkHeaderLen {
			return nil, false, r.readErr(err)
		}
	}
	typ := r.hdr[0]
	length := int(r.hdr[1])<<16 | int(r.hdr[2])<<8 | int(r.hdr[3])
	switch {
	case typ == bulkTypeData && length > 0 && length <= bulkMaxPayload:
	case typ == bulkTypeEnd && length == 0:
	default:
		return nil, false, r.fail(fmt.Errorf("%w: type %d, length %d", ErrBulkMalformed, typ, length))
	}
	total := length + bulkTagLen
	var body []byte
	if r.bp == nil && len(direct) >= total {
		body = direct[:total]
		inDirect = true
	} else {
		if r.bp == nil {
			r.bp = bulkPool.Get().(*[]byte)
		}
		body = (*r.bp)[:total]
	}
	for r.have < total {
		n, err := r.src.Read(body[r.have:])
		r.have += n
		if err != nil && r.have < total {
			if inDirect && r.have > 0 {
				// The caller's buffer is not ours to keep: move the
				// partial body to a pooled one for the next call.
				r.bp = bulkPool.Get().(*[]byte)
				copy(*r.bp, body[:r.have])
			}
			return nil, false, r.readErr(err)
		}
	}
	r.hdrN, r.have = 0, 0
	nonce, err := r.c.nextNonce()
	if err != nil {
		return nil, false, r.fail(err)
	}
	payload, err = r.c.aead.Open(body[:0], nonce, body, r.hdr[:])
	if err != nil {
		return nil, false, r.fail(ErrBulkAuth)
	}
	if typ == bulkTypeEnd {
		r.release()
		r.err = io.EOF
		return nil, false, io.EOF
	}
	return payload, inDirect, nil
}

// readErr classifies an error of the connection under the reader: an end
// of the TCP stream before the end record is a truncation, a failure.
// Other errors (a deadline, a closed connection) are returned as they are.
func (r *bulkReader) readErr(err error) error {
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return r.fail(io.ErrUnexpectedEOF)
	}
	return err
}

// Read reads opened bytes. A read with room for a whole record opens it in
// place in b without copying.
func (r *bulkReader) Read(b []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.plain) > 0 {
		n := copy(b, r.plain)
		r.plain = r.plain[n:]
		if len(r.plain) == 0 {
			r.release()
		}
		return n, nil
	}
	if r.err != nil {
		return 0, r.err
	}
	if len(b) == 0 {
		return 0, nil
	}
	p, inDirect, err := r.readRecord(b)
	if err != nil {
		return 0, err
	}
	if inDirect {
		return len(p), nil
	}
	n := copy(b, p)
	r.plain = p[n:]
	if len(r.plain) == 0 {
		r.release()
	}
	return n, nil
}

// WriteTo writes every opened record to w with one Write each, until the
// end record (nil error) or a failure.
func (r *bulkReader) WriteTo(w io.Writer) (int64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var total int64
	for {
		p := r.plain
		if len(p) == 0 {
			if r.err == io.EOF {
				return total, nil
			}
			if r.err != nil {
				return total, r.err
			}
			var err error
			p, _, err = r.readRecord(nil)
			if err == io.EOF {
				return total, nil
			}
			if err != nil {
				return total, err
			}
		}
		n, err := w.Write(p)
		total += int64(n)
		r.plain = nil
		r.release()
		if err != nil {
			return total, err
		}
	}
}

// bulkWriter seals the records of one direction.
type bulkWriter struct {
	mu    sync.Mutex
	dst   io.Writer
	c     *bulkCipher
	ended bool  // the end record was sent (or the stream closed)
	err   error // sticky: a record may be half written
	end   [bulkHeaderLen + bulkTagLen]byte
}

// seal seals payload as a record of typ into buf, which has room for the
// record; payload is either buf[bulkHeaderLen:] (sealed in place) or does
// not overlap buf. It returns the record.
func (w *bulkWriter) seal(buf []byte, typ byte, payload []byte) ([]byte, error) {
	nonce, err := w.c.nextNonce()
	if err != nil {
		return nil, err
	}
	n := len(payload)
	buf[0], buf[1], buf[2], buf[3] = typ, byte(n>>16), byte(n>>8), byte(n)
	out := w.c.aead.Seal(buf[bulkHeaderLen:bulkHeaderLen], nonce, payload, buf[:bulkHeaderLen])
	return buf[:bulkHeaderLen+len(out)], nil
}

// sealAndWrite sends payload as one data record. It is called with w.mu
// held.
func (w *bulkWriter) sealAndWrite(buf, payload []byte) error {
	if w.err != nil {
		return w.err
	}
	if w.ended {
		return errBulkEnded
	}
	rec, err := w.seal(buf, bulkTypeData, payload)
	if err == nil {
		_, err = w.dst.Write(rec)
	}
	if err != nil {
		w.err = err
	}
	return err
}

// Write seals b into records of at most bulkMaxPayload bytes, each sent
// with one write.
func (w *bulkWriter) Write(b []byte) (int, error) {
	bp := bulkPool.Get().(*[]byte)
	defer bulkPool.Put(bp)
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for len(b) > 0 {
		chunk := b[:min(len(b), bulkMaxPayload)]
		if err := w.sealAndWrite(*bp, chunk); err != nil {
			return n, err
		}
		n += len(chunk)
		b = b[len(chunk):]
	}
	return n, nil
}

// ReadFrom reads src into a record buffer, seals what one read returned in
// place and sends it with one write, until src ends. It returns the bytes
// sent.
func (w *bulkWriter) ReadFrom(src io.Reader) (int64, error) {
	bp := bulkPool.Get().(*[]byte)
	defer bulkPool.Put(bp)
	buf := *bp
	var total int64
	for {
		n, rerr := src.Read(buf[bulkHeaderLen : bulkHeaderLen+bulkMaxPayload])
		if n > 0 {
			w.mu.Lock()
			err := w.sealAndWrite(buf, buf[bulkHeaderLen:bulkHeaderLen+n])
			w.mu.Unlock()
			if err != nil {
				return total, err
			}
			total += int64(n)
		}
		if rerr == io.EOF {
			return total, nil
		}
		if rerr != nil {
			return total, rerr
		}
	}
}

// sendEnd sends the end record once. It is called with w.mu held.
func (w *bulkWriter) sendEnd() error {
	if w.ended {
		return w.err
	}
	w.ended = true
	if w.err != nil {
		return w.err
	}
	rec, err := w.seal(w.end[:], bulkTypeEnd, nil)
	if err == nil {
		_, err = w.dst.Write(rec)
	}
	if err != nil {
		w.err = err
	}
	return err
}

// bulkStream is a tls data stream after the switch to the bulk record
// layer: records on the TCP connection, keys from the TLS session.
type bulkStream struct {
	tls  *tls.Conn // after the handshake; no longer read or written
	conn *net.TCPConn
	r    bulkReader
	w    bulkWriter
}

// newBulkStream switches s to the bulk record layer; client says which end
// of the connection this is. It must be called after the accept reply was
// written (server) or read (client), before anything else crosses s.
func newBulkStream(s *tlsStream, client bool) (*bulkStream, error) {
	tc, ok := s.NetConn().(*tcpConn)
	if !ok {
		return nil, errors.New("tunnel: bulk record layer needs a TCP connection")
	}
	if !tc.atRecordBoundary() {
		// crypto/tls holds bytes beyond its last record: they would be
		// lost to the bulk layer.
		return nil, errors.New("tunnel: tls read ahead of the bulk record layer")
	}
	cs := s.ConnectionState()
	if cs.NegotiatedProtocol != ALPNBulk {
		return nil, fmt.Errorf("tunnel: bulk record layer on a %q connection", cs.NegotiatedProtocol)
	}
	secret, err := cs.ExportKeyingMaterial(bulkLabel, nil, 32)
	if err != nil {
		return nil, fmt.Errorf("tunnel: bulk keys: %w", err)
	}
	send, recv, err := bulkCiphers(secret, client)
	if err != nil {
		return nil, fmt.Errorf("tunnel: bulk keys: %w", err)
	}
	b := &bulkStream{tls: s.Conn, conn: tc.TCPConn}
	b.r = bulkReader{src: tc.TCPConn, c: recv}
	b.w = bulkWriter{dst: tc.TCPConn, c: send}
	return b, nil
}

// Read reads the peer's bytes. The peer's CloseWrite or Close reads as
// io.EOF; a TCP end without the end record as io.ErrUnexpectedEOF.
func (s *bulkStream) Read(b []byte) (int, error) { return s.r.Read(b) }

// Write sends b in records of up to 256 KiB.
func (s *bulkStream) Write(b []byte) (int, error) { return s.w.Write(b) }

// WriteTo writes the peer's bytes to w, one Write per record, until the
// peer ends its direction; a clean end returns a nil error.
func (s *bulkStream) WriteTo(w io.Writer) (int64, error) { return s.r.WriteTo(w) }

// ReadFrom sends what src returns, one record per Read of src, until src
// returns io.EOF. It does not end the stream's direction: CloseWrite does.
func (s *bulkStream) ReadFrom(src io.Reader) (int64, error) { return s.w.ReadFrom(src) }

// CloseWrite sends the end record and half-closes the TCP connection;
// reading goes on.
func (s *bulkStream) CloseWrite() error {
	s.w.mu.Lock()
	err := s.w.sendEnd()
	s.w.mu.Unlock()
	if err2 := s.conn.CloseWrite(); err == nil {
		err = err2
	}
	return err
}

// Close sends the end record (unless a Write is in flight, which Close is
// then used to break, as with crypto/tls) and closes the connection.
func (s *bulkStream) Close() error {
	if s.w.mu.TryLock() {
		if !s.w.ended && s.w.err == nil {
			_ = s.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
			_ = s.w.sendEnd()
		}
		s.w.ended = true
		s.w.mu.Unlock()
	}
	return s.conn.Close()
}

// Abort resets the TCP connection: the peer reads a failure.
func (s *bulkStream) Abort() error { return resetTCP(s.conn) }

// ConnectionState returns the state of the TLS connection the stream's
// keys come from.
func (s *bulkStream) ConnectionState() tls.ConnectionState { return s.tls.ConnectionState() }

// LocalAddr returns the local network address.
func (s *bulkStream) LocalAddr() net.Addr { return s.conn.LocalAddr() }

// RemoteAddr returns the peer's network address.
func (s *bulkStream) RemoteAddr() net.Addr { return s.conn.RemoteAddr() }

// SetDeadline sets the read and write deadlines of the connection.
func (s *bulkStream) SetDeadline(t time.Time) error { return s.conn.SetDeadline(t) }

// SetReadDeadline sets the read deadline; a read that times out mid-record
// resumes it on the next Read.
func (s *bulkStream) SetReadDeadline(t time.Time) error { return s.conn.SetReadDeadline(t) }

// SetWriteDeadline sets the write deadline; a write that times out leaves
// the direction failed, since a record may be half sent.
func (s *bulkStream) SetWriteDeadline(t time.Time) error { return s.conn.SetWriteDeadline(t) }
