package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

// TestReliabilityCertRotation replaces both hosts' certificate and key
// files while a long stream and four clients opening short streams in a
// loop cross the tunnel. Without a restart, the destination must present
// its new certificate to a new connection, and the source its new one to
// a peer it connects to afterwards; every stream, the one in flight during
// the rotation included, must arrive whole; both hosts must log the reload.
func TestReliabilityCertRotation(t *testing.T) {
	for _, transport := range []string{"tls", "quic"} {
		t.Run(transport, func(t *testing.T) { testCertRotation(t, transport) })
	}
}

func testCertRotation(t *testing.T, transport string) {
	dir := shortTempDir(t)
	ca := pki(t, "src", "dst", "late")
	dstIn, lateIn := filepath.Join(dir, "in.sock"), filepath.Join(dir, "late.sock")
	fwd, lateFwd := filepath.Join(dir, "fwd.sock"), filepath.Join(dir, "late-fwd.sock")

	var (
		mu   sync.Mutex
		ends []sinkEnd
	)
	collectDone, collected := make(chan struct{}), make(chan struct{})
	t.Cleanup(func() { close(collectDone); <-collected }) // after the sinks' cleanups
	sk, late := newSink(t, dstIn, 0), newSink(t, lateIn, 0)
	go func() {
		defer close(collected)
		for {
			select {
			case e := <-sk.ends:
				mu.Lock()
				ends = append(ends, e)
				mu.Unlock()
			case <-late.ends:
			case <-collectDone:
				return
			}
		}
	}()

	dst := startRel(t, ca, "dst", "127.0.0.1:0", nil, "--transport", transport, "--route", "main=unix:"+dstIn,
		"--metrics-listen", "127.0.0.1:0")
	// A peer the source connects to only after the rotation: it runs from
	// the start (a port reserved now and bound later could be taken by
	// then), and no stream is sent to it before.
	lateProc := startRel(t, ca, "late", "127.0.0.1:0", nil, "--transport", transport, "--route", "main=unix:"+lateIn)
	src := startRel(t, ca, "src", "127.0.0.1:0", nil, "--transport", transport,
		"--forward", "unix:"+fwd+"="+dst.Addr+"/main", "--forward", "unix:"+lateFwd+"="+lateProc.Addr+"/main")

	// The stream in flight: 96 MiB at about 12 MiB/s.
	const size = 96 << 20
	data := make([]byte, size)
	rand.Read(data)
	want := sha256.Sum256(data)
	long, err := net.Dial("unix", fwd)
	if err != nil {
		t.Fatal(err)
	}
	defer long.Close()
	long.SetDeadline(time.Now().Add(2 * time.Minute)) // a stalled stream fails the test, not hangs it
	longSent := make(chan error, 1)
	var longWritten atomic.Int64
	go func() {
		for off := 0; off < size; off += 1 << 20 {
			if _, err := long.Write(data[off : off+1<<20]); err != nil {
				longSent <- err
				return
			}
			longWritten.Add(1 << 20)
			time.Sleep(80 * time.Millisecond)
		}
		longSent <- long.(*net.UnixConn).CloseWrite()
	}()

	// The load: four clients, each sending 256 KiB streams in a loop.
	var (
		rotated    atomic.Bool
		loadMu     sync.Mutex
		sent       = map[[32]byte]bool{}
		afterCount int
		loadErrs   []error
		stopLoad   = make(chan struct{})
		loadWG     sync.WaitGroup
		stopOnce   sync.Once
	)
	endLoad := func() { stopOnce.Do(func() { close(stopLoad) }); loadWG.Wait() }
	for w := range 4 {
		loadWG.Add(1)
		go func() {
			defer loadWG.Done()
			for i := 0; ; i++ {
				select {
				case <-stopLoad:
					return
				case <-time.After(50 * time.Millisecond):
				}
				after := rotated.Load()
				buf := make([]byte, 256<<10)
				rand.Read(buf)
				err := sendOne(fwd, buf)
				loadMu.Lock()
				if err != nil {
					loadErrs = append(loadErrs, fmt.Errorf("client %d, stream %d: %w", w, i, err))
				} else {
					sent[sha256.Sum256(buf)] = true
					if after {
						afterCount++
					}
				}
				loadMu.Unlock()
			}
		}()
	}
	defer endLoad()

	for longWritten.Load() < 16<<20 {
		select {
		case err := <-longSent:
			t.Fatalf("the long stream ended before the rotation: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	dstLeaf, srcLeaf := rotateCert(t, ca, "dst"), rotateCert(t, ca, "src")
	// Serials as migtun logs them.
	dstSerial, srcSerial := dstLeaf.SerialNumber.Text(16), srcLeaf.SerialNumber.Text(16)
	rotated.Store(true)
	rotatedAt := time.Now()
	t.Logf("rotated both certificates with %s of the long stream written: dst serial %s, src serial %s",
		migSize(longWritten.Load()), dstSerial, srcSerial)

	// Each host looks at its files about once a second, reloads them and
	// logs it, with or without handshakes.
	for _, h := range []struct {
		name, log, serial string
	}{{"dst", dst.LogPath, dstSerial}, {"src", src.LogPath, srcSerial}} {
		deadline := time.Now().Add(15 * time.Second)
		for !logHas(h.log, `msg="certificate reloaded: new connections present it"`, "serial="+h.serial+" ") {
			if time.Now().After(deadline) {
				t.Fatalf("%s did not log the reload of serial %s within 15s", h.name, h.serial)
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Logf("%s logged the reload %v after the rotation", h.name, time.Since(rotatedAt).Round(time.Millisecond))
	}

	// The metrics show the new certificate's expiry.
	metrics := scrapeMetrics(t, dst.LogPath)
	for name, want := range map[string]float64{
		"migtun_certificate_expiry_timestamp_seconds": float64(dstLeaf.NotAfter.Unix()),
		"migtun_certificate_reload_failed":            0,
	} {
		if got, ok := metricValue(metrics, name); !ok || got != want {
			t.Errorf("destination metrics after the reload: %s is %v (found %v), want %v:\n%s", name, got, ok, want, grepLines(metrics, "migtun_certificate"))
		}
	}

	// Once reloaded, the destination presents its new certificate to a new
	// connection.
	if got, err := probeServerSerial(t, ca, transport, dst.Addr); err != nil || got != dstSerial {
		t.Fatalf("after the reload a new connection to the destination is served serial %s (%v), want %s", got, err, dstSerial)
	}

	// The source presents its new certificate to a peer it connects to
	// after the rotation.
	if logHas(lateProc.LogPath, `msg="tunnel handshake"`) {
		t.Fatal("the source connected to the late peer before the rotation")
	}
	if err := sendOne(lateFwd, []byte("after the rotation")); err != nil {
		t.Fatalf("a stream to the peer started after the rotation: %v", err)
	}
	if line := findLogLine(lateProc.LogPath, `msg="tunnel handshake"`, "direction=in", "peer=src"); !strings.Contains(line, "peer_serial="+srcSerial+" ") {
		t.Errorf("the new peer logged the source's handshake as %q; want peer_serial=%s", line, srcSerial)
	}
	if transport == "tls" {
		// Every tls stream is a connection of its own: those opened after
		// the rotation present the new certificate to the destination too.
		if !logHas(dst.LogPath, `msg="tunnel handshake"`, "direction=in", "peer_serial="+srcSerial+" ") {
			t.Errorf("the destination saw no handshake with the source's new certificate (serial %s)", srcSerial)
		}
	}

	// The load goes on a while after the rotation, then stops.
	time.Sleep(time.Second)
	endLoad()
	if err := <-longSent; err != nil {
		t.Fatalf("sending the long stream: %v", err)
	}
	if _, err := io.Copy(io.Discard, long); err != nil { // its end: the destination closed after EOF
		t.Fatalf("waiting for the long stream's end: %v", err)
	}
	loadMu.Lock()
	defer loadMu.Unlock()
	if len(loadErrs) > 0 {
		t.Fatalf("%d of the short streams failed, first: %v", len(loadErrs), loadErrs[0])
	}
	if afterCount < 4 {
		t.Fatalf("only %d short streams started after the rotation", afterCount)
	}

	// Every stream arrived whole: the destination's sink saw each sum.
	deadline := time.Now().Add(15 * time.Second)
	for {
		mu.Lock()
		n := len(ends)
		mu.Unlock()
		if n >= len(sent)+1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	longWhole := false
	got := map[[32]byte]bool{}
	for _, e := range ends {
		if e.err != nil {
			t.Errorf("a stream ended at the destination with %v after %d bytes", e.err, e.n)
		}
		if e.sum == want && e.n == size {
			longWhole = true
		}
		got[e.sum] = true
	}
	if !longWhole {
		t.Errorf("the 96 MiB stream in flight during the rotation did not arrive whole")
	}
	missing := 0
	for sum := range sent {
		if !got[sum] {
			missing++
		}
	}
	if missing > 0 {
		t.Errorf("%d of %d short streams did not arrive whole", missing, len(sent))
	}
	t.Logf("%d short streams (%d started after the rotation) and the 96 MiB stream arrived whole", len(sent), afterCount)
}

// sendOne sends b as one stream through the forward at path and waits for
// the stream's end to come back (the route target closes after EOF).
func sendOne(path string, b []byte) error {
	c, err := net.Dial("unix", path)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write(b); err != nil {
		return err
	}
	if err := c.(*net.UnixConn).CloseWrite(); err != nil {
		return err
	}
	_, err = io.Copy(io.Discard, c)
	return err
}

// rotateCert issues a new certificate and key for host with the same CA
// and names, moves them over the files migtun serve uses (the key first),
// and returns the new certificate.
func rotateCert(t *testing.T, caDir, host string) *x509.Certificate {
	t.Helper()
	staging := filepath.Join(filepath.Dir(caDir), "staging-"+host)
	if err := os.MkdirAll(staging, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"ca.crt", "ca.key"} {
		b, err := os.ReadFile(filepath.Join(caDir, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(staging, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := migtun(t, "certs", "issue", "--dir", staging, "--name", host, "--san", "127.0.0.1"); err != nil {
		t.Fatalf("certs issue: %v\n%s", err, out)
	}
	for _, ext := range []string{".key", ".crt"} {
		if err := os.Rename(filepath.Join(staging, host+ext), filepath.Join(caDir, host+ext)); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(filepath.Join(caDir, host+".crt"))
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(b)
	if block == nil {
		t.Fatalf("%s.crt: no PEM", host)
	}
	leaf, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return leaf
}

// probeServerSerial makes a new connection to a migtun port as the source
// host (its current files) and returns the serial of the certificate the
// server presented.
func probeServerSerial(t *testing.T, caDir, transport, addr string) (string, error) {
	cfg := peerTLS(t, caDir, "src")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var cs tls.ConnectionState
	if transport == "quic" {
		conn, err := quic.DialAddr(ctx, addr, cfg, nil)
		if err != nil {
			return "", err
		}
		cs = conn.ConnectionState().TLS
		conn.CloseWithError(0, "probe")
	} else {
		d := tls.Dialer{Config: cfg}
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return "", err
		}
		cs = c.(*tls.Conn).ConnectionState()
		c.Close()
	}
	return cs.PeerCertificates[0].SerialNumber.Text(16), nil
}

// findLogLine returns the last line of the log at path holding all of
// parts, or "".
func findLogLine(path string, parts ...string) string {
	b, _ := os.ReadFile(path)
	found := ""
	for line := range strings.Lines(string(b)) {
		all := true
		for _, p := range parts {
			all = all && strings.Contains(line, p)
		}
		if all {
			found = strings.TrimSpace(line)
		}
	}
	return found
}

// logHas reports whether a line of the log at path holds all of parts.
func logHas(path string, parts ...string) bool { return findLogLine(path, parts...) != "" }

// scrapeMetrics fetches /metrics from the address a migtun serve logged
// for --metrics-listen.
func scrapeMetrics(t *testing.T, logPath string) string {
	t.Helper()
	line := findLogLine(logPath, `msg="serving metrics"`)
	_, url, ok := strings.Cut(line, "addr=")
	if !ok {
		t.Fatalf("no metrics address in the log (%q)", line)
	}
	resp, err := http.Get(strings.Fields(url)[0])
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// grepLines returns the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for line := range strings.Lines(s) {
		if strings.Contains(line, sub) {
			out = append(out, strings.TrimRight(line, "\n"))
		}
	}
	return strings.Join(out, "\n")
}

// metricValue returns the value of the unlabelled series name in a text
// exposition.
func metricValue(exposition, name string) (float64, bool) {
	for line := range strings.Lines(exposition) {
		v, ok := strings.CutPrefix(strings.TrimSpace(line), name+" ")
		if !ok {
			continue
		}
		f, err := strconv.ParseFloat(v, 64)
		return f, err == nil
	}
	return 0, false
}
