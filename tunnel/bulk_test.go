package tunnel

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"math"
	"net"
	"os"
	"testing"
	"time"

	"github.com/migtun/migtun/internal/leaktest"
)

// testSecret stands in for the TLS exporter's output in record-level tests.
var testSecret = bytes.Repeat([]byte{0x5a}, 32)

// testEnds returns a writer of the client end and a reader of the server
// end, the client → server direction, joined by nothing: the writer writes
// to w and the reader reads from r.
func testEnds(t testing.TB, w io.Writer, r io.Reader) (*bulkWriter, *bulkReader) {
	t.Helper()
	cs, _, err := bulkCiphers(testSecret, true)
	if err != nil {
		t.Fatal(err)
	}
	_, sr, err := bulkCiphers(testSecret, false)
	if err != nil {
		t.Fatal(err)
	}
	return &bulkWriter{dst: w, c: cs}, &bulkReader{src: r, c: sr}
}

// sealed returns the wire bytes of one data record per payload, followed by
// the end record when end is set, and each record's offset.
func sealed(t testing.TB, end bool, payloads ...[]byte) (wire []byte, offsets []int) {
	t.Helper()
	var buf bytes.Buffer
	w, _ := testEnds(t, &buf, nil)
	for _, p := range payloads {
		offsets = append(offsets, buf.Len())
		if _, err := w.Write(p); err != nil {
			t.Fatal(err)
		}
	}
	if end {
		offsets = append(offsets, buf.Len())
		w.mu.Lock()
		err := w.sendEnd()
		w.mu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
	}
	return buf.Bytes(), offsets
}

// decode reads everything from wire with the server end's reader.
func decode(t testing.TB, wire []byte) ([]byte, error) {
	t.Helper()
	_, r := testEnds(t, nil, bytes.NewReader(wire))
	var out bytes.Buffer
	_, err := r.WriteTo(&out)
	return out.Bytes(), err
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func TestBulkRecordRoundTrip(t *testing.T) {
	for _, size := range []int{1, 100, 16 << 10, bulkMaxPayload - 1, bulkMaxPayload, bulkMaxPayload + 1, 3*bulkMaxPayload + 7} {
		msg := randBytes(size)
		wire, _ := sealed(t, true, msg, msg[:1])
		got, err := decode(t, wire)
		if err != nil || !bytes.Equal(got, append(msg, msg[0])) {
			t.Fatalf("size %d: err %v, %d bytes back", size, err, len(got))
		}
		// Read with buffers smaller, equal and larger than a record.
		for _, rb := range []int{1, 4093, bulkMaxPayload + bulkTagLen, 1 << 20} {
			_, r := testEnds(t, nil, bytes.NewReader(wire))
			buf := make([]byte, rb)
			var out []byte
			for {
				n, err := r.Read(buf)
				out = append(out, buf[:n]...)
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatalf("size %d, reads of %d: %v", size, rb, err)
				}
			}
			if !bytes.Equal(out, append(msg, msg[0])) {
				t.Fatalf("size %d, reads of %d: bytes differ", size, rb)
			}
		}
	}
}

// TestBulkRecordTampering flips every bit of a record stream, one at a
// time: each must fail, with nothing of the changed record delivered.
func TestBulkRecordTampering(t *testing.T) {
	first, second := randBytes(40), randBytes(24)
	wire, offsets := sealed(t, true, first, second)
	for i := range wire {
		for bit := range 8 {
			bad := bytes.Clone(wire)
			bad[i] ^= 1 << bit
			got, err := decode(t, bad)
			if err == nil || err == io.EOF {
				t.Fatalf("byte %d bit %d flipped: no error", i, bit)
			}
			if !errors.Is(err, ErrBulkAuth) && !errors.Is(err, ErrBulkMalformed) && err != io.ErrUnexpectedEOF {
				t.Fatalf("byte %d bit %d flipped: %v", i, bit, err)
			}
			want := 0 // bytes of the records before the changed one
			if i >= offsets[1] {
				want = len(first)
			}
			if i >= offsets[2] {
				want += len(second)
			}
			if len(got) != want {
				t.Fatalf("byte %d bit %d flipped: %d bytes delivered, want %d", i, bit, len(got), want)
			}
		}
	}
}

