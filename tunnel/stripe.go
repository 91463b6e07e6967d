package tunnel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Striping carries one stream over several TLS connections to the same
// peer, its lanes, so that one migration stream is not held to what one TCP
// connection's window and congestion control allow on a long path.
//
// Every lane is an ordinary authenticated TLS connection with the bulk
// record layer: tampering, replay, reordering and truncation inside a lane
// fail that lane's records. Above them, the stream is cut into frames,
// each numbered in one sequence across the lanes:
//
//	offset size field
//	0      8    sequence number (data), or the number of data frames sent (end)
//	8      4    payload length n (1..stripeChunk), or stripeEnd
//	12     n    payload
//
// A sender takes the next frame on whichever lane is free, so a lane's
// frames rise in sequence but need not be consecutive. The receiver
// delivers them in sequence. Every lane ends with an end frame giving the
// total, then the bulk layer's own end record: a lane that ends without
// both, a frame number seen twice, one that goes backwards on its lane, or
// totals that disagree or are not reached fail the whole stream; the bytes
// delivered before are always a prefix of those sent. Lanes of different
// streams, or of another peer, cannot be mixed: each lane's header names
// its group, and the receiver joins only lanes of one peer with the same
// group, session, channel and index (see Listener).

// MaxStripes is the most lanes one stream may be striped over.
const MaxStripes = 16

const (
	stripeFrameHeader = 12
	// stripeChunk is the largest frame payload: a frame with its header
	// fills one bulk record.
	stripeChunk = bulkMaxPayload - stripeFrameHeader
	// stripeEnd in the length field marks an end frame.
	stripeEnd = 0xffffffff
)

// ErrStripe is a striped stream whose frames do not add up: a frame number
// seen twice or going backwards on its lane, a lane that ended without its
// end frame, or end frames whose totals disagree or were not reached.
var ErrStripe = errors.New("tunnel: striped stream broken")

// stripeFrame is one frame of a striped stream, in a buffer of bulkPool.
type stripeFrame struct {
	seq  uint64
	buf  *[]byte
	data []byte // the payload: part of *buf after the frame header
}

// stripedStream is one stream over several lanes.
type stripedStream struct {
	lanes []Stream

	// Sending. Write cuts frames and queues them; one writer per lane
	// sends whatever frame comes next.
	wmu     sync.Mutex // serializes Write, CloseWrite and the flush of Close
	sendq   chan stripeFrame
	wseq    uint64 // frames queued so far; the total once sendq is closed
	wclosed bool
	werr    atomic.Pointer[error]
	writers sync.WaitGroup
	wtimer  deadline

	// Receiving. One reader per lane holds at most one frame until Read
	// takes it.
	mu      sync.Mutex
	cond    *sync.Cond
	next    uint64                  // sequence number Read delivers next
	pending map[uint64]*stripeFrame // frames read, waiting their turn
	cur     *stripeFrame            // the frame Read is returning
	ended   int                     // lanes whose end frame arrived
	total   uint64                  // the total of the end frames
	rerr    error                   // the first receive failure
	closed  bool
	readers sync.WaitGroup
	rtimer  deadline

	done      chan struct{} // closed when Close or Abort begins
	doneOnce  sync.Once
	closeOnce sync.Once
	abortOnce sync.Once
}

// newStriped starts the lane readers and writers of a stream over lanes.
func newStriped(lanes []Stream) *stripedStream {
	s := &stripedStream{lanes: lanes, sendq: make(chan stripeFrame, len(lanes)), pending: map[uint64]*stripeFrame{}, done: make(chan struct{})}
	s.cond = sync.NewCond(&s.mu)
	s.rtimer.wake = func() { s.mu.Lock(); s.cond.Broadcast(); s.mu.Unlock() }
	for i, l := range lanes {
		s.writers.Add(1)
		go s.sendLane(l)
		s.readers.Add(1)
		go s.receiveLane(i, l)
	}
	return s
}

// writeErr returns the first send failure, or nil.
func (s *stripedStream) writeErr() error {
	if p := s.werr.Load(); p != nil {
		return *p
	}
	return nil
}

