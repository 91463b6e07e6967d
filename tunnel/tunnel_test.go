package tunnel

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/migtun/migtun/internal/leaktest"
	"github.com/migtun/migtun/internal/testlog"
	"github.com/migtun/migtun/internal/testpki"
)

// pair is a listening host and a dialing host on loopback.
type pair struct {
	ln      *Listener
	d       *Dialer
	addr    string
	refused atomic.Int64
}

func newPair(t testing.TB, tr Transport) *pair {
	t.Helper()
	return newPairTimeout(t, tr, 0)
}

// newPairTimeout is newPair with the listener's handshake timeout; zero
// keeps the default, which a slow machine under -race does not reach.
func newPairTimeout(t testing.TB, tr Transport, handshake time.Duration) *pair {
	t.Helper()
	ca := testpki.NewCA(t)
	src, dst := ca.NewHost(t, "src"), ca.NewHost(t, "dst")
	p := &pair{}
	ln, err := Listen("127.0.0.1:0", &Config{
		Transport: tr, ServerTLS: dst.Server, ClientTLS: dst.Client, AllowPlaintext: true,
		HandshakeTimeout: handshake,
		OnRefused:        func(Reason) { p.refused.Add(1) },
	})
	if err != nil {
		t.Fatal(err)
	}
	d, err := NewDialer(&Config{Transport: tr, ServerTLS: src.Server, ClientTLS: src.Client, AllowPlaintext: true})
	if err != nil {
		t.Fatal(err)
	}
	p.ln, p.d, p.addr = ln, d, ln.Addr().String()
	t.Cleanup(func() {
		d.Close()
		ln.Close()
	})
	return p
}

var transports = []Transport{TLS, QUIC, Plain}

// serve accepts streams and hands each to handle; it returns a function
// that waits for all of them.
func (p *pair) serve(t *testing.T, handle func(*Incoming)) (wait func()) {
	var wg sync.WaitGroup
	ctx, cancel := context.WithCancel(context.Background())
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			in, err := p.ln.Accept(ctx)
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				handle(in)
			}()
		}
	}()
	t.Cleanup(func() { cancel(); wg.Wait() })
	return func() { cancel(); wg.Wait() }
}

func TestTransports(t *testing.T) {
	for _, tr := range transports {
		t.Run(string(tr), func(t *testing.T) {
			leaktest.Check(t)
			t.Run("duplex with half close", func(t *testing.T) { testDuplexHalfClose(t, tr) })
			t.Run("refusal reaches dialer", func(t *testing.T) { testRefusal(t, tr) })
			t.Run("garbage refused, stream in flight unharmed", func(t *testing.T) { testGarbage(t, tr) })
			t.Run("many streams in order", func(t *testing.T) { testOrder(t, tr) })
		})
	}
}

