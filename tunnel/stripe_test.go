package tunnel

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/migtun/migtun/internal/leaktest"
	"github.com/migtun/migtun/internal/testpki"
)

// stripedPair opens a stream striped over lanes from p's dialer and
// returns both ends.
func stripedPair(t *testing.T, p *pair, lanes int) (near, far Stream) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	type accepted struct {
		s   Stream
		err error
	}
	got := make(chan accepted, 1)
	go func() {
		in, err := p.ln.Accept(ctx)
		if err != nil {
			got <- accepted{nil, err}
			return
		}
		s, err := in.Accept()
		got <- accepted{s, err}
	}()
	near, err := p.d.OpenStriped(ctx, p.addr, Header{Kind: KindData, Channel: "main", Index: 3}, lanes)
	a := <-got
	if err != nil || a.err != nil {
		t.Fatalf("opening a stream striped over %d lanes: %v; accepting: %v", lanes, err, a.err)
	}
	if _, ok := near.(*stripedStream); !ok {
		t.Fatalf("OpenStriped returned a %T", near)
	}
	t.Cleanup(func() { near.Close(); a.s.Close() })
	return near, a.s
}

// TestStripedStream sends bytes both ways at once over four lanes, with a
// half close on each side, and checks they arrive whole and in order.
func TestStripedStream(t *testing.T) {
	leaktest.Check(t)
	p := newPair(t, TLS)
	near, far := stripedPair(t, p, 4)
	up, down := randBytes(24<<20+17), randBytes(3<<20+5)
	var wg sync.WaitGroup
	send := func(s Stream, b []byte) {
		defer wg.Done()
		for off := 0; off < len(b); { // uneven writes, as a relay's reads are
			n := min(len(b)-off, 100<<10+off%333)
			if _, err := s.Write(b[off : off+n]); err != nil {
				t.Errorf("write: %v", err)
				return
			}
			off += n
		}
		if err := s.CloseWrite(); err != nil {
			t.Errorf("close write: %v", err)
		}
	}
	wg.Add(2)
	go send(near, up)
	go send(far, down)
	gotUp, errUp := io.ReadAll(far)
	gotDown, errDown := io.ReadAll(near)
	wg.Wait()
	if errUp != nil || sha256.Sum256(gotUp) != sha256.Sum256(up) {
		t.Errorf("up: %d of %d bytes, %v", len(gotUp), len(up), errUp)
	}
	if errDown != nil || !bytes.Equal(gotDown, down) {
		t.Errorf("down: %d of %d bytes, %v", len(gotDown), len(down), errDown)
	}
	for i, l := range near.(*stripedStream).lanes {
		// Two records are the end frame and the end record.
		if l.(*bulkStream).w.c.seq < 3 {
			t.Errorf("lane %d carried no data frame: every lane should take frames", i)
		}
	}
}

// TestStripedLaneTruncated ends one lane's TCP connection without its end
// frame and end record, as a cut connection would: the receiver fails, and
// what it delivered is a prefix of what was sent.
func TestStripedLaneTruncated(t *testing.T) {
	leaktest.Check(t)
	p := newPair(t, TLS)
	near, far := stripedPair(t, p, 3)
	data := randBytes(8 << 20)
	if _, err := near.Write(data); err != nil {
		t.Fatal(err)
	}
	lane := near.(*stripedStream).lanes[1].(*bulkStream)
	lane.conn.CloseWrite() // a FIN under the lane, no end record
	got, err := io.ReadAll(far)
	if err == nil {
		t.Fatalf("the stream ended cleanly after %d of %d bytes with a lane cut", len(got), len(data))
	}
	if !bytes.Equal(got, data[:len(got)]) {
		t.Fatalf("%d bytes delivered are not a prefix of those sent", len(got))
	}
	t.Logf("cut lane: %d of %d bytes, then %v", len(got), len(data), err)
}

