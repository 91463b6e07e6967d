package tunnel

import (
	"net"
	"sync"
	"testing"
	"time"

	"github.com/migtun/migtun/internal/leaktest"
	"github.com/migtun/migtun/internal/testpki"
)

// TestHeaderTimeoutReason: a connection that sends nothing, and one that
// stops halfway through a header, are refused with the timeout reason
// once the handshake timeout passes, not as malformed or internal.
func TestHeaderTimeoutReason(t *testing.T) {
	leaktest.Check(t)
	dst := testpki.NewCA(t).NewHost(t, "dst")
	var mu sync.Mutex
	var reasons []Reason
	got := make(chan struct{}, 2)
	ln, err := Listen("127.0.0.1:0", &Config{Transport: TLS, ServerTLS: dst.Server, ClientTLS: dst.Client,
		AllowPlaintext: true, HandshakeTimeout: 200 * time.Millisecond,
		OnRefused: func(r Reason) {
			mu.Lock()
			reasons = append(reasons, r)
			mu.Unlock()
			got <- struct{}{}
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	silent, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	half, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer half.Close()
	// The first bytes of a plain header: magic and version, then nothing.
	if _, err := half.Write(append(magic[:], Version)); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		select {
		case <-got:
		case <-time.After(30 * time.Second):
			t.Fatal("a stalled connection was never refused")
		}
	}
	mu.Lock()
	defer mu.Unlock()
	for _, r := range reasons {
		if r != ReasonTimeout {
			t.Errorf("stalled connections refused with %v, want %v for both", reasons, ReasonTimeout)
			break
		}
	}
}

// TestHandshakesBounded: with MaxHandshakes connections in their
// handshake, one more is closed at once and refused with the limit
// reason; once they time out, connections are served again.
func TestHandshakesBounded(t *testing.T) {
	leaktest.Check(t)
	ca := testpki.NewCA(t)
	dst, src := ca.NewHost(t, "dst"), ca.NewHost(t, "src")
	refused := make(chan Reason, 16)
	ln, err := Listen("127.0.0.1:0", &Config{Transport: TLS, ServerTLS: dst.Server, ClientTLS: dst.Client,
		HandshakeTimeout: 3 * time.Second, MaxHandshakes: 2, OnRefused: func(r Reason) { refused <- r }})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for range 2 {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	// Both idle connections are accepted before the third: the kernel
	// queues them in order, and the accept loop takes them one by one.
	// It is reset at once: while connecting or at its first read.
	if third, err := net.Dial("tcp", ln.Addr().String()); err == nil {
		defer third.Close()
		third.SetReadDeadline(time.Now().Add(30 * time.Second))
		if _, err := third.Read(make([]byte, 1)); err == nil {
			t.Fatal("the connection past the bound was served")
		}
	}
	if r := <-refused; r != ReasonLimit {
		t.Fatalf("refused with %v, want %v", r, ReasonLimit)
	}
	// The idle ones time out; then a stream is served.
	for range 2 {
		if r := <-refused; r != ReasonTimeout {
			t.Fatalf("idle connection refused with %v, want %v", r, ReasonTimeout)
		}
	}
	d, err := NewDialer(&Config{Transport: TLS, ServerTLS: src.Server, ClientTLS: src.Client})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	accepted := make(chan error, 1)
	go func() { // ends with the accept
		in, err := ln.Accept(t.Context())
		if err == nil {
			var s Stream
			if s, err = in.Accept(); err == nil {
				s.Close()
			}
		}
		accepted <- err
	}()
	s, err := d.Open(t.Context(), ln.Addr().String(), Header{Kind: KindData, Channel: "main"})
	if err != nil {
		t.Fatalf("a stream after the idle connections ended: %v", err)
	}
	s.Close()
	if err := <-accepted; err != nil {
		t.Fatal(err)
	}
}
