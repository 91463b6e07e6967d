package tunnel

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sync/atomic"
	"testing"
	"time"

	"github.com/migtun/migtun/internal/linkemu"
	"github.com/migtun/migtun/internal/testpki"
)

// linkPair is a listening host in namespace B and a dialing host in A of
// an emulated link.
type linkPair struct {
	link *linkemu.Link
	ln   *Listener
	d    *Dialer
	addr string
}

// newLinkPair starts the link cfg and a pair of hosts across it; it skips
// the test when this machine cannot make a link, or fails it under CI=true.
func newLinkPair(t *testing.T, cfg linkemu.Config, tr Transport, idle time.Duration) *linkPair {
	t.Helper()
	why := ""
	if os.Geteuid() != 0 {
		why = "needs root"
	} else if _, err := exec.LookPath("ip"); err != nil {
		why = "needs the ip command"
	}
	if why != "" {
		if os.Getenv("CI") == "true" {
			t.Fatalf("the link emulator %s (required when CI=true)", why)
		}
		t.Skipf("the link emulator %s", why)
	}
	l, err := linkemu.Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	ca := testpki.NewCA(t)
	src, dst := ca.NewHost(t, "src"), ca.NewHost(t, "dst")
	p := &linkPair{link: l}
	err = l.Do(linkemu.B, func() (err error) {
		p.ln, err = Listen(linkemu.AddrB+":0", &Config{Transport: tr, ServerTLS: dst.Server, ClientTLS: dst.Client, AllowPlaintext: true,
			IdleTimeout: idle})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	// The certificates name hosts, not the link's addresses.
	p.d, err = NewDialer(&Config{Transport: tr, ServerTLS: src.Server, AllowPlaintext: true, IdleTimeout: idle,
		ClientTLS: func(string) *tls.Config { return src.Client("dst") }})
	if err != nil {
		t.Fatal(err)
	}
	p.addr = p.ln.Addr().String()
	t.Cleanup(func() { p.d.Close(); p.ln.Close() })
	return p
}

// open opens a stream from A; its sockets are made inside A.
func (p *linkPair) open(ctx context.Context) (s Stream, err error) {
	err = p.link.Do(linkemu.A, func() (err error) {
		s, err = p.d.Open(ctx, p.addr, Header{Kind: KindData, Channel: "main"})
		return err
	})
	return s, err
}

// sink accepts one stream and reports what arrived on it.
type arrival struct {
	n   int64
	sum [32]byte
	err error
}

// counter counts the bytes written to it.
type counter struct{ n atomic.Int64 }

func (c *counter) Write(b []byte) (int, error) { c.n.Add(int64(len(b))); return len(b), nil }

func (p *linkPair) sink(ctx context.Context, seen *counter) <-chan arrival {
	out := make(chan arrival, 1)
	go func() {
		in, err := p.ln.Accept(ctx)
		if err != nil {
			out <- arrival{err: err}
			return
		}
		s, err := in.Accept()
		if err != nil {
			out <- arrival{err: err}
			return
		}
		defer s.Close()
		stop := context.AfterFunc(ctx, func() { s.Abort() })
		defer stop()
		h := sha256.New()
		n, err := io.Copy(io.MultiWriter(h, seen), s)
		out <- arrival{n: n, sum: [32]byte(h.Sum(nil)), err: err}
	}()
	return out
}

// TestAcrossLossyLink: a stream across a link with 1% loss both ways and
// a 40ms round trip arrives byte-identical, over every transport.
func TestAcrossLossyLink(t *testing.T) {
	for _, tr := range transports {
		t.Run(string(tr), func(t *testing.T) {
			cfg := linkemu.Profiles["lossy"]
			cfg.Seed = 7
			p := newLinkPair(t, cfg, tr, 0)
			size := 16 << 20
			if tr == QUIC {
				size = 4 << 20 // quic-go's NewReno crawls at 1% loss
			}
			data := make([]byte, size)
			rand.Read(data)
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			got := p.sink(ctx, &counter{})
			s, err := p.open(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if _, err := s.Write(data); err != nil {
				t.Fatal(err)
			}
			if err := s.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			a := <-got
			if a.err != nil {
				t.Fatalf("receiving: %v (after %d bytes)", a.err, a.n)
			}
			if a.n != int64(size) || a.sum != sha256.Sum256(data) {
				t.Fatalf("%d bytes arrived, %d sent, or they differ", a.n, size)
			}
			atob, btoa := p.link.Stats()
			if atob.Lost == 0 || btoa.Lost == 0 {
				t.Errorf("the link lost nothing: %+v %+v", atob, btoa)
			}
		})
	}
}

// TestLinkDownTenSeconds: a link that drops everything for 10s in the
// middle of a stream and heals. The stream either recovers and delivers
// every byte, or fails at both ends with an error, having delivered only
// a prefix of what was sent; it never hangs (TCP gives up after
// TCP_USER_TIMEOUT, three idle timeouts; QUIC after one idle timeout).
// With an idle timeout of 15s, tls must recover: TCP's retransmissions
// reach the healed link long before 45s.
func TestLinkDownTenSeconds(t *testing.T) {
	type run struct {
		tr      Transport
		idle    time.Duration
		recover bool
	}
	runs := []run{{TLS, 0, false}, {QUIC, 0, false}, {Plain, 0, false}, {TLS, 15 * time.Second, true}}
	for _, r := range runs {
		tr := r.tr
		name := string(tr)
		if r.idle > 0 {
			name += fmt.Sprintf(" idle %s", r.idle)
		}
		t.Run(name, func(t *testing.T) {
			p := newLinkPair(t, linkemu.Symmetric(20*time.Millisecond, 0, 100e6), tr, r.idle)
			const size = 48 << 20
			data := make([]byte, size)
			rand.Read(data)
			// The guard against a hang is far beyond every timeout.
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			var seen counter
			got := p.sink(ctx, &seen)
			s, err := p.open(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			werr := make(chan error, 1)
			go func() {
				_, err := s.Write(data)
				if err == nil {
					err = s.CloseWrite()
				}
				werr <- err
			}()
			// Once 2 MiB have arrived the link goes down for 10s.
			tick := time.NewTicker(time.Millisecond)
			for seen.n.Load() < 2<<20 && ctx.Err() == nil {
				<-tick.C
			}
			tick.Stop()
			p.link.Cut(true)
			heal := time.AfterFunc(10*time.Second, func() { p.link.Cut(false) })
			defer heal.Stop()
			a := <-got
			we := <-werr
			if ctx.Err() != nil {
				t.Fatalf("the stream hung: writer %v, reader %v after %d bytes", we, a.err, a.n)
			}
			switch {
			case a.err == nil && we == nil:
				if a.n != size || a.sum != sha256.Sum256(data) {
					t.Fatalf("recovered, but %d bytes arrived of %d, or they differ", a.n, size)
				}
				t.Logf("%s: recovered after the link healed", tr)
			case a.err == nil:
				t.Fatalf("the writer failed (%v) but the reader saw a clean end after %d bytes", we, a.n)
			case r.recover:
				t.Fatalf("with idle timeout %s the stream should have recovered; failed after %d bytes: reader %v, writer %v", r.idle, a.n, a.err, we)
			default:
				if a.sum != sha256.Sum256(data[:a.n]) {
					t.Fatalf("failed after %d bytes, which differ from those sent", a.n)
				}
				if we == nil {
					// The writer's bytes were all in its kernel buffer; the
					// stream still failed, which its close must report.
					we = s.Close()
				}
				t.Logf("%s: failed cleanly after %d bytes: reader %v; writer %v", tr, a.n, a.err, we)
				if errors.Is(a.err, context.DeadlineExceeded) {
					t.Fatal("the reader only stopped at the test's guard")
				}
			}
		})
	}
}