func (s *stripedStream) failWrite(err error) {
	s.werr.CompareAndSwap(nil, &err)
}

// Write queues b in frames; it returns once every frame is queued. A lane
// that failed fails this and every later Write.
func (s *stripedStream) Write(b []byte) (int, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.wclosed {
		return 0, errBulkEnded
	}
	n := 0
	for n < len(b) {
		if err := s.writeErr(); err != nil {
			return n, err
		}
		bp := bulkPool.Get().(*[]byte)
		c := copy((*bp)[stripeFrameHeader:stripeFrameHeader+stripeChunk], b[n:])
		f := stripeFrame{seq: s.wseq, buf: bp, data: (*bp)[stripeFrameHeader : stripeFrameHeader+c]}
		select {
		case s.sendq <- f:
		case <-s.wtimer.expired():
			bulkPool.Put(bp)
			return n, os.ErrDeadlineExceeded
		case <-s.done:
			bulkPool.Put(bp)
			return n, net.ErrClosed
		}
		s.wseq++
		n += c
	}
	return n, s.writeErr()
}

// sendLane sends frames on l until the queue closes, then the end frame
// and the lane's own end. After a failure it drops what it takes.
func (s *stripedStream) sendLane(l Stream) {
	defer s.writers.Done()
	for f := range s.sendq {
		if s.writeErr() == nil {
			b := (*f.buf)[:stripeFrameHeader+len(f.data)]
			binary.BigEndian.PutUint64(b, f.seq)
			binary.BigEndian.PutUint32(b[8:], uint32(len(f.data)))
			if _, err := l.Write(b); err != nil {
				s.failWrite(err)
			}
		}
		bulkPool.Put(f.buf)
	}
	if s.writeErr() != nil {
		return
	}
	var end [stripeFrameHeader]byte
	binary.BigEndian.PutUint64(end[:], s.wseq) // sendq closed: wseq is final
	binary.BigEndian.PutUint32(end[8:], stripeEnd)
	if _, err := l.Write(end[:]); err != nil {
		s.failWrite(err)
		return
	}
	if err := l.CloseWrite(); err != nil {
		s.failWrite(err)
	}
}

// CloseWrite sends what is queued, then every lane's end: the peer reads
// EOF once it has every frame.
func (s *stripedStream) CloseWrite() error {
	s.stopQueue()
	s.writers.Wait()
	return s.writeErr()
}

// stopQueue closes the send queue once: the lane writers send what it
// holds, then their end frames. Write holds wmu while it queues, and gives
// up at done, so wmu is never held for long.
func (s *stripedStream) stopQueue() {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if !s.wclosed {
		s.wclosed = true
		close(s.sendq)
	}
}

func (s *stripedStream) closeDone() { s.doneOnce.Do(func() { close(s.done) }) }

// receiveLane reads the frames of lane i until its end, a failure or
// Close, handing each to Read in turn.
func (s *stripedStream) receiveLane(i int, l Stream) {
	defer s.readers.Done()
	var hdr [stripeFrameHeader]byte
	last, first := uint64(0), true
	for {
		if _, err := io.ReadFull(l, hdr[:]); err != nil {
			if err == io.EOF {
				err = fmt.Errorf("%w: lane %d ended without its end frame", ErrStripe, i)
			}
			s.failRead(err)
			return
		}
		seq, n := binary.BigEndian.Uint64(hdr[:]), binary.BigEndian.Uint32(hdr[8:])
		if n == stripeEnd {
			s.laneEnded(i, l, seq)
			return
		}
		if n == 0 || n > stripeChunk || (!first && seq <= last) {
			s.failRead(fmt.Errorf("%w: lane %d: frame %d (%d bytes) after frame %d", ErrStripe, i, seq, n, last))
			return
		}
		last, first = seq, false
		bp := bulkPool.Get().(*[]byte)
		f := &stripeFrame{seq: seq, buf: bp, data: (*bp)[:n]}
		if _, err := io.ReadFull(l, f.data); err != nil {
			bulkPool.Put(bp)
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			s.failRead(err)
			return
		}
		if !s.hand(i, f) {
			return
		}
	}
}

