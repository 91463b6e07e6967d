package main

// Reliability tests with real processes : a peer killed
// mid-migration, bad connections at the port during a transfer, a slow
// reader, and a network partition between namespaces. docs/reliability.md
// says what each checks and how to rerun it.
//
// The bugs these tests found when they were written are fixed; the checks
// that found them fail with "regression of a fixed bug".

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/migtun/migtun/internal/vmtest"
	"github.com/migtun/migtun/qmp"
)

// TestReliabilityDestKilledMidMigration kills the destination migtun with
// SIGKILL while a running guest migrates through a session: the source
// QEMU's migration must fail within 5 s, the guest must go on running,
// and the source migtun must end the session and remove its socket.
func TestReliabilityDestKilledMidMigration(t *testing.T) {
	q := vmtest.One(t)
	for _, tc := range []struct{ name, transport, idle string }{
		{"tls", "tls", ""}, {"quic/idle-timeout-3s", "quic", "3s"}, {"quic/default-idle-timeout", "quic", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// A session whose streams all ended without a finish expires
			// after --session-ttl.
			srcExtra := []string{"--session-ttl", "5s"}
			if tc.idle != "" {
				srcExtra = append(srcExtra, "--idle-timeout", tc.idle)
			}
			h := newRelSessionHosts(t, tc.transport, nil, srcExtra)
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			src, dst := startVMs(ctx, t, q, h.dir, 256<<20, 16<<20)
			// Prepared only now: starting the guests can take longer than
			// the short --session-ttl on a loaded machine.
			info := h.prepare(t)
			if err := src.QMP.Cont(ctx); err != nil {
				t.Fatal(err)
			}
			if err := dst.QMP.MigrateIncoming(ctx, "unix:"+h.dstIn); err != nil {
				t.Fatal(err)
			}
			// 32 MiB/s: 256 MiB take about 8 s, so the kill at 64 MiB lands mid-way.
			if err := src.QMP.MigrateSetParameters(ctx, map[string]any{"max-bandwidth": 32 << 20}); err != nil {
				t.Fatal(err)
			}
			if err := src.QMP.Migrate(ctx, uriOf(t, info, "main")); err != nil {
				t.Fatal(err)
			}
			waitTransferred(ctx, t, src, 64<<20)
			killed := time.Now()
			h.dst.Kill()

			wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
			defer wcancel()
			_, migErr := src.QMP.WaitMigration(wctx, 20*time.Millisecond, nil)
			took := time.Since(killed)
			if migErr == nil || errors.Is(migErr, context.DeadlineExceeded) {
				if tc.transport == "quic" && tc.idle == "" {
					// Only the QUIC idle timeout notices a killed peer: see
					// how long the default takes, then report it.
					_, migErr = src.QMP.WaitMigration(ctx, 20*time.Millisecond, nil)
					h.abortSession(t, info.ID)
					knownBug(t, "with the default --idle-timeout the source QEMU saw the migration fail only %v after the destination migtun was killed (%v); want within 5s",
						time.Since(killed).Round(time.Millisecond), migErr)
				}
				t.Fatalf("source migration %v after the destination migtun was killed; want failed within 5s", migErr)
			}
			status, err := src.QMP.Status(ctx)
			if err != nil || status != "running" {
				t.Fatalf("source guest is %q (%v) after the failed migration, want running", status, err)
			}
			t.Logf("source QEMU saw the migration fail %v after the kill (%v); guest %s", took.Round(time.Millisecond), migErr, status)

			st, why, ended := waitSessionEnded(t, h.srcCtl, info.ID, 10*time.Second)
			// The state turns final just before the socket is removed.
			left, _ := os.ReadDir(h.socketDir)
			for wait := time.Now().Add(2 * time.Second); len(left) > 0 && time.Now().Before(wait); left, _ = os.ReadDir(h.socketDir) {
				time.Sleep(20 * time.Millisecond)
			}
			if ended < 0 || len(left) > 0 {
				h.abortSession(t, info.ID)
				knownBug(t, "the source session is still %q 10s after its only stream failed (the destination migtun was killed); "+
					"%d socket(s) left in --socket-dir: a session whose stream fails is not ended", st, len(left))
			}
			t.Logf("source session ended %s (%s) %v after the stream failed", st, why, ended.Round(time.Millisecond))
		})
	}
}