// TestStripedLaneTampered flips a bit in a record of one lane: the record
// fails authentication and the stream fails.
func TestStripedLaneTampered(t *testing.T) {
	leaktest.Check(t)
	p := newPair(t, TLS)
	near, far := stripedPair(t, p, 2)
	lane := near.(*stripedStream).lanes[0].(*bulkStream)
	frame := make([]byte, stripeFrameHeader+5)
	binary.BigEndian.PutUint32(frame[8:], 5)
	var buf bytes.Buffer
	w := &bulkWriter{dst: &buf, c: lane.w.c}
	w.Write(frame)
	rec := buf.Bytes()
	rec[bulkHeaderLen+stripeFrameHeader+2] ^= 0x40
	lane.conn.Write(rec)
	got, err := io.ReadAll(far)
	if len(got) != 0 || !errors.Is(err, ErrBulkAuth) {
		t.Fatalf("tampered lane: %d bytes, %v; want none and ErrBulkAuth", len(got), err)
	}
}

// pipeLane is one end of an in-memory lane, for feeding a striped stream
// frames no honest sender makes.
type pipeLane struct {
	r *io.PipeReader
	w *io.PipeWriter
}

func (l *pipeLane) Read(b []byte) (int, error)  { return l.r.Read(b) }
func (l *pipeLane) Write(b []byte) (int, error) { return l.w.Write(b) }
func (l *pipeLane) CloseWrite() error           { return l.w.Close() }
func (l *pipeLane) Close() error                { l.r.Close(); return l.w.Close() }
func (l *pipeLane) Abort() error {
	l.r.CloseWithError(io.ErrClosedPipe)
	return l.w.CloseWithError(io.ErrClosedPipe)
}

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

func (l *pipeLane) LocalAddr() net.Addr              { return pipeAddr{} }
func (l *pipeLane) RemoteAddr() net.Addr             { return pipeAddr{} }
func (l *pipeLane) SetDeadline(time.Time) error      { return nil }
func (l *pipeLane) SetReadDeadline(time.Time) error  { return nil }
func (l *pipeLane) SetWriteDeadline(time.Time) error { return nil }

// feedStriped makes a striped stream whose lanes carry the given bytes,
// then end, and returns what it reads, and how it ends.
func feedStriped(t testing.TB, lanes ...[]byte) ([]byte, error) {
	var ls []Stream
	var wg sync.WaitGroup
	for _, in := range lanes {
		toStream, fromTest := io.Pipe()
		fromStream, toTest := io.Pipe()
		ls = append(ls, &pipeLane{r: toStream, w: toTest})
		wg.Add(2)
		go func() { defer wg.Done(); fromTest.Write(in); fromTest.Close() }()
		go func() { defer wg.Done(); io.Copy(io.Discard, fromStream) }()
	}
	s := newStriped(ls)
	got, err := io.ReadAll(s)
	s.Abort()
	wg.Wait()
	return got, err
}

