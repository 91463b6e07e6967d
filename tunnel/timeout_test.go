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
