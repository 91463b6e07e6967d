package proxy_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/internal/leaktest"
	"github.com/migtun/migtun/tunnel"
)

// TestLoadConcurrentSessions runs 64 sessions at once between two servers,
// each with three streams over two channels (two on main, as multifd
// opens, one on nbd), each stream moving 2 MiB to the destination and 2 MiB
// back (an echo); it checks every byte with sha256 and every session's
// finish report, reports the peak memory, and checks that no goroutine or
// descriptor is left after. -short: 10 sessions of 512 KiB streams.
func TestLoadConcurrentSessions(t *testing.T) {
	sessions, size := 64, 2<<20
	if testing.Short() {
		sessions, size = 10, 512<<10
	}
	for _, tr := range []tunnel.Transport{tunnel.TLS, tunnel.QUIC, tunnel.Plain} {
		t.Run(string(tr), func(t *testing.T) {
			leaktest.Check(t)
			fdsBefore := fdSet(t)
			// Reset the peak RSS (VmHWM) so it is this subtest's; best effort.
			os.WriteFile("/proc/self/clear_refs", []byte("5"), 0)
			h := newSessHosts(t, tr, time.Minute)

			var peakHeap atomic.Uint64
			var peakRSS atomic.Int64
			stopSampling := make(chan struct{})
			sampled := make(chan struct{})
			go func() {
				defer close(sampled)
				var ms runtime.MemStats
				for {
					runtime.ReadMemStats(&ms)
					if ms.HeapInuse > peakHeap.Load() {
						peakHeap.Store(ms.HeapInuse)
					}
					// VmHWM is updated lazily by the kernel: sample VmRSS too.
					if rss := selfStatus(t, "VmRSS"); rss > peakRSS.Load() {
						peakRSS.Store(rss)
					}
					select {
					case <-stopSampling:
						return
					case <-time.After(100 * time.Millisecond):
					}
				}
			}()

			start := time.Now()
			var wg sync.WaitGroup
			errs := make(chan error, sessions)
			for i := 0; i < sessions; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					if err := loadSession(h, size); err != nil {
						errs <- fmt.Errorf("session %d: %w", i, err)
					}
				}()
			}
			wg.Wait()
			took := time.Since(start)
			close(stopSampling)
			<-sampled
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			total := int64(sessions) * int64(size) * 2 * loadStreams
			t.Logf("%s: %d sessions × 3 streams × %d KiB each way, sha256-checked, in %v (%.0f MiB/s through both servers); peak heap in use %d MiB, peak RSS %d MiB (both servers, the clients and the test in one process)",
				tr, sessions, size>>10, took.Round(time.Millisecond), float64(total)/(1<<20)/took.Seconds(),
				peakHeap.Load()>>20, max(peakRSS.Load(), selfStatus(t, "VmHWM"))>>20)
			for _, s := range h.src.Sessions() {
				if s.State != control.StateFinished {
					t.Errorf("source session %s is %s (%s)", s.ID, s.State, s.Error)
				}
			}
			for _, s := range h.dst.Sessions() {
				if s.State != control.StateFinished {
					t.Errorf("destination session %s is %s (%s)", s.ID, s.State, s.Error)
				}
			}
			h.src.Close()
			h.dst.Close()
			if leaked := leakedFDs(fdsBefore); len(leaked) > 0 {
				t.Errorf("%d descriptors left open after both servers closed:\n%s", len(leaked), strings.Join(leaked, "\n"))
			}
		})
	}
}

// loadStreams is the streams of a load session: two on main, one on nbd.
const loadStreams = 3