func TestBulkRecordReplayReorderDrop(t *testing.T) {
	a, b, c := randBytes(10), randBytes(20), randBytes(30)
	wire, off := sealed(t, true, a, b, c)
	rec := func(i int) []byte { return wire[off[i]:off[i+1]] }
	end := wire[off[3]:]
	cases := map[string]struct {
		wire []byte
		good int // bytes delivered before the failure
	}{
		"replay":               {concat(rec(0), rec(0), rec(1), rec(2), end), len(a)},
		"reorder":              {concat(rec(1), rec(0), rec(2), end), 0},
		"drop":                 {concat(rec(0), rec(2), end), len(a)},
		"end early, then data": {concat(rec(0), end), len(a)}, // a clean end, but b and c never arrive
	}
	for name, tc := range cases {
		got, err := decode(t, tc.wire)
		if name == "end early, then data" {
			// An end record out of sequence does not open.
			if !errors.Is(err, ErrBulkAuth) || len(got) != tc.good {
				t.Fatalf("%s: %d bytes, %v", name, len(got), err)
			}
			continue
		}
		if !errors.Is(err, ErrBulkAuth) || len(got) != tc.good {
			t.Fatalf("%s: got %d bytes and %v, want %d bytes and ErrBulkAuth", name, len(got), err, tc.good)
		}
	}
}

func concat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// TestBulkRecordReflection sends a record back to the end that sealed it.
func TestBulkRecordReflection(t *testing.T) {
	wire, _ := sealed(t, true, []byte("hello"))
	_, cr, err := bulkCiphers(testSecret, true)
	if err != nil {
		t.Fatal(err)
	}
	r := &bulkReader{src: bytes.NewReader(wire), c: cr} // the client's own reader
	if _, err := io.ReadAll(r); !errors.Is(err, ErrBulkAuth) {
		t.Fatalf("reflected record: %v, want ErrBulkAuth", err)
	}
}

// TestBulkRecordTruncation cuts the stream at every offset: only the whole
// stream, end record included, ends cleanly.
func TestBulkRecordTruncation(t *testing.T) {
	wire, _ := sealed(t, true, randBytes(50), randBytes(70))
	for cut := 0; cut < len(wire); cut++ {
		if _, err := decode(t, wire[:cut]); err != io.ErrUnexpectedEOF {
			t.Fatalf("cut at %d of %d: %v, want io.ErrUnexpectedEOF", cut, len(wire), err)
		}
		_, r := testEnds(t, nil, bytes.NewReader(wire[:cut]))
		if _, err := io.ReadAll(r); err != io.ErrUnexpectedEOF {
			t.Fatalf("cut at %d, Read: %v, want io.ErrUnexpectedEOF", cut, err)
		}
	}
	if _, err := decode(t, wire); err != nil {
		t.Fatalf("whole stream: %v", err)
	}
}

func TestBulkRecordCounterExhausted(t *testing.T) {
	w, _ := testEnds(t, io.Discard, nil)
	w.c.seq = math.MaxUint64
	if _, err := w.Write([]byte("x")); !errors.Is(err, errBulkExhausted) {
		t.Fatalf("write at the last counter: %v", err)
	}
	if _, err := w.Write([]byte("x")); err == nil {
		t.Fatal("write after a failed write succeeded")
	}
}

// timeoutReader hands out its data in pieces and fails with a timeout
// after every piece, as a socket with a read deadline would.
type timeoutReader struct {
	data    []byte
	piece   int
	timeout bool
}

func (r *timeoutReader) Read(b []byte) (int, error) {
	if r.timeout {
		r.timeout = false
		return 0, os.ErrDeadlineExceeded
	}
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	n := copy(b[:min(len(b), r.piece)], r.data)
	r.data = r.data[n:]
	r.timeout = true
	return n, nil
}

