package bench

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Measuring a real path: "migtun bench --peer HOST:PORT" pushes through a
// "migtun serve" on another host whose operator opted in with
// --bench-sink. That serve routes the channel PeerSinkChannel to a discard
// sink (ServeSink), reached like any channel by an authenticated peer.
// The sink reports what it counted back on the stream's return
// direction, so the sender knows when its bytes have arrived.

// PeerSinkChannel is the channel of a serve's bench sink.
const PeerSinkChannel = "bench-sink"

// SinkLimits bound what the streams of peers cost a bench sink.
type SinkLimits struct {
	// MaxBytes is the most one stream may send; past it the stream is cut.
	MaxBytes int64
	// MaxTime is the longest a stream may last; then it is cut.
	MaxTime time.Duration
	// MaxStreams is how many streams may be open at once; more are closed
	// at once.
	MaxStreams int
}

// Default sink limits.
const (
	DefaultSinkMaxBytes   = 64 << 30
	DefaultSinkMaxTime    = 10 * time.Minute
	DefaultSinkMaxStreams = 64
)

// countInterval is how often the sink reports its count.
const countInterval = 250 * time.Millisecond

// ServeSink serves the bench sink on ln until ctx ends or ln is closed,
// and returns once every stream has ended. Each stream's bytes are read and
// discarded; every countInterval, and once more after the sender's end,
// the stream's running count goes back as 8 bytes, big-endian.
func ServeSink(ctx context.Context, ln net.Listener, lim SinkLimits) {
	if lim.MaxBytes <= 0 {
		lim.MaxBytes = DefaultSinkMaxBytes
	}
	if lim.MaxTime <= 0 {
		lim.MaxTime = DefaultSinkMaxTime
	}
	if lim.MaxStreams <= 0 {
		lim.MaxStreams = DefaultSinkMaxStreams
	}
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	slots := make(chan struct{}, lim.MaxStreams)
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		select {
		case slots <- struct{}{}:
		default:
			c.Close()
			continue
		}
		wg.Go(func() {
			defer func() { <-slots }()
			sinkStream(ctx, c, lim)
		})
	}
}

// sinkStream counts and discards one stream, reporting its count.
func sinkStream(ctx context.Context, c net.Conn, lim SinkLimits) {
	defer c.Close()
	ctx, cancel := context.WithTimeout(ctx, lim.MaxTime)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	var n atomic.Int64
	done := make(chan struct{})
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { // reports the count until the reading ends
		t := time.NewTicker(countInterval)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if writeCount(c, n.Load()) != nil {
					return
				}
			}
		}
	})
	buf := make([]byte, 1<<20)
	var err error
	for err == nil {
		var k int
		k, err = c.Read(buf)
		if n.Add(int64(k)) > lim.MaxBytes {
			err = fmt.Errorf("more than %d bytes", lim.MaxBytes)
		}
	}
	close(done)
	wg.Wait()
	if errors.Is(err, io.EOF) {
		writeCount(c, n.Load()) // the final count; then the stream ends
	}
}

func writeCount(w io.Writer, n int64) error {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(n))
	_, err := w.Write(b[:])
	return err
}

// PeerConfig says what RunPeer measures.
type PeerConfig struct {
	// Migtun is the migtun binary, run as the local "migtun serve".
	Migtun string
	// Peer is the host:port of the remote "migtun serve --bench-sink".
	Peer string
	// Cert, Key and CA are this host's certificate, key and the CA, as
	// for "migtun serve".
	Cert, Key, CA string
	// Transports and Streams are measured in every combination; the peer
	// must serve the transport (default tls, 1 stream).
	Transports []string
	Streams    []int
	// Size is the volume pushed through each path (default DefaultSize).
	Size int64
	// Dir holds the local serve's sockets and log; a temporary directory
	// when empty.
	Dir string
	// Stall fails a path that moves no byte for this long (default
	// DefaultStall).
	Stall time.Duration
	// ServeArgs are more flags for the local "migtun serve".
	ServeArgs []string
	// Progress, when set, is called about every 250ms while a path runs.
	Progress func(Progress)
}

