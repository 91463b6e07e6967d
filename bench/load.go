package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// patternSize is the size of the random buffer the sender writes again and
// again; large enough that nothing on the way can compress or dedupe it.
const patternSize = 4 << 20

var (
	patternOnce sync.Once
	pattern     []byte
)

// randomPattern returns the shared random buffer.
func randomPattern() []byte {
	patternOnce.Do(func() {
		pattern = make([]byte, patternSize)
		r := rand.NewChaCha8([32]byte{'m', 'i', 'g', 't', 'u', 'n'})
		_, _ = r.Read(pattern)
	})
	return pattern
}

// sink accepts connections on a UNIX socket and counts and discards what
// they carry.
type sink struct {
	ln    *net.UnixListener
	bytes atomic.Int64
	conns atomic.Int64
	wg    sync.WaitGroup
	mu    sync.Mutex
	err   error
	open  map[net.Conn]struct{}

	// target is the byte count at which full is closed and at is set.
	target   int64
	full     chan struct{}
	fullOnce sync.Once
	at       time.Time
}

func newSink(path string, target int64) (*sink, error) {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	s := &sink{ln: ln, open: map[net.Conn]struct{}{}, target: target, full: make(chan struct{})}
	s.wg.Add(1)
	go s.acceptLoop()
	return s, nil
}

func (s *sink) acceptLoop() {
	defer s.wg.Done()
	for {
		c, err := s.ln.AcceptUnix()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.open[c] = struct{}{}
		s.mu.Unlock()
		s.conns.Add(1)
		s.wg.Add(1)
		go s.drain(c)
	}
}

// drain reads c to EOF with a large buffer, counting bytes as they come.
func (s *sink) drain(c *net.UnixConn) {
	defer s.wg.Done()
	buf := make([]byte, 1<<20)
	for {
		n, err := c.Read(buf)
		if n > 0 && s.bytes.Add(int64(n)) >= s.target {
			s.fullOnce.Do(func() {
				s.at = time.Now()
				close(s.full)
			})
		}
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				s.mu.Lock()
				if s.err == nil {
					s.err = fmt.Errorf("sink: %w", err)
				}
				s.mu.Unlock()
			}
			break
		}
	}
	s.mu.Lock()
	delete(s.open, c)
	s.mu.Unlock()
	c.Close()
}

// fullAt returns when the sink counted its target; only after full is
// closed.
func (s *sink) fullAt() time.Time {
	<-s.full
	return s.at
}

func (s *sink) firstErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// close stops accepting, closes the connections still open and waits for
// every goroutine of the sink.
func (s *sink) close() {
	s.ln.Close()
	s.mu.Lock()
	for c := range s.open {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// send opens streams connections to the UNIX socket at path, one after the
// other (so that they reach the far end in order), and writes size bytes
// split over them, all in parallel, counting them in sent. Each connection
// is half-closed when its share is written, and closed only once hold is
// closed (the sink has everything) or ctx ends, as a migration source
// would: some relays (stunnel) drop what they have not yet passed on when
// the local peer goes away entirely.
func send(ctx context.Context, path string, streams int, size int64, sent *atomic.Int64, hold <-chan struct{}) (err error) {
	var conns []*net.UnixConn
	defer func() {
		if err == nil {
			select {
			case <-hold:
			case <-ctx.Done():
			}
		}
		for _, c := range conns {
			c.Close()
		}
	}()
	var d net.Dialer
	for range streams {
		c, err := d.DialContext(ctx, "unix", path)
		if err != nil {
			return fmt.Errorf("sender: %w", err)
		}
		conns = append(conns, c.(*net.UnixConn))
	}
	stop := context.AfterFunc(ctx, func() {
		for _, c := range conns {
			c.SetWriteDeadline(time.Unix(1, 0))
		}
	})
	defer stop()
	errc := make(chan error, streams)
	share := size / int64(streams)
	for i, c := range conns {
		n := share
		if i == streams-1 {
			n = size - share*int64(streams-1)
		}
		go sendOne(c, n, i*patternSize/streams/4096*4096, sent, errc)
	}
	var first error
	for range streams {
		if err := <-errc; err != nil && first == nil {
			first = err
		}
	}
	if first != nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return first
}

// sendOne writes n bytes of the pattern to c, starting at offset off of
// the pattern, and half-closes c.
func sendOne(c *net.UnixConn, n int64, off int, sent *atomic.Int64, errc chan<- error) {
	p := randomPattern()
	const chunk = 1 << 20
	for n > 0 {
		end := min(off+chunk, len(p))
		if int64(end-off) > n {
			end = off + int(n)
		}
		w, err := c.Write(p[off:end])
		sent.Add(int64(w))
		n -= int64(w)
		if err != nil {
			errc <- fmt.Errorf("sender: %w", err)
			return
		}
		off = end % len(p)
	}
	errc <- c.CloseWrite()
}