// TestBulkRecordReadTimeoutResumes checks that a deadline in the middle of
// a record loses nothing: the next Read goes on with the same record.
func TestBulkRecordReadTimeoutResumes(t *testing.T) {
	msg := randBytes(100 << 10)
	wire, _ := sealed(t, true, msg, msg)
	for _, rb := range []int{1000, 1 << 20} { // buffered and in place
		_, r := testEnds(t, nil, &timeoutReader{data: wire, piece: 7777})
		buf := make([]byte, rb)
		var out []byte
		timeouts := 0
		for {
			n, err := r.Read(buf)
			out = append(out, buf[:n]...)
			if errors.Is(err, os.ErrDeadlineExceeded) {
				timeouts++
				continue
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
		}
		if timeouts == 0 || !bytes.Equal(out, append(msg, msg...)) {
			t.Fatalf("reads of %d: %d timeouts, %d bytes", rb, timeouts, len(out))
		}
	}
}

func TestBulkRecordNoAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("sync.Pool drops buffers at random under the race detector")
	}
	msg := randBytes(64 << 10)
	w, _ := testEnds(t, io.Discard, nil)
	if a := testing.AllocsPerRun(100, func() { w.Write(msg) }); a != 0 {
		t.Errorf("Write: %v allocations per record", a)
	}
	if a := testing.AllocsPerRun(100, func() { w.ReadFrom(bytes.NewReader(msg)) }); a > 1 { // the bytes.Reader
		t.Errorf("ReadFrom: %v allocations per record", a)
	}
	var payloads [][]byte
	for range 202 {
		payloads = append(payloads, msg)
	}
	wire, _ := sealed(t, false, payloads...)
	src := bytes.NewReader(wire)
	_, r := testEnds(t, nil, src)
	buf := make([]byte, 1<<20)
	if a := testing.AllocsPerRun(100, func() { r.Read(buf) }); a != 0 {
		t.Errorf("Read in place: %v allocations per record", a)
	}
	small := make([]byte, 32<<10)
	if a := testing.AllocsPerRun(100, func() { r.Read(small) }); a != 0 {
		t.Errorf("Read buffered: %v allocations per record", a)
	}
}

// FuzzBulkRecord feeds arbitrary bytes to the record decoder. It must never
// panic, and whatever it accepts up to a clean end must be exactly what the
// encoder makes of the payloads it delivered: nothing else authenticates.
func FuzzBulkRecord(f *testing.F) {
	w1, _ := sealed(f, true, []byte("hello"))
	w2, _ := sealed(f, true, []byte("a"), bytes.Repeat([]byte{1}, 300))
	w3, _ := sealed(f, false, []byte("no end"))
	f.Add(w1)
	f.Add(w2)
	f.Add(w3)
	f.Add([]byte{})
	f.Add([]byte{bulkTypeData, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, wire []byte) {
		_, r := testEnds(t, nil, bytes.NewReader(wire))
		var payloads [][]byte
		var err error
		for {
			var p []byte
			p, _, err = r.readRecord(nil)
			if err != nil {
				break
			}
			payloads = append(payloads, bytes.Clone(p))
			r.release()
		}
		// Read with a buffer of a size taken from the input, so that both
		// the in-place and the buffered path see it, must agree.
		_, r2 := testEnds(t, nil, bytes.NewReader(wire))
		buf := make([]byte, 1+len(wire)%(2*bulkMaxPayload))
		var viaRead []byte
		var rerr error
		for {
			n, e := r2.Read(buf)
			viaRead = append(viaRead, buf[:n]...)
			if e != nil {
				rerr = e
				break
			}
		}
		if !bytes.Equal(viaRead, bytes.Join(payloads, nil)) || (rerr == io.EOF) != (err == io.EOF) {
			t.Fatalf("Read and readRecord disagree: %d vs %d bytes, %v vs %v", len(viaRead), len(bytes.Join(payloads, nil)), rerr, err)
		}
		if err != io.EOF {
			return // refused: fine, as long as it did not panic
		}
		again, _ := sealed(t, true, payloads...)
		if !bytes.HasPrefix(wire, again) {
			t.Fatalf("decoder accepted bytes the encoder does not make")
		}
	})
}

// bulkPair opens one tls data stream and returns both ends.
func bulkPair(t testing.TB, p *pair) (near, far Stream) {
	t.Helper()
	accepted := make(chan Stream, 1)
	go func() {
		in, err := p.ln.Accept(context.Background())
		if err != nil {
			accepted <- nil
			return
		}
		s, _ := in.Accept()
		accepted <- s
	}()
	near, err := p.d.Open(context.Background(), p.addr, Header{Kind: KindData, Channel: "main"})
	far = <-accepted
	if err != nil || far == nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() { near.Close(); far.Close() })
	return near, far
}