// testDuplexHalfClose sends 8 MiB each way; the dialer closes its write side
// first and must still receive everything the listener sends afterwards.
func testDuplexHalfClose(t *testing.T, tr Transport) {
	p := newPair(t, tr)
	const size = 8 << 20
	up := make([]byte, size)
	rand.Read(up)
	upSum := sha256.Sum256(up)
	p.serve(t, func(in *Incoming) {
		if in.Header.Channel != "main" || in.Peer != "src" {
			in.Refuse(&RefusedError{Reason: ReasonNoRoute, Detail: in.Header.Channel + " from " + in.Peer})
			return
		}
		s, err := in.Accept()
		if err != nil {
			t.Error(err)
			return
		}
		defer s.Close()
		h := sha256.New()
		if _, err := io.Copy(h, s); err != nil {
			t.Error("listener read:", err)
			return
		}
		// The dialer's write side is closed; answer with the digest and
		// 8 MiB, then close ours.
		if _, err := s.Write(h.Sum(nil)); err != nil {
			t.Error(err)
			return
		}
		if _, err := io.CopyN(s, zeroReader{}, size); err != nil {
			t.Error(err)
			return
		}
		if err := s.CloseWrite(); err != nil {
			t.Error(err)
		}
	})
	s, err := p.d.Open(context.Background(), p.addr, Header{Kind: KindData, Channel: "main"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Write(up); err != nil {
		t.Fatal(err)
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	back, err := io.ReadAll(s)
	if err != nil {
		t.Fatal("read after half close:", err)
	}
	if len(back) != 32+size {
		t.Fatalf("got %d bytes back, want %d", len(back), 32+size)
	}
	if !bytes.Equal(back[:32], upSum[:]) {
		t.Fatal("digest mismatch: bytes lost or changed on the way")
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) { clear(p); return len(p), nil }

func testRefusal(t *testing.T, tr Transport) {
	p := newPair(t, tr)
	p.serve(t, func(in *Incoming) {
		in.Refuse(&RefusedError{Reason: ReasonNoRoute, Detail: "no route for channel \"" + in.Header.Channel + "\""})
	})
	_, err := p.d.Open(context.Background(), p.addr, Header{Kind: KindData, Channel: "nbd"})
	var re *RefusedError
	if !errors.As(err, &re) || re.Reason != ReasonNoRoute || re.Detail != `no route for channel "nbd"` {
		t.Fatalf("got %v, want a no_route refusal naming the channel", err)
	}
}

// testGarbage throws junk, a half-open connection and a slow sender at the
// port while a stream is moving data.
func testGarbage(t *testing.T, tr Transport) {
	p := newPairTimeout(t, tr, 2*time.Second) // garbage must be closed before the 5 s read deadline
	p.serve(t, func(in *Incoming) {
		s, err := in.Accept()
		if err != nil {
			return
		}
		defer s.Close()
		io.Copy(s, s) // echo
		s.CloseWrite()
	})
	s, err := p.d.Open(context.Background(), p.addr, Header{Kind: KindData, Channel: "main"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	echo := func() {
		msg := make([]byte, 64<<10)
		rand.Read(msg)
		if _, err := s.Write(msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(s, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("echo broken: %v", err)
		}
	}
	echo()
	network := "tcp"
	if tr == QUIC {
		network = "udp"
	}
	junk := [][]byte{
		[]byte("GET / HTTP/1.1\r\n\r\n"),
		bytes.Repeat([]byte{0xff}, 4096),
		append([]byte("MGTN\x01\x01\x00\x04"), make([]byte, 200)...), // plain header without a valid MAC
		{0x16, 3, 1, 0, 5, 1, 2, 3, 4, 5},                            // broken ClientHello
	}
	for _, j := range junk {
		c, err := net.Dial(network, p.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.Write(j)
		if tr != QUIC {
			// The port answers or closes within the handshake deadline.
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadAll(c); err != nil && !errors.Is(err, net.ErrClosed) {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Fatalf("junk %q: connection still open after the handshake deadline", j[:4])
				}
			}
		}
		c.Close()
	}
	// A half-open connection that never sends is dropped at the deadline.
	if tr != QUIC {
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 1))
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("silent connection not dropped at the handshake deadline")
		}
		c.Close()
		if got := p.refused.Load(); got < int64(len(junk)) {
			t.Fatalf("%d refusals counted, want at least %d", got, len(junk))
		}
	}
	echo()
}

// testOrder opens streams one after another and checks the listener sees
// them in that order, each accepted before the next is opened.
func testOrder(t *testing.T, tr Transport) {
	p := newPair(t, tr)
	var mu sync.Mutex
	var seen []uint64
	p.serve(t, func(in *Incoming) {
		mu.Lock()
		seen = append(seen, in.Header.Index)
		mu.Unlock()
		s, err := in.Accept()
		if err != nil {
			return
		}
		io.Copy(io.Discard, s)
		s.Close()
	})
	const n = 20
	var streams []Stream
	for i := range uint64(n) {
		s, err := p.d.Open(context.Background(), p.addr, Header{Kind: KindData, Channel: "main", Index: i})
		if err != nil {
			t.Fatal(err)
		}
		streams = append(streams, s)
	}
	for _, s := range streams {
		s.Close()
	}
	mu.Lock()
	defer mu.Unlock()
	for i, idx := range seen {
		if idx != uint64(i) {
			t.Fatalf("accepted in order %v", seen)
		}
	}
	if len(seen) != n {
		t.Fatalf("saw %d streams, want %d", len(seen), n)
	}
}

func TestTLSResumption(t *testing.T) {
	leaktest.Check(t)
	p := newPair(t, TLS)
	p.serve(t, func(in *Incoming) {
		if s, err := in.Accept(); err == nil {
			io.Copy(io.Discard, s)
			s.Close()
		}
	})
	for i := range 2 {
		s, err := p.d.Open(context.Background(), p.addr, Header{Kind: KindData, Channel: "main"})
		if err != nil {
			t.Fatal(err)
		}
		resumed := s.(interface{ ConnectionState() tls.ConnectionState }).ConnectionState().DidResume
		s.Close()
		if i == 1 && !resumed {
			t.Fatal("second stream did a full handshake")
		}
	}
}

func TestPlainReplayAndForgery(t *testing.T) {
	leaktest.Check(t)
	p := newPair(t, Plain)
	p.serve(t, func(in *Incoming) {
		if s, err := in.Accept(); err == nil {
			io.Copy(io.Discard, s)
			s.Close()
		}
	})
	ctx := context.Background()
	s, err := p.d.Open(ctx, p.addr, Header{Kind: KindData, Channel: "main"})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := RawConn(s); !ok {
		t.Fatal("plain stream does not expose its TCP socket for splice")
	}
	s.Close()
	// Build a correctly signed header, send it twice: the second is a replay.
	key, err := p.d.plainKey(ctx, p.addr)
	if err != nil {
		t.Fatal(err)
	}
	wire, _ := (&Header{Kind: KindData, Channel: "main"}).AppendBinary(nil)
	key.sign(wire)
	send := func(w []byte) error {
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write(w)
		r, err := readReply(c)
		if err != nil {
			return err
		}
		return r.err()
	}
	if err := send(wire); err != nil {
		t.Fatalf("first use refused: %v", err)
	}
	if err := send(wire); !errors.Is(err, &RefusedError{Reason: ReasonUnauthorized}) {
		t.Fatalf("replay: got %v, want unauthorized", err)
	}
	forged := append([]byte(nil), wire...)
	forged[fixedHeaderLen] = 'n' // channel "main" -> "nain" under the old MAC
	if err := send(forged); !errors.Is(err, &RefusedError{Reason: ReasonUnauthorized}) {
		t.Fatalf("forgery: got %v, want unauthorized", err)
	}
}

func TestPlainRefusedWithoutPermission(t *testing.T) {
	leaktest.Check(t)
	ca := testpki.NewCA(t)
	dst, src := ca.NewHost(t, "dst"), ca.NewHost(t, "src")
	ln, err := Listen("127.0.0.1:0", &Config{Transport: TLS, ServerTLS: dst.Server, ClientTLS: dst.Client})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if _, err := NewDialer(&Config{Transport: Plain, ServerTLS: src.Server, ClientTLS: src.Client}); err == nil {
		t.Fatal("plain dialer created without AllowPlaintext")
	}
	d, err := NewDialer(&Config{Transport: Plain, ServerTLS: src.Server, ClientTLS: src.Client, AllowPlaintext: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	_, err = d.Open(context.Background(), ln.Addr().String(), Header{Kind: KindData, Channel: "main"})
	if !errors.Is(err, &RefusedError{Reason: ReasonPlainDisabled}) {
		t.Fatalf("got %v, want plain_disabled", err)
	}
}

func TestWrongCARefused(t *testing.T) {
	for _, tr := range []Transport{TLS, QUIC} {
		t.Run(string(tr), func(t *testing.T) {
			leaktest.Check(t)
			dst := testpki.NewCA(t).NewHost(t, "dst")
			src := testpki.NewCA(t).NewHost(t, "src")
			ln, err := Listen("127.0.0.1:0", &Config{Transport: tr, ServerTLS: dst.Server, ClientTLS: dst.Client, HandshakeTimeout: 2 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			d, _ := NewDialer(&Config{Transport: tr, ServerTLS: src.Server, ClientTLS: src.Client, HandshakeTimeout: 2 * time.Second})
			defer d.Close()
			if _, err := d.Open(context.Background(), ln.Addr().String(), Header{Kind: KindData, Channel: "main"}); err == nil {
				t.Fatal("stream opened to a peer of another CA")
			}
		})
	}
}

// benchOneWay writes 64 MiB per op on near in 1 MiB chunks and reads them
// on far.
func benchOneWay(b *testing.B, near, far Stream) {
	const size = 64 << 20
	chunk := randBytes(1 << 20)
	b.SetBytes(size)
	for b.Loop() {
		done := make(chan error, 1)
		go func() {
			buf := make([]byte, 1<<20)
			for got := 0; got < size; {
				n, err := far.Read(buf)
				got += n
				if err != nil {
					done <- err
					return
				}
			}
			done <- nil
		}()
		for sent := 0; sent < size; sent += len(chunk) {
			if _, err := near.Write(chunk); err != nil {
				b.Fatal(err)
			}
		}
		if err := <-done; err != nil {
			b.Fatal(err)
		}
	}
}

// TestHandshakeLogged checks that both ends log, at debug level, each
// handshake with the name and serial of the certificate the peer presented.
// TestHandshakeLogged checks the debug line of each handshake on both
// ends, with a server configuration as given and with one whose
// GetConfigForClient hands each handshake a copy (as certs.Store's does)
// that has the wrong ALPN and versions: the tunnel sets its own on both.
func TestHandshakeLogged(t *testing.T) {
	for _, tr := range []Transport{TLS, QUIC} {
		for _, perHandshake := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/config-for-client=%v", tr, perHandshake), func(t *testing.T) {
				leaktest.Check(t)
				ca := testpki.NewCA(t)
				src, dst := ca.NewHost(t, "src"), ca.NewHost(t, "dst")
				server := dst.Server
				if perHandshake {
					server = dst.Server.Clone()
					server.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
						h := dst.Server.Clone()
						h.NextProtos = []string{"h2"}
						h.MinVersion, h.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
						return h, nil
					}
				}
				var srcLog, dstLog testlog.Buffer
				ln, err := Listen("127.0.0.1:0", &Config{Transport: tr, ServerTLS: server, ClientTLS: dst.Client, Logger: dstLog.Logger()})
				if err != nil {
					t.Fatal(err)
				}
				defer ln.Close()
				d, err := NewDialer(&Config{Transport: tr, ServerTLS: src.Server, ClientTLS: src.Client, Logger: srcLog.Logger()})
				if err != nil {
					t.Fatal(err)
				}
				defer d.Close()
				p := &pair{ln: ln, d: d, addr: ln.Addr().String()}
				p.serve(t, func(in *Incoming) {
					if s, err := in.Accept(); err == nil {
						s.Close()
					}
				})
				s, err := d.Open(context.Background(), p.addr, Header{Kind: KindData, Channel: "main"})
				if err != nil {
					t.Fatal(err)
				}
				s.Close()
				alpn := ALPN
				if tr == TLS {
					alpn = ALPNBulk
				}
				for _, c := range []struct {
					log       *testlog.Buffer
					dir, peer string
					serial    *big.Int
				}{{&dstLog, "in", "src", src.Leaf().SerialNumber}, {&srcLog, "out", "dst", dst.Leaf().SerialNumber}} {
					want := fmt.Sprintf(`msg="tunnel handshake" transport=%s direction=%s`, tr, c.dir)
					line := c.log.Line(want)
					for _, attr := range []string{" peer=" + c.peer + " ", " alpn=" + alpn + " ", " peer_serial=" + c.serial.Text(16) + " "} {
						if !strings.Contains(line, attr) {
							t.Errorf("want a line with %s and%s; log:\n%s", want, attr, c.log.String())
						}
					}
				}
			})
		}
	}
}