func waitTransferred(ctx context.Context, t *testing.T, vm *vmtest.VM, n uint64) {
	t.Helper()
	for {
		mi, err := vm.QMP.QueryMigrate(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if mi.RAM != nil && uint64(mi.RAM.Transferred) > n {
			return
		}
		if mi.Status != qmp.MigrationActive && mi.Status != qmp.MigrationSetup {
			t.Fatalf("migration %s before the fault: %s", mi.Status, mi.ErrorDesc)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestReliabilitySourceKilled kills the source migtun with SIGKILL while a
// session stream carries data: the destination must fail the stream at
// once and end the session within its timeouts.
func TestReliabilitySourceKilled(t *testing.T) {
	for _, transport := range []string{"tls", "quic"} {
		t.Run(transport, func(t *testing.T) {
			sk := newSinkOn(t, "tcp", "127.0.0.1:0", 0)
			h := newRelSessionHostsTo(t, transport, "tcp:"+sk.ln.Addr().String(), []string{"--idle-timeout", "3s", "--session-ttl", "5s"}, nil)
			info := h.prepare(t)
			c, err := net.Dial("unix", strings.TrimPrefix(uriOf(t, info, "main"), "unix:"))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			go func() { // ends when the connection fails
				buf := make([]byte, 64<<10)
				for {
					if _, err := c.Write(buf); err != nil {
						return
					}
				}
			}()
			for sk.read.Load() < 8<<20 {
				time.Sleep(10 * time.Millisecond)
			}
			killed := time.Now()
			h.src.Kill()
			cleanEOF := false
			select {
			case e := <-sk.ends:
				t.Logf("the destination's local connection ended %v after the kill, %d bytes, read error %v (nil: a clean EOF)",
					e.at.Sub(killed).Round(time.Millisecond), e.n, e.err)
				if e.err == nil {
					cleanEOF = true
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the destination's local connection still open 10s after the source migtun was killed")
			}
			var bugs []string
			if cleanEOF {
				bugs = append(bugs, "the destination passed the killed source on to its local connection as a clean end of stream, not a failure (a reset)")
			}
			st, why, ended := waitSessionEnded(t, h.dstCtl, info.ID, 15*time.Second)
			if ended < 0 {
				bugs = append(bugs, fmt.Sprintf("the destination session is still %q 15s after the source migtun was killed and its stream ended "+
					"(--idle-timeout 3s, --session-ttl 5s): nothing ends an active session whose streams are gone", st))
			} else {
				t.Logf("destination session ended %s (%s) %v after the stream ended", st, why, ended.Round(time.Millisecond))
			}
			if len(bugs) > 0 {
				knownBug(t, "%s", strings.Join(bugs, "; "))
			}
		})
	}
}

// relForwardHosts is a destination routing main to a local socket and a
// source forwarding a local socket to it, with static routes.
type relForwardHosts struct {
	dir, fwd, dstIn string
	ca              string // the PKI directory: ca.crt, src.crt, src.key, …
	src, dst        *relProc
}

func newRelForwardHosts(t *testing.T, transport string, dstExtra ...string) *relForwardHosts {
	h := &relForwardHosts{dir: shortTempDir(t)}
	ca := pki(t, "src", "dst")
	h.ca = ca
	h.dstIn, h.fwd = filepath.Join(h.dir, "in.sock"), filepath.Join(h.dir, "fwd.sock")
	var extra []string
	if transport == "plain" {
		extra = []string{"--insecure-plaintext"}
	}
	h.dst = startRel(t, ca, "dst", "127.0.0.1:0", nil, append(append([]string{"--transport", transport,
		"--route", "main=unix:" + h.dstIn}, extra...), dstExtra...)...)
	h.src = startRel(t, ca, "src", "127.0.0.1:0", nil, append([]string{"--transport", transport,
		"--forward", "unix:" + h.fwd + "=" + h.dst.Addr + "/main"}, extra...)...)
	return h
}

// badConn is one kind of bad TCP connection thrown at the port.
type badConn struct {
	name string
	run  func(c net.Conn) // writes what the attacker writes; returns when it gives up
}

// attempt makes one connection of kind k to addr and returns how long the
// server took to close it after it was opened.
func (k badConn) attempt(addr string) badAttempt {
	return badAttempt{name: k.name, run: func(ctx context.Context) (time.Duration, error) {
		bc, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			return 0, err
		}
		defer bc.Close()
		start := time.Now()
		go k.run(bc) // ends when the server closes the connection
		// The server closes the connection; read until then, with a
		// limit of its own so a hang is seen.
		bc.SetReadDeadline(time.Now().Add(time.Until(ctxDeadline(ctx))))
		_, err = io.Copy(io.Discard, bc)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return time.Since(start), errors.New("still open")
		}
		return time.Since(start), nil
	}}
}

// badAttempt is one kind of bad use of a port. run makes one attempt and
// returns how long the server took to end it, and an error if the server
// did not end it as it should.
type badAttempt struct {
	name string
	run  func(ctx context.Context) (time.Duration, error)
	// unbounded: the time is not the server's (the attempt waits for a
	// timeout of the client's own), so it is not held to the deadline.
	unbounded bool
}

// throwBad makes each attempt of kinds `each` times, all at once, and
// checks that each ended as it should, within the deadline plus 2.5 s
// unless it is unbounded; it logs the slowest of each kind.
func throwBad(t *testing.T, kinds []badAttempt, each int, deadline time.Duration) {
	t.Helper()
	type result struct {
		kind string
		took time.Duration
		err  error
	}
	results := make(chan result, each*len(kinds))
	var wg sync.WaitGroup
	for _, k := range kinds {
		for range each {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), deadline+10*time.Second)
				defer cancel()
				took, err := k.run(ctx)
				results <- result{k.name, took, err}
			}()
		}
	}
	wg.Wait()
	close(results)
	worst := map[string]time.Duration{}
	bounded := map[string]bool{}
	for _, k := range kinds {
		bounded[k.name] = !k.unbounded
	}
	for r := range results {
		if r.err != nil {
			t.Errorf("%s: %v (after %v)", r.kind, r.err, r.took.Round(time.Millisecond))
			continue
		}
		if bounded[r.kind] && r.took > deadline+2500*time.Millisecond {
			t.Errorf("%s ended by the server only after %v; handshake deadline %v", r.kind, r.took, deadline)
		}
		worst[r.kind] = max(worst[r.kind], r.took)
	}
	for _, k := range kinds {
		t.Logf("%-27s %d attempts, all ended as they should, the last after %v", k.name, each, worst[k.name].Round(time.Millisecond))
	}
}