func TestBulkStreamNegotiated(t *testing.T) {
	leaktest.Check(t)
	p := newPair(t, TLS)
	near, far := bulkPair(t, p)
	if _, ok := near.(*bulkStream); !ok {
		t.Fatalf("dialer's data stream is %T, want the bulk record layer", near)
	}
	if _, ok := far.(*bulkStream); !ok {
		t.Fatalf("listener's data stream is %T, want the bulk record layer", far)
	}
	// Either side without the bulk layer: plain crypto/tls, still working.
	for _, side := range []string{"dialer", "listener"} {
		q := newPair(t, TLS)
		if side == "dialer" {
			q.d.cfg.DisableBulk = true
		} else {
			q.ln.Close()
			cfg := *q.ln.cfg
			cfg.DisableBulk = true
			ln, err := Listen("127.0.0.1:0", &cfg)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ln.Close() })
			q.ln, q.addr = ln, ln.Addr().String()
		}
		near, far := bulkPair(t, q)
		_, ok1 := near.(*tlsStream)
		_, ok2 := far.(*tlsStream)
		if !ok1 || !ok2 {
			t.Fatalf("bulk disabled on the %s: streams %T and %T, want crypto/tls", side, near, far)
		}
		if tc := near.(*tlsStream).NetConn().(*tcpConn); tc.bounded {
			t.Fatalf("bulk disabled on the %s: reads still bounded to records", side)
		}
		echoOnce(t, near, far)
	}
}

// echoOnce sends a message from near to far and back.
func echoOnce(t *testing.T, near, far Stream) {
	t.Helper()
	msg := randBytes(100 << 10)
	go func() {
		buf := make([]byte, len(msg))
		if _, err := io.ReadFull(far, buf); err == nil {
			far.Write(buf)
		}
	}()
	if _, err := near.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(near, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo: %v", err)
	}
}