// loadSession prepares a session with main and nbd, sends size random
// bytes through each of its streams (two on main, one on nbd) to the echo
// routes, checks they come back whole, and finishes the session, checking
// both hosts counted the same streams and bytes.
func loadSession(h *sessHosts, size int) error {
	// The bounds only keep a hung session from hanging the test: QUIC
	// under -race on two busy cores takes minutes.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	info, err := h.src.Prepare(ctx, control.PrepareRequest{Peer: h.dst.Addr().String(), Channels: []string{"main", "nbd"}})
	if err != nil {
		return fmt.Errorf("prepare: %w", err)
	}
	var wg sync.WaitGroup
	errs := make([]error, loadStreams)
	for i, ch := range []int{0, 0, 1} {
		wg.Go(func() { errs[i] = echoStream(info.Channels[ch].URI, size) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	rep, err := h.src.Finish(ctx, info.ID, 10*time.Second)
	if err != nil {
		return fmt.Errorf("finish: %w", err)
	}
	if len(rep.Mismatch) > 0 || rep.Aborted != 0 {
		return fmt.Errorf("finish: mismatches %q, %d streams aborted", rep.Mismatch, rep.Aborted)
	}
	for i, ch := range rep.Session.Channels {
		want := int64(2 - i) // main 2, nbd 1
		if ch.Streams != want || ch.BytesForward != want*int64(size) || ch.BytesReturn != want*int64(size) {
			return fmt.Errorf("finish: %s: %d streams, %d bytes forward, %d back; want %d, %d, %d",
				ch.Name, ch.Streams, ch.BytesForward, ch.BytesReturn, want, want*int64(size), want*int64(size))
		}
	}
	return nil
}

// echoStream sends size random bytes through a session URI and checks they
// come back whole.
func echoStream(uri string, size int) error {
	c, err := net.Dial("unix", strings.TrimPrefix(uri, "unix:"))
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(15 * time.Minute))
	// The bytes come from a seeded generator, hashed on the way out, so
	// the test holds no copy of them and the heap figures are the servers'.
	var seed [32]byte
	rand.Read(seed[:])
	gen := mrand.NewChaCha8(seed)
	sent := sha256.New()
	werr := make(chan error, 1)
	go func() { // ends with the write
		_, err := io.Copy(c, io.TeeReader(io.LimitReader(gen, int64(size)), sent))
		if err == nil {
			err = c.(*net.UnixConn).CloseWrite()
		}
		werr <- err
	}()
	hs := sha256.New()
	n, rerr := io.Copy(hs, c)
	if err := errors.Join(<-werr, rerr); err != nil {
		return fmt.Errorf("echo: %d of %d bytes back: %w", n, size, err)
	}
	if n != int64(size) || !bytes.Equal(hs.Sum(nil), sent.Sum(nil)) {
		return fmt.Errorf("echo: %d of %d bytes back, sha256 differs", n, size)
	}
	return nil
}

// fdSet returns this process's open descriptors and what they are.
func fdSet(t *testing.T) map[string]string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot list descriptors: %v", err)
	}
	out := map[string]string{}
	for _, e := range ents {
		l, _ := os.Readlink("/proc/self/fd/" + e.Name())
		out[e.Name()] = l
	}
	return out
}

// leakedFDs waits up to 5 s for the descriptors opened since before to be
// closed, and returns those still open (other than the echo route's
// listener, which the test's cleanup closes).
func leakedFDs(before map[string]string) []string {
	deadline := time.Now().Add(5 * time.Second)
	for {
		// The standard library keeps pipes for splice(2) in a pool that
		// the garbage collector empties; run it so they are closed.
		runtime.GC()
		var leaked []string
		ents, _ := os.ReadDir("/proc/self/fd")
		for _, e := range ents {
			l, _ := os.Readlink("/proc/self/fd/" + e.Name())
			if before[e.Name()] == l {
				continue
			}
			info := socketInfo(l)
			if strings.Contains(info, "/echo.sock") || l == "" {
				continue // the echo listener; or the directory being read
			}
			leaked = append(leaked, e.Name()+" → "+l+info)
		}
		if len(leaked) == 0 || time.Now().After(deadline) {
			return leaked
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// selfStatus returns a byte figure of /proc/self/status (VmRSS, VmHWM).
func selfStatus(t *testing.T, field string) int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// socketInfo returns the /proc/net lines of a "socket:[inode]" link, to
// say what a leaked socket is.
func socketInfo(link string) string {
	inode, ok := strings.CutPrefix(link, "socket:[")
	if !ok {
		return ""
	}
	inode = strings.TrimSuffix(inode, "]")
	var out []string
	for _, f := range []string{"tcp", "tcp6", "udp", "udp6", "unix"} {
		b, _ := os.ReadFile("/proc/self/net/" + f)
		for _, l := range strings.Split(string(b), "\n") {
			if slicesContains(strings.Fields(l), inode) {
				out = append(out, f+": "+strings.Join(strings.Fields(l), " "))
			}
		}
	}
	return " " + strings.Join(out, "; ")
}

func slicesContains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}