// ctxDeadline is ctx's deadline.
func ctxDeadline(ctx context.Context) time.Time {
	d, _ := ctx.Deadline()
	return d
}

// TestReliabilityBadConnections throws garbage, half-open and slowloris
// connections at the destination's port (--handshake-timeout 2s) while a
// stream carries 64 MiB through it: each must be closed by the server
// within the handshake deadline (checked with a 2.5 s allowance), and the
// stream's bytes must arrive whole.
func TestReliabilityBadConnections(t *testing.T) {
	const deadline = 2 * time.Second
	trickle := func(prefix []byte) func(c net.Conn) {
		return func(c net.Conn) {
			for i := 0; i < 100; i++ {
				b := []byte{'x'}
				if i < len(prefix) {
					b[0] = prefix[i]
				}
				if _, err := c.Write(b); err != nil {
					return
				}
				time.Sleep(200 * time.Millisecond)
			}
		}
	}
	kinds := []badConn{
		{"garbage", func(c net.Conn) { b := make([]byte, 4096); rand.Read(b); c.Write(b) }},
		{"garbage-tls-record", func(c net.Conn) { b := make([]byte, 4096); rand.Read(b); b[0] = 0x16; c.Write(b) }},
		{"half-open", func(c net.Conn) {}},
		{"half-open-after-first-byte", func(c net.Conn) { c.Write([]byte{0x16}) }},
		{"slowloris-tls", trickle([]byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03})},
		{"slowloris-header", trickle([]byte("MGTN\x01\x01\x00\x04"))},
	}
	for _, transport := range []string{"tls", "plain"} {
		t.Run(transport, func(t *testing.T) {
			h := newRelForwardHosts(t, transport, "--handshake-timeout", deadline.String())
			inFlight := sendInFlight(t, h)
			var attempts []badAttempt
			for _, k := range kinds {
				attempts = append(attempts, k.attempt(h.dst.Addr))
			}
			throwBad(t, attempts, 20, deadline)
			inFlight()
		})
	}
}

// sendInFlight starts the stream in flight of the bad-connection tests:
// 64 MiB of random bytes into h's forward, at most 16 MiB/s so that it
// outlasts the attack. It returns once 1 MiB arrived; the function it
// returns checks that every byte did.
func sendInFlight(t *testing.T, h *relForwardHosts) (check func()) {
	t.Helper()
	sk := newSink(t, h.dstIn, 0)
	const size = 64 << 20
	data := make([]byte, size)
	rand.Read(data)
	want := sha256.Sum256(data)
	c, err := net.Dial("unix", h.fwd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() }) // ends the writer if the test fails first
	sent := make(chan error, 1)
	go func() { // ends with the write
		for off := 0; off < size; off += 1 << 20 {
			if _, err := c.Write(data[off : off+1<<20]); err != nil {
				sent <- err
				return
			}
			time.Sleep(60 * time.Millisecond)
		}
		sent <- c.(*net.UnixConn).CloseWrite()
	}()
	for sk.read.Load() < 1<<20 {
		time.Sleep(10 * time.Millisecond)
	}
	return func() {
		t.Helper()
		if err := <-sent; err != nil {
			t.Fatalf("sending the stream in flight: %v", err)
		}
		select {
		case e := <-sk.ends:
			if e.err != nil || e.n != size || e.sum != want {
				t.Fatalf("stream in flight: %d of %d bytes, sha256 match %v, err %v", e.n, size, e.sum == want, e.err)
			}
		case <-time.After(time.Minute):
			t.Fatal("the stream in flight did not end")
		}
		t.Logf("stream in flight: %d MiB arrived whole (sha256 checked)", size>>20)
	}
}