// hand gives f to Read and waits until Read took it; false if the stream
// failed or closed meanwhile.
func (s *stripedStream) hand(i int, f *stripeFrame) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, dup := s.pending[f.seq]; dup || f.seq < s.next {
		bulkPool.Put(f.buf)
		s.failLocked(fmt.Errorf("%w: lane %d: frame %d seen twice", ErrStripe, i, f.seq))
		return false
	}
	if s.ended > 0 && f.seq >= s.total {
		bulkPool.Put(f.buf)
		s.failLocked(fmt.Errorf("%w: lane %d: frame %d past the end at %d", ErrStripe, i, f.seq, s.total))
		return false
	}
	s.pending[f.seq] = f
	s.cond.Broadcast()
	for s.pending[f.seq] == f && s.rerr == nil && !s.closed {
		s.cond.Wait()
	}
	return s.rerr == nil && !s.closed
}

// laneEnded records lane i's end frame, then checks the lane ends there.
func (s *stripedStream) laneEnded(i int, l Stream, total uint64) {
	var one [1]byte
	if n, err := l.Read(one[:]); n != 0 || err != io.EOF {
		if err == nil || err == io.EOF {
			err = fmt.Errorf("%w: lane %d goes on after its end frame", ErrStripe, i)
		}
		s.failRead(err)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended > 0 && total != s.total {
		s.failLocked(fmt.Errorf("%w: lane %d ends at frame %d, another at %d", ErrStripe, i, total, s.total))
		return
	}
	for seq := range s.pending {
		if seq >= total {
			s.failLocked(fmt.Errorf("%w: lane %d ends at frame %d, but frame %d came", ErrStripe, i, total, seq))
			return
		}
	}
	s.ended++
	s.total = total
	s.cond.Broadcast()
}

func (s *stripedStream) failRead(err error) {
	s.mu.Lock()
	s.failLocked(err)
	s.mu.Unlock()
}

func (s *stripedStream) failLocked(err error) {
	if s.rerr == nil {
		s.rerr = err
	}
	s.cond.Broadcast()
}

// Read returns the stream's bytes in order. It returns io.EOF once every
// lane ended and every frame up to their total was read.
func (s *stripedStream) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		if s.cur != nil {
			n := copy(b, s.cur.data)
			s.cur.data = s.cur.data[n:]
			if len(s.cur.data) == 0 {
				bulkPool.Put(s.cur.buf)
				s.cur = nil
			}
			return n, nil
		}
		if f := s.pending[s.next]; f != nil {
			delete(s.pending, s.next)
			s.cur = f
			s.next++
			s.cond.Broadcast() // its lane reads on
			continue
		}
		switch {
		case s.closed:
			return 0, net.ErrClosed
		case s.rerr != nil:
			return 0, s.rerr
		case s.ended == len(s.lanes) && s.next == s.total:
			return 0, io.EOF
		case s.ended == len(s.lanes):
			return 0, fmt.Errorf("%w: the lanes ended at frame %d, but only %d arrived", ErrStripe, s.total, s.next)
		case len(s.pending) > 0 && len(s.pending) == len(s.lanes)-s.ended:
			// Every lane still going holds a later frame: this one was
			// never sent.
			s.failLocked(fmt.Errorf("%w: frame %d is missing", ErrStripe, s.next))
			continue
		case s.rtimer.passed():
			return 0, os.ErrDeadlineExceeded
		}
		s.cond.Wait()
	}
}

// Close sends what was written (for up to closeFlush), ends the stream and
// waits for its lanes' goroutines. A Write still running returns
// net.ErrClosed.
func (s *stripedStream) Close() error {
	var err error
	s.closeOnce.Do(func() {
		s.closeDone()
		s.setLaneWriteDeadline(time.Now().Add(closeFlush))
		s.stopQueue()
		s.writers.Wait()
		err = s.endLanes(func(l Stream) error { return l.Close() })
		s.shut()
	})
	return err
}