// RunPeer measures each transport and stream count through a local
// "migtun serve" to the peer's bench sink.
func RunPeer(ctx context.Context, cfg PeerConfig) ([]Result, error) {
	if cfg.Peer == "" || cfg.Cert == "" || cfg.Key == "" || cfg.CA == "" {
		return nil, &ConfigError{Field: "peer", Msg: "needs --cert, --key and --ca of this host"}
	}
	if len(cfg.Transports) == 0 {
		cfg.Transports = []string{"tls"}
	}
	if len(cfg.Streams) == 0 {
		cfg.Streams = []int{1}
	}
	if cfg.Size == 0 {
		cfg.Size = DefaultSize
	}
	if cfg.Stall == 0 {
		cfg.Stall = DefaultStall
	}
	dir := cfg.Dir
	if dir == "" {
		d, err := os.MkdirTemp("", "migtun-bench-peer-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(d)
		dir = d
	}
	var results []Result
	total := len(cfg.Transports) * len(cfg.Streams)
	for _, tr := range cfg.Transports {
		for _, n := range cfg.Streams {
			if err := ctx.Err(); err != nil {
				return results, err
			}
			pdir := filepath.Join(dir, fmt.Sprintf("%d", len(results)))
			if err := os.MkdirAll(pdir, 0o700); err != nil {
				return results, err
			}
			results = append(results, measurePeer(ctx, &cfg, tr, n, pdir, len(results)+1, total))
		}
	}
	return results, nil
}

// measurePeer pushes cfg.Size through a local serve to the peer over tr,
// split over n streams.
func measurePeer(ctx context.Context, cfg *PeerConfig, tr string, n int, dir string, index, total int) Result {
	res := Result{Path: fmt.Sprintf("peer/%s/%d", tr, n), Transport: tr, Streams: n}
	entry := filepath.Join(dir, "src.sock")
	args := []string{cfg.Migtun, "serve", "--listen", "127.0.0.1:0", "--transport", tr, "--cert", cfg.Cert, "--key", cfg.Key,
		"--ca", cfg.CA, "--socket-dir", filepath.Join(dir, "s"), "--log-level", "warn",
		"--forward", "unix:" + entry + "=" + cfg.Peer + "/" + PeerSinkChannel}
	if tr == "plain" {
		args = append(args, "--insecure-plaintext")
	}
	src, err := startProc(dir, "migtun-src", serveReady, append(args, cfg.ServeArgs...)...)
	if err != nil {
		res.Err = err.Error()
		return res
	}
	defer src.stop(5 * time.Second)
	if _, err := src.waitReady(readyTimeout); err != nil {
		res.Err = err.Error()
		return res
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	counts := make([]atomic.Int64, n)
	var sent atomic.Int64
	errs := make([]error, n)
	var wg sync.WaitGroup
	cpu0, self0 := src.cpu(), selfCPU()
	start := time.Now()
	share := cfg.Size / int64(n)
	for i := range n {
		size := share
		if i == n-1 {
			size = cfg.Size - share*int64(n-1)
		}
		wg.Go(func() { errs[i] = pushToPeer(ctx, entry, size, &sent, &counts[i]) })
	}
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }() // ends when every stream has
	received := func() int64 {
		var b int64
		for i := range counts {
			b += counts[i].Load()
		}
		return b
	}
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	last, lastMove := int64(0), start
	for done := false; !done; {
		select {
		case <-finished:
			done = true
		case now := <-tick.C:
			b := received()
			if b != last {
				last, lastMove = b, now
			} else if now.Sub(lastMove) > cfg.Stall {
				cancel()
				<-finished
				res.Err = fmt.Sprintf("stalled: the peer counted %d of %d bytes, none for %s%s", b, cfg.Size, cfg.Stall, procTails([]*proc{src}))
				return res
			}
			if cfg.Progress != nil {
				cfg.Progress(Progress{Path: res.Path, Index: index, Total: total, Bytes: b, Size: cfg.Size, Elapsed: now.Sub(start)})
			}
		}
	}
	wall := time.Since(start)
	cpu1, self1 := src.cpu(), selfCPU()
	res.Sent = sent.Load()
	res.setFigures(received(), wall, cpu1-cpu0, self1-self0)
	if cfg.Progress != nil {
		cfg.Progress(Progress{Path: res.Path, Index: index, Total: total, Bytes: res.Bytes, Size: cfg.Size, Elapsed: wall, Done: true})
	}
	var msgs []string
	for _, err := range errs {
		if err != nil {
			msgs = append(msgs, err.Error())
		}
	}
	switch {
	case len(msgs) > 0:
		res.Err = strings.Join(msgs, "; ")
	case res.Sent != res.Bytes:
		res.Err = fmt.Sprintf("sent %d bytes but the peer counted %d", res.Sent, res.Bytes)
	}
	return res
}

// pushToPeer writes size bytes into one stream to the peer's sink, ends
// its side, and reads the sink's counts into count until the sink ends the
// stream after the final one.
func pushToPeer(ctx context.Context, entry string, size int64, sent, count *atomic.Int64) error {
	c, err := net.Dial("unix", entry)
	if err != nil {
		return err
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	readDone := make(chan error, 1)
	go func() { // ends with the stream
		var b [8]byte
		for {
			if _, err := io.ReadFull(c, b[:]); err != nil {
				if errors.Is(err, io.EOF) {
					err = nil
				}
				readDone <- err
				return
			}
			count.Store(int64(binary.BigEndian.Uint64(b[:])))
		}
	}()
	pat := randomPattern()
	for left := size; left > 0; {
		chunk := pat[:min(int64(1<<20), left)]
		k, err := c.Write(chunk)
		sent.Add(int64(k))
		left -= int64(k)
		if err != nil {
			c.Close()
			<-readDone
			return fmt.Errorf("sending: %w", err)
		}
	}
	if err := c.(*net.UnixConn).CloseWrite(); err != nil {
		<-readDone
		return err
	}
	if err := <-readDone; err != nil {
		return fmt.Errorf("reading the peer's count: %w", err)
	}
	if count.Load() != size {
		return fmt.Errorf("the peer counted %d of the stream's %d bytes", count.Load(), size)
	}
	return nil
}