// TestReliabilitySlowReader has a destination endpoint that reads at
// 1 MiB/s while the source writes as fast as it can into a forward:
// back-pressure must stop the writer (the bytes it got in stay a bounded
// amount ahead of the reader), and neither migtun's memory may grow with
// the backlog.
func TestReliabilitySlowReader(t *testing.T) {
	const (
		rate     = 1 << 20
		slowFor  = 6 * time.Second
		maxAhead = 128 << 20 // socket buffers, relay buffers, QUIC windows (64 MiB per stream)
		maxRSS   = 200 << 20
	)
	for _, transport := range []string{"tls", "quic", "plain"} {
		t.Run(transport, func(t *testing.T) {
			h := newRelForwardHosts(t, transport)
			sk := newSink(t, h.dstIn, rate)
			c, err := net.Dial("unix", h.fwd)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			var written atomic.Int64
			hs := sha256.New()
			stop := make(chan struct{})
			wrote := make(chan error, 1)
			go func() {
				buf := make([]byte, 256<<10)
				for {
					select {
					case <-stop:
						wrote <- c.(*net.UnixConn).CloseWrite()
						return
					default:
					}
					rand.Read(buf[:64])
					n, err := c.Write(buf)
					hs.Write(buf[:n])
					written.Add(int64(n))
					if err != nil {
						wrote <- err
						return
					}
				}
			}()
			var peakAhead, peakSrc, peakDst int64
			start := time.Now()
			for time.Since(start) < slowFor {
				time.Sleep(250 * time.Millisecond)
				peakAhead = max(peakAhead, written.Load()-sk.read.Load())
				peakSrc = max(peakSrc, rss(t, h.src))
				peakDst = max(peakDst, rss(t, h.dst))
			}
			w, r := written.Load(), sk.read.Load()
			t.Logf("after %v: writer got %d MiB in, reader read %d MiB; at most %d MiB ahead; RSS source %d MiB, destination %d MiB",
				slowFor, w>>20, r>>20, peakAhead>>20, peakSrc>>20, peakDst>>20)
			if peakAhead > maxAhead {
				t.Errorf("the writer got %d MiB ahead of a 1 MiB/s reader; want back-pressure within %d MiB", peakAhead>>20, maxAhead>>20)
			}
			if peakSrc > maxRSS || peakDst > maxRSS {
				t.Errorf("RSS source %d MiB, destination %d MiB; want both under %d MiB", peakSrc>>20, peakDst>>20, maxRSS>>20)
			}
			// Let the reader catch up at full speed and check nothing was lost.
			sk.rate.Store(0)
			close(stop)
			if err := <-wrote; err != nil {
				t.Fatalf("writer: %v", err)
			}
			var want [32]byte
			copy(want[:], hs.Sum(nil))
			select {
			case e := <-sk.ends:
				if e.err != nil || e.n != written.Load() || e.sum != want {
					t.Fatalf("reader got %d of %d bytes, sha256 match %v, err %v", e.n, written.Load(), e.sum == want, e.err)
				}
			case <-time.After(2 * time.Minute):
				t.Fatal("the stream did not end after the writer stopped")
			}
		})
	}
}

