package tunnel

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

func TestHeaderRoundTrip(t *testing.T) {
	h := Header{Kind: KindData, Channel: "main", Index: 7}
	h.Session[0], h.Token[31] = 1, 2
	wire, err := h.AppendBinary(nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(wire) != fixedHeaderLen+len("main") {
		t.Fatalf("wire length %d", len(wire))
	}
	// Trailing bytes belong to the stream and must stay unread.
	r := bytes.NewReader(append(wire, "payload"...))
	got, err := ReadHeader(r)
	if err != nil {
		t.Fatal(err)
	}
	if got != h {
		t.Fatalf("got %+v, want %+v", got, h)
	}
	rest, _ := io.ReadAll(r)
	if string(rest) != "payload" {
		t.Fatalf("header read consumed stream bytes: rest %q", rest)
	}
}

func TestHeaderRefusals(t *testing.T) {
	valid, _ := (&Header{Kind: KindData, Channel: "nbd"}).AppendBinary(nil)
	mutate := func(f func(b []byte) []byte) []byte {
		return f(append([]byte(nil), valid...))
	}
	cases := []struct {
		name string
		wire []byte
		want Reason
	}{
		{"empty", nil, ReasonMalformed},
		{"short", valid[:50], ReasonMalformed},
		{"bad magic", mutate(func(b []byte) []byte { b[0] = 'X'; return b }), ReasonMalformed},
		{"version 2", mutate(func(b []byte) []byte { b[4] = 2; return b }), ReasonBadVersion},
		{"unknown kind", mutate(func(b []byte) []byte { b[5] = 99; return b }), ReasonUnknownKind},
		{"flags", mutate(func(b []byte) []byte { b[6] = 1; return b }), ReasonMalformed},
		{"zero channel length", mutate(func(b []byte) []byte { b[7] = 0; return b }), ReasonBadChannel},
		{"channel too long", mutate(func(b []byte) []byte { b[7] = MaxChannelLen + 1; return b }), ReasonBadChannel},
		{"channel cut short", mutate(func(b []byte) []byte { b[7] = 10; return b }), ReasonMalformed},
		{"channel with slash", mutate(func(b []byte) []byte { b[fixedHeaderLen] = '/'; return b }), ReasonBadChannel},
		{"http request", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n" + strings.Repeat("x", 200)), ReasonMalformed},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ReadHeader(bytes.NewReader(c.wire))
			if !errors.Is(err, &RefusedError{Reason: c.want}) {
				t.Fatalf("got %v, want reason %s", err, c.want)
			}
		})
	}
}

func TestAppendBinaryRefusesBadHeaders(t *testing.T) {
	for _, h := range []Header{
		{Kind: KindData, Channel: ""},
		{Kind: KindData, Channel: "../etc/passwd"},
		{Kind: KindData, Channel: strings.Repeat("a", MaxChannelLen+1)},
		{Kind: 0, Channel: "main"},
	} {
		if _, err := h.AppendBinary(nil); err == nil {
			t.Errorf("AppendBinary(%+v) succeeded", h)
		}
	}
}

// limitedReader fails the test if more than MaxHeaderLen bytes are read.
type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

func FuzzReadHeader(f *testing.F) {
	for _, h := range []Header{
		{Kind: KindData, Channel: "main"},
		{Kind: KindControl, Channel: "control", Index: 1 << 40},
		{Kind: KindPlainKey, Channel: strings.Repeat("z", MaxChannelLen)},
	} {
		w, _ := h.AppendBinary(nil)
		f.Add(w)
	}
	f.Add([]byte("MGTN"))
	f.Add([]byte{0x16, 3, 1, 0, 200})
	f.Fuzz(func(t *testing.T, data []byte) {
		cr := &countingReader{r: bytes.NewReader(data)}
		h, err := ReadHeader(cr)
		if cr.n > MaxHeaderLen {
			t.Fatalf("read %d bytes, limit %d", cr.n, MaxHeaderLen)
		}
		if err != nil {
			var re *RefusedError
			if !errors.As(err, &re) {
				t.Fatalf("error %v is not a *RefusedError", err)
			}
			return
		}
		// A header that parses re-encodes to the bytes it came from.
		w, err := h.AppendBinary(nil)
		if err != nil {
			t.Fatalf("parsed header does not encode: %v", err)
		}
		if !bytes.Equal(w, data[:len(w)]) {
			t.Fatalf("re-encoded %x, read from %x", w, data[:len(w)])
		}
	})
}

func FuzzReadReply(f *testing.F) {
	f.Add(reply{reason: ReasonOK}.appendBinary(nil))
	f.Add(reply{reason: ReasonNoRoute, payload: []byte("no route for channel \"x\"")}.appendBinary(nil))
	f.Add([]byte{1, 5, 255})
	f.Fuzz(func(t *testing.T, data []byte) {
		cr := &countingReader{r: bytes.NewReader(data)}
		r, err := readReply(cr)
		if cr.n > MaxReplyLen {
			t.Fatalf("read %d bytes, limit %d", cr.n, MaxReplyLen)
		}
		if err != nil {
			return
		}
		if e := r.err(); e != nil && strings.ContainsAny(e.Error(), "\x00\n\r") {
			t.Fatalf("control characters reach the error text: %q", e.Error())
		}
		w := r.appendBinary(nil)
		if !bytes.Equal(w, data[:len(w)]) {
			t.Fatalf("re-encoded %x, read from %x", w, data[:len(w)])
		}
	})
}

func TestReplayWindow(t *testing.T) {
	var k serverKey
	for _, c := range []uint64{1, 2, 5, 3} {
		if !k.fresh(c) {
			t.Fatalf("counter %d refused", c)
		}
	}
	for _, c := range []uint64{1, 2, 3, 5} {
		if k.fresh(c) {
			t.Fatalf("replayed counter %d accepted", c)
		}
	}
	if !k.fresh(4) {
		t.Fatal("counter 4 refused")
	}
	if !k.fresh(5 + replayWindow - 1) {
		t.Fatal("jump refused")
	}
	if k.fresh(5) {
		t.Fatal("counter 5 accepted after a jump that keeps it in the window")
	}
	if !k.fresh(6) {
		t.Fatal("unseen counter 6 refused")
	}
	if k.fresh(4) {
		t.Fatal("counter 4 accepted after it left the window")
	}
	if !k.fresh(1 << 40) {
		t.Fatal("big jump refused")
	}
	if k.fresh(1<<40 - replayWindow) {
		t.Fatal("counter outside the window accepted")
	}
	if !k.fresh(1<<40 - 1) {
		t.Fatal("unseen counter inside the window refused")
	}
}
