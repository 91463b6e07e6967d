package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"

	"github.com/migtun/migtun/tunnel"
)

// bufferSize is the size of the pooled buffers used where bytes must pass
// through user space (an encrypted leg): large, so that one read can take
// many TLS records or QUIC frames and one write fills many.
const bufferSize = 256 << 10

// localWriteBuffer is the send buffer of a local UNIX socket: a few
// records of the tunnel, so a write of a whole record does not block half
// way while the local reader catches up.
const localWriteBuffer = 1 << 20

var bufferPool = sync.Pool{New: func() any { b := make([]byte, bufferSize); return &b }}

// Counts holds the bytes a relay moved, updated while it runs.
type Counts struct {
	// Up counts bytes from the local connection into the tunnel.
	Up atomic.Int64
	// Down counts bytes from the tunnel to the local connection.
	Down atomic.Int64
}

// relay copies between a local connection and a tunnel stream in both
// directions until both are done. The end of one direction is passed on as
// a half close while the other keeps flowing. When either direction fails,
// both connections are aborted at once so both ends see the failure. It
// closes both connections before returning and reports the first error.
func relay(local net.Conn, remote tunnel.Stream, counts *Counts) error {
	if u, ok := local.(*net.UnixConn); ok {
		_ = u.SetWriteBuffer(localWriteBuffer)
	}
	remoteIO := net.Conn(remote)
	if raw, ok := tunnel.RawConn(remote); ok {
		remoteIO = raw // plain transport: let the kernel move the bytes
	}
	errc := make(chan error, 2)
	go copyUp(remoteIO, local, remote, &counts.Up, errc)
	go copyDown(local, remoteIO, &counts.Down, errc)

	first := <-errc
	if first != nil {
		abortLocal(local)
		remote.Abort()
	}
	second := <-errc
	if first == nil && second != nil {
		abortLocal(local)
		remote.Abort()
		first = second
	}
	local.Close()
	remote.Close()
	return first
}

// copyUp moves local → tunnel and half-closes the stream at EOF.
func copyUp(dst, src net.Conn, stream tunnel.Stream, n *atomic.Int64, errc chan<- error) {
	var err error
	if rf, ok := recordWriter(dst); ok {
		err = readFromCounted(rf, src, n)
	} else {
		err = pipe(dst, src, n)
	}
	if err == nil {
		err = stream.CloseWrite()
	}
	errc <- err
}

// copyDown moves tunnel → local and half-closes the local socket at EOF.
func copyDown(dst, src net.Conn, n *atomic.Int64, errc chan<- error) {
	var err error
	if wt, ok := recordReader(src); ok {
		_, err = wt.WriteTo(countingWriter{dst, n})
	} else {
		err = pipe(dst, src, n)
	}
	if err == nil {
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			err = cw.CloseWrite()
		}
	}
	errc <- err
}

// pipe copies src to dst until EOF. Between two kernel sockets it lets the
// standard library use splice(2), so the bytes never enter user space;
// otherwise it uses a pooled buffer and hides ReadFrom/WriteTo so that no
// small buffer is chosen behind its back.
func pipe(dst, src net.Conn, n *atomic.Int64) error {
	if kernelSocket(dst) && kernelSocket(src) {
		// io.Copy reaches (*net.TCPConn).ReadFrom or WriteTo, which
		// splice between TCP and TCP or UNIX sockets.
		w, err := io.Copy(dst, src)
		n.Add(w)
		return err
	}
	bp := bufferPool.Get().(*[]byte)
	defer bufferPool.Put(bp)
	buf := *bp
	for {
		r, rerr := src.Read(buf)
		if r > 0 {
			w, werr := dst.Write(buf[:r])
			n.Add(int64(w))
			if werr != nil {
				return werr
			}
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return rerr
		}
	}
}

// recordWriter returns the fast path of a tunnel stream that seals whole
// records itself (tls with the bulk record layer): its ReadFrom reads the
// local socket straight into a record buffer, seals in place and sends each
// record with one write. Kernel sockets are left to pipe and splice. Other
// tunnel streams (crypto/tls, QUIC) have no ReadFrom, so pipe's large
// buffer is used for them.
func recordWriter(c net.Conn) (io.ReaderFrom, bool) {
	if kernelSocket(c) {
		return nil, false
	}
	rf, ok := c.(io.ReaderFrom)
	return rf, ok
}

// recordReader returns the fast path of a tunnel stream that opens whole
// records itself: its WriteTo opens each record in place and writes it to
// the local socket with one write.
func recordReader(c net.Conn) (io.WriterTo, bool) {
	if kernelSocket(c) {
		return nil, false
	}
	wt, ok := c.(io.WriterTo)
	return wt, ok
}

// readFromCounted runs rf.ReadFrom(src), counting bytes in n as they are
// sent. ReadFrom sends what one Read returned before it reads again, so a
// Read's bytes are counted when the next Read starts, and the rest from
// what ReadFrom reports: n never counts bytes that were not sent.
func readFromCounted(rf io.ReaderFrom, src io.Reader, n *atomic.Int64) error {
	cr := &countedReader{r: src, n: n}
	sent, err := rf.ReadFrom(cr)
	n.Add(sent - cr.counted)
	if err == io.EOF {
		err = nil
	}
	return err
}

// countedReader counts the bytes of its previous Read on each Read.
type countedReader struct {
	r       io.Reader
	n       *atomic.Int64
	pending int
	counted int64
}

func (c *countedReader) Read(b []byte) (int, error) {
	if c.pending > 0 {
		c.n.Add(int64(c.pending))
		c.counted += int64(c.pending)
		c.pending = 0
	}
	k, err := c.r.Read(b)
	c.pending = k
	return k, err
}

// countingWriter counts the bytes written through it.
type countingWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (c countingWriter) Write(b []byte) (int, error) {
	k, err := c.w.Write(b)
	c.n.Add(int64(k))
	return k, err
}

// kernelSocket reports whether c is a bare kernel socket splice can use.
func kernelSocket(c net.Conn) bool {
	switch c.(type) {
	case *net.TCPConn:
		return true
	case *net.UnixConn:
		return true
	}
	return false
}

// abortLocal closes a local connection so the process on the other end
// sees a failure: a TCP reset, or for a UNIX socket a close with unread data.
func abortLocal(c net.Conn) {
	if t, ok := c.(*net.TCPConn); ok {
		_ = t.SetLinger(0)
	}
	c.Close()
}

// isClosed reports errors that only say a connection was closed on purpose.
func isClosed(err error) bool {
	return err == nil || errors.Is(err, net.ErrClosed)
}