// TestReliabilityPartition runs the source in one network namespace and
// the destination in another, joined by veth, starts a stream that carries
// data both ways, and drops every packet on the link (tc netem loss 100%):
// both ends must fail the stream — the local connections end — within a
// bounded time: 15 s for QUIC with --idle-timeout 3s, 30 s for TLS, which
// has only TCP's own timeouts.
func TestReliabilityPartition(t *testing.T) {
	requireRootFor(t, "ip netns and tc")
	for _, tc := range []struct {
		transport, method string
		bound             time.Duration
	}{
		{"quic", "drop", 15 * time.Second}, {"quic", "unaddress", 15 * time.Second},
		{"tls", "drop", 30 * time.Second}, {"tls", "unaddress", 30 * time.Second},
	} {
		t.Run(tc.transport+"/"+tc.method, func(t *testing.T) {
			ns := newNetnsPair(t)
			dir := shortTempDir(t)
			ca := relPKI(t, map[string][]string{"src": {ns.ipA}, "dst": {ns.ipB}})
			dstIn, fwd := filepath.Join(dir, "in.sock"), filepath.Join(dir, "fwd.sock")
			// UNIX sockets are shared across network namespaces: the test
			// reaches both ends from the host's namespace.
			sk := newSink(t, dstIn, 0)
			dst := startRel(t, ca, "dst", ns.ipB+":7400", []string{"ip", "netns", "exec", ns.b},
				"--transport", tc.transport, "--idle-timeout", "3s", "--drain-timeout", "2s", "--route", "main=unix:"+dstIn)
			src := startRel(t, ca, "src", ns.ipA+":7400", []string{"ip", "netns", "exec", ns.a},
				"--transport", tc.transport, "--idle-timeout", "3s", "--drain-timeout", "2s", "--forward", "unix:"+fwd+"="+dst.Addr+"/main")
			c, err := net.Dial("unix", fwd)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			srcEnded := make(chan time.Time, 2)
			go func() { // ends when the connection fails
				buf := make([]byte, 16<<10)
				for {
					if _, err := c.Write(buf); err != nil {
						srcEnded <- time.Now()
						return
					}
					time.Sleep(time.Millisecond)
				}
			}()
			go func() { // ends when the connection fails
				io.Copy(io.Discard, c)
				srcEnded <- time.Now()
			}()
			for sk.read.Load() < 4<<20 {
				time.Sleep(10 * time.Millisecond)
			}
			cut := time.Now()
			var how string
			if tc.method == "drop" {
				how = ns.cut(t)
			} else {
				how = ns.unaddress(t)
			}
			t.Logf("link cut with %s", how)
			var srcAt, dstAt time.Time
			timeout := time.After(tc.bound)
			for srcAt.IsZero() || dstAt.IsZero() {
				select {
				case at := <-srcEnded:
					if srcAt.IsZero() {
						srcAt = at
					}
				case e := <-sk.ends:
					dstAt = e.at
				case <-timeout:
					srcTook, dstTook := "never", "never"
					if !srcAt.IsZero() {
						srcTook = srcAt.Sub(cut).Round(time.Millisecond).String()
					}
					if !dstAt.IsZero() {
						dstTook = dstAt.Sub(cut).Round(time.Millisecond).String()
					}
					t.Logf("source log:\n%s\ndestination log:\n%s", src.Log(6), dst.Log(6))
					if tc.transport == "tls" {
						knownBug(t, "%v after the partition the source stream ended: %s, the destination's: %s; "+
							"TLS streams rely on TCP retransmission (~15 min) and keepalive (15s idle + 9×15s): set TCP_USER_TIMEOUT", tc.bound, srcTook, dstTook)
					}
					t.Fatalf("%v after the partition the source stream ended: %s, the destination's: %s", tc.bound, srcTook, dstTook)
				}
			}
			t.Logf("partition detected: source local connection ended after %v, destination's after %v",
				srcAt.Sub(cut).Round(time.Millisecond), dstAt.Sub(cut).Round(time.Millisecond))
			t.Logf("source log:\n%s\ndestination log:\n%s", src.Log(4), dst.Log(4))
		})
	}
}

// TestReliabilityShutdownWithOpenSession stops (SIGTERM) a source migtun
// that has a prepared session: it must abort the session, tell the peer,
// remove the session's socket and exit within its drain timeout.
func TestReliabilityShutdownWithOpenSession(t *testing.T) {
	h := newRelSessionHosts(t, "tls", nil, []string{"--drain-timeout", "2s"})
	info := h.prepare(t)
	start := time.Now()
	if err := h.src.Stop(15 * time.Second); err != nil {
		knownBug(t, "a source migtun with an open session did not exit cleanly within 15s of SIGTERM (--drain-timeout 2s): %v", err)
	}
	t.Logf("source exited %v after SIGTERM", time.Since(start).Round(time.Millisecond))
	if left, _ := os.ReadDir(h.socketDir); len(left) > 0 {
		t.Errorf("%d session sockets left in %s after the source stopped", len(left), h.socketDir)
	}
	if st, why, ended := waitSessionEnded(t, h.dstCtl, info.ID, 5*time.Second); ended < 0 {
		t.Errorf("destination session still %s 5s after the source stopped; want aborted (told by the source)", st)
	} else {
		t.Logf("destination session %s (%s)", st, why)
	}
}