// TestBulkSwitchNoReadAhead has the listener write bulk records right after
// its accept reply, before the dialer has read the reply, so that both sit
// in the dialer's socket together. crypto/tls reads ahead whatever the
// socket holds; only the bound on reads to TLS records keeps the first
// records out of its buffer.
func TestBulkSwitchNoReadAhead(t *testing.T) {
	run := func(t *testing.T) error {
		p := newPair(t, TLS)
		msg := randBytes(1 << 20)
		written := make(chan struct{})
		done := make(chan struct{})
		testHookBeforeReply = func() {
			select {
			case <-written:
				time.Sleep(50 * time.Millisecond) // let the last bytes land
			case <-time.After(5 * time.Second):
			}
		}
		defer func() { testHookBeforeReply = nil }()
		go func() {
			defer close(done)
			in, err := p.ln.Accept(context.Background())
			if err != nil {
				close(written)
				return
			}
			s, err := in.Accept()
			if err != nil {
				close(written)
				return
			}
			defer s.Close()
			s.Write(msg[:100])
			close(written)
			s.Write(msg[100:])
			s.CloseWrite()
			io.Copy(io.Discard, s)
		}()
		s, err := p.d.Open(context.Background(), p.addr, Header{Kind: KindData, Channel: "main"})
		if err != nil {
			<-done
			return err
		}
		s.SetReadDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(s)
		s.Close()
		<-done
		if err == nil && !bytes.Equal(got, msg) {
			err = errors.New("bytes differ")
		}
		return err
	}
	t.Run("bounded", func(t *testing.T) {
		leaktest.Check(t)
		if err := run(t); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("unbounded reads lose the first records", func(t *testing.T) {
		boundTLSReads = false
		defer func() { boundTLSReads = true }()
		if err := run(t); err == nil {
			t.Fatal("the test did not see crypto/tls read ahead: it proves nothing")
		} else {
			t.Logf("without the bound: %v", err)
		}
	})
}

// TestBulkStreamHalfClose ends the listener's direction first; the dialer
// goes on sending, and the listener receives it all.
func TestBulkStreamHalfClose(t *testing.T) {
	leaktest.Check(t)
	p := newPair(t, TLS)
	near, far := bulkPair(t, p)
	if err := far.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if n, err := near.Read(make([]byte, 10)); n != 0 || err != io.EOF {
		t.Fatalf("read after the peer's CloseWrite: %d, %v; want io.EOF", n, err)
	}
	if _, err := far.Write([]byte("x")); err == nil {
		t.Fatal("write after CloseWrite succeeded")
	}
	msg := randBytes(3<<20 + 5)
	go func() {
		near.Write(msg)
		near.CloseWrite()
	}()
	got, err := io.ReadAll(far)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("after half close: %d bytes, %v", len(got), err)
	}
}

// TestBulkStreamTruncation ends a stream's TCP connection without the end
// record (a FIN, as a peer that died between records), and with a reset.
func TestBulkStreamTruncation(t *testing.T) {
	leaktest.Check(t)
	p := newPair(t, TLS)
	t.Run("fin without end record", func(t *testing.T) {
		near, far := bulkPair(t, p)
		near.Write([]byte("some bytes"))
		near.(*bulkStream).conn.CloseWrite() // TCP FIN, no end record
		got, err := io.ReadAll(far)
		if err != io.ErrUnexpectedEOF || string(got) != "some bytes" {
			t.Fatalf("got %q, %v; want the bytes, then io.ErrUnexpectedEOF", got, err)
		}
	})
	t.Run("cut mid-record", func(t *testing.T) {
		near, far := bulkPair(t, p)
		bs := near.(*bulkStream)
		var buf bytes.Buffer
		w := &bulkWriter{dst: &buf, c: bs.w.c}
		w.Write(randBytes(1000))
		bs.conn.Write(buf.Bytes()[:500])
		bs.conn.CloseWrite()
		if got, err := io.ReadAll(far); err != io.ErrUnexpectedEOF || len(got) != 0 {
			t.Fatalf("got %d bytes, %v; want none, then io.ErrUnexpectedEOF", len(got), err)
		}
	})
	t.Run("abort", func(t *testing.T) {
		near, far := bulkPair(t, p)
		near.Write([]byte("x"))
		time.Sleep(20 * time.Millisecond)
		near.Abort()
		_, err := io.ReadAll(far)
		if err == nil || err == io.EOF {
			t.Fatalf("after abort: %v, want a failure", err)
		}
	})
	t.Run("close is a clean end", func(t *testing.T) {
		near, far := bulkPair(t, p)
		near.Write([]byte("last"))
		near.Close()
		got, err := io.ReadAll(far)
		if err != nil || string(got) != "last" {
			t.Fatalf("got %q, %v", got, err)
		}
	})
}

// TestBulkStreamTampered flips a bit of a record on the wire between two
// real ends: the receiver fails and delivers nothing of it.
func TestBulkStreamTampered(t *testing.T) {
	leaktest.Check(t)
	p := newPair(t, TLS)
	near, far := bulkPair(t, p)
	bs := near.(*bulkStream)
	var buf bytes.Buffer
	w := &bulkWriter{dst: &buf, c: bs.w.c}
	w.Write([]byte("secret payload"))
	rec := buf.Bytes()
	rec[bulkHeaderLen+3] ^= 0x10
	bs.conn.Write(rec)
	n, err := far.Read(make([]byte, 100))
	if n != 0 || !errors.Is(err, ErrBulkAuth) {
		t.Fatalf("tampered record: %d bytes, %v", n, err)
	}
}

// TestBulkStreamDeadline checks deadlines reach the connection.
func TestBulkStreamDeadline(t *testing.T) {
	leaktest.Check(t)
	p := newPair(t, TLS)
	near, far := bulkPair(t, p)
	near.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	_, err := near.Read(make([]byte, 10))
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read past the deadline: %v", err)
	}
	near.SetReadDeadline(time.Time{})
	echoOnce(t, near, far) // a timeout between records harms nothing
}

// BenchmarkBulkRecord seals and opens records in memory: the cost of the
// record layer alone.
func BenchmarkBulkRecord(b *testing.B) {
	msg := randBytes(bulkMaxPayload)
	var wire bytes.Buffer
	w, _ := testEnds(b, &wire, nil)
	_, r := testEnds(b, nil, &wire)
	buf := make([]byte, bulkMaxPayload+bulkTagLen)
	b.SetBytes(int64(len(msg)))
	for b.Loop() {
		wire.Reset()
		if _, err := w.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := r.Read(buf); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkTLSStream moves bytes one way over a loopback tls stream, with
// the bulk record layer and with crypto/tls records (DisableBulk).
func BenchmarkTLSStream(b *testing.B) {
	for _, mode := range []string{"bulk", "crypto-tls"} {
		b.Run(mode, func(b *testing.B) {
			p := newPair(b, TLS)
			p.d.cfg.DisableBulk = mode != "bulk"
			near, far := bulkPair(b, p)
			benchOneWay(b, near, far)
		})
	}
}