// closeFlush bounds how long Close waits for queued frames to be sent.
const closeFlush = 5 * time.Second

// Abort resets every lane at once, whatever else is running (a Close
// flushing, a CloseWrite waiting): the peer sees a failure.
func (s *stripedStream) Abort() error {
	var err error
	s.abortOnce.Do(func() {
		s.failWrite(net.ErrClosed)
		s.closeDone()
		err = s.endLanes(func(l Stream) error { return l.Abort() })
		s.stopQueue()
		s.writers.Wait()
		s.shut()
	})
	return err
}

// endLanes ends every lane with end.
func (s *stripedStream) endLanes(end func(Stream) error) error {
	var errs []error
	for _, l := range s.lanes {
		if err := end(l); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// shut stops Read, waits for the lane readers (their lanes ended) and
// gives back the frames held. It may run twice (Close and Abort).
func (s *stripedStream) shut() {
	s.mu.Lock()
	s.closed = true
	s.cond.Broadcast()
	s.mu.Unlock()
	s.readers.Wait()
	s.mu.Lock()
	for seq, f := range s.pending {
		bulkPool.Put(f.buf)
		delete(s.pending, seq)
	}
	if s.cur != nil {
		bulkPool.Put(s.cur.buf)
		s.cur = nil
	}
	s.mu.Unlock()
	s.rtimer.stop()
	s.wtimer.stop()
}

func (s *stripedStream) setLaneWriteDeadline(t time.Time) {
	for _, l := range s.lanes {
		_ = l.SetWriteDeadline(t)
	}
}

func (s *stripedStream) LocalAddr() net.Addr  { return s.lanes[0].LocalAddr() }
func (s *stripedStream) RemoteAddr() net.Addr { return s.lanes[0].RemoteAddr() }

func (s *stripedStream) SetDeadline(t time.Time) error {
	s.SetReadDeadline(t)
	return s.SetWriteDeadline(t)
}

// SetReadDeadline bounds Read; the lanes' readers are not bounded by it,
// as they only wait for Read.
func (s *stripedStream) SetReadDeadline(t time.Time) error {
	s.rtimer.set(t)
	return nil
}

// SetWriteDeadline bounds Write's queueing and every lane's sending.
func (s *stripedStream) SetWriteDeadline(t time.Time) error {
	s.wtimer.set(t)
	s.setLaneWriteDeadline(t)
	return nil
}

// deadline is a settable point in time that closes a channel, and calls
// wake if set, when it passes.
type deadline struct {
	mu    sync.Mutex
	t     time.Time
	gen   uint64 // counts resets, so that a stale timer does nothing
	timer *time.Timer
	ch    chan struct{}
	wake  func()
}

// set moves the deadline to t; the zero time removes it.
func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	passed := d.reset(t)
	wake := d.wake
	d.mu.Unlock()
	if passed && wake != nil {
		wake()
	}
}

// reset does set's work under d.mu and reports whether t has passed.
func (d *deadline) reset(t time.Time) bool {
	if d.timer != nil {
		d.timer.Stop()
		d.timer = nil
	}
	d.t = t
	d.gen++
	if d.ch == nil || isClosed(d.ch) {
		d.ch = make(chan struct{})
	}
	if t.IsZero() {
		return false
	}
	ch, gen := d.ch, d.gen
	fire := func() {
		d.mu.Lock()
		if d.gen == gen && d.ch == ch && !isClosed(ch) {
			close(ch)
		}
		wake := d.wake
		d.mu.Unlock()
		if wake != nil {
			wake()
		}
	}
	if dur := time.Until(t); dur > 0 {
		d.timer = time.AfterFunc(dur, fire)
		return false
	}
	close(ch)
	return true
}

// expired returns a channel closed once the deadline has passed.
func (d *deadline) expired() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ch == nil {
		d.ch = make(chan struct{})
	}
	return d.ch
}

// passed reports whether the deadline is set and has passed.
func (d *deadline) passed() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return !d.t.IsZero() && !time.Now().Before(d.t)
}

func (d *deadline) stop() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil {
		d.timer.Stop()
		d.timer = nil
	}
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