// frame is one frame's wire form; n of stripeEnd makes an end frame.
func frame(seq uint64, payload string) []byte {
	b := binary.BigEndian.AppendUint64(nil, seq)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

func endFrame(total uint64) []byte {
	b := binary.BigEndian.AppendUint64(nil, total)
	return binary.BigEndian.AppendUint32(b, stripeEnd)
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// TestStripedFrames feeds a stream of two lanes the frames of a peer that
// reorders, replays, drops or truncates: each fails the stream, after a
// prefix of the bytes, and never hangs.
func TestStripedFrames(t *testing.T) {
	leaktest.Check(t)
	good := [][]byte{
		cat(frame(0, "ab"), frame(2, "ef"), endFrame(4)),
		cat(frame(1, "cd"), frame(3, "gh"), endFrame(4)),
	}
	got, err := feedStriped(t, good...)
	if err != nil || string(got) != "abcdefgh" {
		t.Fatalf("good frames: %q, %v", got, err)
	}
	for name, lanes := range map[string][][]byte{
		"frame twice":                   {cat(frame(0, "ab"), frame(1, "cd"), endFrame(2)), cat(frame(1, "cd"), endFrame(2))},
		"replayed past frame":           {cat(frame(0, "ab"), frame(1, "cd"), endFrame(3)), cat(frame(2, "ef"), frame(0, "ab"), endFrame(3))},
		"backwards on a lane":           {cat(frame(0, "ab"), frame(3, "gh"), frame(2, "ef"), endFrame(4)), cat(frame(1, "cd"), endFrame(4))},
		"frame never sent":              {cat(frame(0, "ab"), frame(2, "ef"), endFrame(4)), cat(frame(3, "gh"), endFrame(4))},
		"totals disagree":               {cat(frame(0, "ab"), endFrame(2)), cat(frame(1, "cd"), endFrame(3))},
		"totals disagree, larger first": {cat(frame(0, "ab"), frame(1, "cd"), endFrame(3)), endFrame(2)},
		"frame past the end":            {cat(frame(0, "ab"), endFrame(1)), cat(frame(1, "cd"), endFrame(1))},
		"end short of the frames":       {cat(frame(0, "ab"), endFrame(3)), cat(frame(1, "cd"), endFrame(3))},
		"lane without end frame":        {cat(frame(0, "ab"), frame(2, "ef"), endFrame(3)), frame(1, "cd")},
		"lane cut mid-frame":            {cat(frame(0, "ab"), endFrame(2)), frame(1, "cd")[:13]},
		"lane goes on after end":        {cat(frame(0, "ab"), endFrame(2), frame(2, "xx")), cat(frame(1, "cd"), endFrame(2))},
		"empty frame":                   {cat(frame(0, ""), endFrame(1)), endFrame(1)},
		"oversized frame":               {binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint64(nil, 0), stripeChunk+1), endFrame(1)},
		"no end at all":                 {nil, nil},
	} {
		got, err := feedStriped(t, lanes...)
		if err == nil || !strings.HasPrefix("abcdefgh", string(got)) {
			t.Errorf("%s: read %q, then %v; want a prefix of abcdefgh, then a failure", name, got, err)
		}
		if !errors.Is(err, ErrStripe) && err != io.ErrUnexpectedEOF {
			t.Errorf("%s: %v, want ErrStripe or io.ErrUnexpectedEOF", name, err)
		}
	}
}

// FuzzStripedFrames feeds two lanes arbitrary bytes: the stream must end;
// a clean end must deliver exactly what a simple reading of the frames
// gives, and a failure a prefix of it.
func FuzzStripedFrames(f *testing.F) {
	f.Add(cat(frame(0, "ab"), frame(2, "ef"), endFrame(4)), cat(frame(1, "cd"), frame(3, "gh"), endFrame(4)))
	f.Add(cat(frame(0, "ab"), endFrame(1)), endFrame(1))
	f.Add(frame(1, "x"), frame(0, "y"))
	f.Fuzz(func(t *testing.T, a, b []byte) {
		got, err := feedStriped(t, a, b)
		want, valid, dup := readFrames(a, b)
		if err == nil && (!valid || !bytes.Equal(got, want)) {
			t.Fatalf("clean end with %q; the frames say %q (valid %v)", got, want, valid)
		}
		if err != nil && !dup && !bytes.HasPrefix(want, got) {
			t.Fatalf("failed (%v) after %q, not a prefix of %q", err, got, want)
		}
	})
}

// readFrames is a plain reading of lanes' frames: the payloads in sequence
// from 0 while they follow on, whether the lanes form a valid stream, and
// whether a frame number came twice (which of the two a stream delivers
// before it fails is not defined).
func readFrames(lanes ...[]byte) (data []byte, valid, dup bool) {
	bySeq := map[uint64][]byte{}
	valid = true
	totals := map[uint64]bool{}
	for _, l := range lanes {
		ended, last, first := false, uint64(0), true
		for len(l) > 0 && !ended {
			if len(l) < stripeFrameHeader {
				valid = false
				break
			}
			seq, n := binary.BigEndian.Uint64(l), binary.BigEndian.Uint32(l[8:])
			l = l[stripeFrameHeader:]
			if n == stripeEnd {
				ended = true
				totals[seq] = true
				continue
			}
			if n == 0 || n > stripeChunk || int(n) > len(l) || (!first && seq <= last) {
				valid = false
				break
			}
			if _, seen := bySeq[seq]; seen {
				valid, dup = false, true
			}
			bySeq[seq] = l[:n]
			l = l[n:]
			last, first = seq, false
		}
		if !ended || len(l) > 0 {
			valid = false
		}
	}
	var out []byte
	var seq uint64
	for ; bySeq[seq] != nil; seq++ {
		out = append(out, bySeq[seq]...)
	}
	if len(totals) != 1 || !totals[seq] || len(bySeq) != int(seq) {
		valid = false
	}
	return out, valid, dup
}

// reservedLane opens one lane as OpenStriped does, its dial reserved.
func reservedLane(ctx context.Context, d *Dialer, addr string, h Header) (Stream, error) {
	if err := d.reserveDials(ctx, addr, 1); err != nil {
		return nil, err
	}
	return d.openLane(ctx, addr, h)
}

// TestStripedLanesMustAllCome opens only some lanes of a stream: the
// listener refuses the first with a timeout once the handshake timeout
// passes, and closes the others.
func TestStripedLanesMustAllCome(t *testing.T) {
	leaktest.Check(t)
	p := newPairTimeout(t, TLS, 300*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	h := Header{Kind: KindData, Channel: "main", lane: laneInfo{count: 3}}
	h.lane.group[0] = 7
	errs := make(chan error, 2)
	for _, i := range []uint8{0, 2} {
		go func() {
			lh := h
			lh.lane.index = i
			s, err := reservedLane(ctx, p.d, p.addr, lh)
			if s != nil {
				s.Close()
			}
			errs <- err
		}()
	}
	for range 2 {
		if err := <-errs; !errors.Is(err, &RefusedError{Reason: ReasonTimeout}) {
			t.Errorf("a lane of a stream missing one: %v, want refused: timeout", err)
		}
	}
}

// TestStripedLaneOfAnotherPeer: a peer that names another peer's group
// cannot join its lanes: groups are per peer, so neither fills, no stream
// reaches the listener's owner, and both lanes are refused at the timeout.
func TestStripedLaneOfAnotherPeer(t *testing.T) {
	leaktest.Check(t)
	ca := testpki.NewCA(t)
	dst, src, mallory := ca.NewHost(t, "dst"), ca.NewHost(t, "src"), ca.NewHost(t, "mallory")
	ln, err := Listen("127.0.0.1:0", &Config{Transport: TLS, ServerTLS: dst.Server, ClientTLS: dst.Client,
		HandshakeTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	accepted := make(chan *Incoming, 1)
	actx, acancel := context.WithCancel(ctx)
	go func() {
		in, err := ln.Accept(actx)
		if err == nil {
			in.Refuse(errors.New("test"))
		}
		accepted <- in
	}()
	h := Header{Kind: KindData, Channel: "main", lane: laneInfo{count: 2}}
	h.lane.group[0] = 9
	errs := make(chan error, 2)
	for i, host := range []*testpki.Host{src, mallory} {
		d, err := NewDialer(&Config{Transport: TLS, ServerTLS: host.Server, ClientTLS: host.Client})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		go func() {
			lh := h
			lh.lane.index = uint8(i)
			s, err := reservedLane(ctx, d, ln.Addr().String(), lh)
			if s != nil {
				s.Close()
			}
			errs <- err
		}()
	}
	for range 2 {
		if err := <-errs; !errors.Is(err, &RefusedError{Reason: ReasonTimeout}) {
			t.Errorf("a lane whose group another peer named: %v, want refused: timeout", err)
		}
	}
	acancel()
	if in := <-accepted; in != nil {
		t.Errorf("a stream of two peers' lanes reached the owner: %+v", in.Header)
	}
}

// TestStripedLaneRefusals: lanes over plain and QUIC are refused, as are
// a lane of another stream than its group's, a lane number twice, and
// groups past a peer's budget.
func TestStripedLaneRefusals(t *testing.T) {
	leaktest.Check(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	lane := func(index, count uint8, group byte, channel string) Header {
		h := Header{Kind: KindData, Channel: channel, lane: laneInfo{index: index, count: count}}
		h.lane.group[0] = group
		return h
	}
	for _, tr := range []Transport{Plain, QUIC} {
		p := newPair(t, tr)
		if s, err := p.d.openOne(ctx, p.addr, lane(0, 2, 1, "main")); !errors.Is(err, &RefusedError{Reason: ReasonMalformed}) {
			if s != nil {
				s.Close()
			}
			t.Errorf("a lane over %s: %v, want refused: malformed", tr, err)
		}
	}
	p := newPairTimeout(t, TLS, 5*time.Second)
	p.ln.lanes.peerMax = 1
	first := make(chan error, 1)
	go func() { // the first lane of group 1 waits for its second
		s, err := reservedLane(ctx, p.d, p.addr, lane(0, 2, 1, "main"))
		if s != nil {
			s.Close()
		}
		first <- err
	}()
	for p.ln.lanes.count() == 0 {
		time.Sleep(time.Millisecond)
	}
	for name, h := range map[string]Header{
		"another stream's lane": lane(1, 2, 1, "nbd"),
		"a count of its own":    lane(1, 3, 1, "main"),
		"lane 0 twice":          lane(0, 2, 1, "main"),
	} {
		want := &RefusedError{Reason: ReasonMalformed}
		if s, err := reservedLane(ctx, p.d, p.addr, h); !errors.Is(err, want) {
			if s != nil {
				s.Close()
			}
			t.Errorf("%s: %v, want refused: malformed", name, err)
		}
	}
	if s, err := reservedLane(ctx, p.d, p.addr, lane(0, 2, 2, "main")); !errors.Is(err, &RefusedError{Reason: ReasonLimit}) {
		if s != nil {
			s.Close()
		}
		t.Errorf("a second group past the peer's budget of one: %v, want refused: limit", err)
	}
	if err := <-first; !errors.Is(err, &RefusedError{Reason: ReasonTimeout}) {
		t.Errorf("the first lane of a group that never filled: %v, want refused: timeout", err)
	}
}

// TestStripedCloseWhileStuck: with a peer that reads nothing, a Write and
// a CloseWrite block; Abort must still end the stream at once, and Close
// after it return.
func TestStripedCloseWhileStuck(t *testing.T) {
	leaktest.Check(t)
	var ls []Stream
	for range 2 {
		r, _ := io.Pipe() // nothing arrives
		_, w := io.Pipe() // nothing is read: writes block
		ls = append(ls, &pipeLane{r: r, w: w})
	}
	s := newStriped(ls)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); s.Write(make([]byte, 8<<20)) }()
	go func() { defer wg.Done(); time.Sleep(20 * time.Millisecond); s.CloseWrite() }()
	time.Sleep(50 * time.Millisecond)
	done := make(chan struct{})
	go func() {
		s.Abort()
		s.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Abort and Close hang behind a blocked Write and CloseWrite")
	}
	wg.Wait()
	if _, err := s.Write([]byte("x")); err == nil {
		t.Error("a Write after Abort succeeded")
	}
}

// TestStripedDeadlines: a read deadline that passed fails Read with a
// timeout, one moved away lets it wait again; a write deadline that
// passed fails a Write that cannot queue.
func TestStripedDeadlines(t *testing.T) {
	leaktest.Check(t)
	p := newPair(t, TLS)
	near, far := stripedPair(t, p, 2)
	far.SetReadDeadline(time.Now().Add(30 * time.Millisecond))
	if _, err := far.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read past its deadline: %v", err)
	}
	far.SetReadDeadline(time.Now().Add(time.Hour))
	go near.Write([]byte("after"))
	b := make([]byte, 5)
	if _, err := io.ReadFull(far, b); err != nil || string(b) != "after" {
		t.Fatalf("Read after the deadline moved: %q, %v", b, err)
	}
}

// TestDeadlineStaleTimer: a deadline removed while its timer fires must
// not expire the next one.
func TestDeadlineStaleTimer(t *testing.T) {
	var d deadline
	for i := range 300 {
		d.set(time.Now().Add(time.Microsecond))
		d.set(time.Time{})
		time.Sleep(100 * time.Microsecond) // let a timer already firing finish
		if isClosed(d.expired()) {
			t.Fatalf("try %d: a removed deadline expired", i)
		}
	}
	d.stop()
}

// TestStripedHeaderRoundTrip checks the lane extension's wire form, and
// that a header without it reads as before.
func TestStripedHeaderRoundTrip(t *testing.T) {
	h := Header{Kind: KindData, Channel: "nbd", Index: 2, lane: laneInfo{index: 1, count: 4}}
	h.lane.group[15] = 0xaa
	wire, err := h.AppendBinary(nil)
	if err != nil {
		t.Fatal(err)
	}
	got, err := ReadHeader(bytes.NewReader(wire))
	if err != nil || got != h {
		t.Fatalf("lane header: %+v, %v; want %+v", got, err, h)
	}
	for name, lane := range map[string]laneInfo{"one lane": {count: 1}, "lane past count": {index: 4, count: 4}, "too many": {count: MaxStripes + 1}} {
		bad := h
		bad.lane = lane
		if _, err := bad.AppendBinary(nil); !errors.Is(err, &RefusedError{Reason: ReasonMalformed}) {
			t.Errorf("%s: %v, want refused: malformed", name, err)
		}
	}
	ctl := Header{Kind: KindControl, Channel: "control", lane: laneInfo{count: 2}}
	if _, err := ctl.AppendBinary(nil); err == nil {
		t.Error("a striped control stream was accepted")
	}
	for name, edit := range map[string]func([]byte){
		"reserved bytes":  func(b []byte) { b[len(b)-1] = 1 },
		"no lanes":        func(b []byte) { b[len(b)-3] = 0 },
		"unknown flag":    func(b []byte) { b[6] |= 0x02 },
		"extension short": nil,
	} {
		b := append([]byte(nil), wire...)
		if edit == nil {
			b = b[:len(b)-5]
		} else {
			edit(b)
		}
		if _, err := ReadHeader(bytes.NewReader(b)); !errors.Is(err, &RefusedError{Reason: ReasonMalformed}) {
			t.Errorf("%s: %v, want refused: malformed", name, err)
		}
	}
}

// TestStripedBurst opens 96 streams of four lanes at once, 384 connections
// against a listener that takes 256 in their handshake: the dialer keeps
// its own handshakes within bounds, so every stream opens and echoes.
func TestStripedBurst(t *testing.T) {
	leaktest.Check(t)
	p := newPair(t, TLS)
	wait := p.serve(t, func(in *Incoming) {
		s, err := in.Accept()
		if err != nil {
			return
		}
		defer s.Close()
		io.Copy(s, s)
		s.CloseWrite()
	})
	defer wait()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const streams = 96
	errs := make(chan error, streams)
	for i := range streams {
		go func() {
			s, err := p.d.OpenStriped(ctx, p.addr, Header{Kind: KindData, Channel: "main", Index: uint64(i)}, 4)
			if err != nil {
				errs <- err
				return
			}
			defer s.Close()
			msg := randBytes(64<<10 + i)
			go func() { s.Write(msg); s.CloseWrite() }()
			got, err := io.ReadAll(s)
			if err == nil && !bytes.Equal(got, msg) {
				err = fmt.Errorf("stream %d: %d of %d bytes came back, or they differ", i, len(got), len(msg))
			}
			errs <- err
		}()
	}
	for range streams {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}
