package bench

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestRunPeer pushes through a real "migtun serve --bench-sink", as
// "migtun bench --peer" does, over tls and plain with one and two streams:
// every byte is counted by the peer's sink.
func TestRunPeer(t *testing.T) {
	dir, err := os.MkdirTemp("", "bp")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	k, err := makePKI(migtunBin, filepath.Join(dir, "pki"), []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	peer, err := startProc(dir, "peer", serveReady, migtunBin, "serve", "--listen", "127.0.0.1:0", "--cert", k.cert, "--key", k.key,
		"--ca", k.ca, "--socket-dir", filepath.Join(dir, "ps"), "--bench-sink", "--insecure-plaintext", "--transport", "tls", "--log-level", "warn")
	if err != nil {
		t.Fatal(err)
	}
	defer peer.stop(5 * time.Second)
	addr, err := peer.waitReady(readyTimeout)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	results, err := RunPeer(ctx, PeerConfig{Migtun: migtunBin, Peer: addr, Cert: k.srcCert, Key: k.srcKey, CA: k.ca,
		Transports: []string{"tls", "plain"}, Streams: []int{1, 2}, Size: 16 << 20, Dir: filepath.Join(dir, "run")})
	if err != nil {
		t.Fatal(err)
	}
	if len(results) != 4 {
		t.Fatalf("%d results, want 4", len(results))
	}
	for _, r := range results {
		if !r.OK() || r.Bytes != 16<<20 || r.Sent != r.Bytes {
			t.Errorf("%s: %+v", r.Path, r)
		}
	}
}

// TestSinkBounds: a stream past the sink's byte bound is cut, and the
// sender says the peer did not count its bytes.
func TestSinkBounds(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sink.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); ServeSink(ctx, ln, SinkLimits{MaxBytes: 1 << 20}) }()
	defer func() { cancel(); <-done }()
	var sent, count atomic.Int64
	if err := pushToPeer(ctx, path, 1<<20, &sent, &count); err != nil {
		t.Fatalf("a stream within the bound: %v", err)
	}
	err = pushToPeer(ctx, path, 8<<20, &sent, &count)
	if err == nil {
		t.Fatal("a stream past the sink's bound was counted whole")
	}
	if !strings.Contains(err.Error(), "sending") && !strings.Contains(err.Error(), "counted") && !strings.Contains(err.Error(), "count") {
		t.Fatalf("unexpected error: %v", err)
	}
}
