package linkemu

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"os"
	"os/exec"
	"testing"
	"time"
)

// requireLink skips the test when this machine cannot make a link (not
// root, no TUN, no ip), or fails it under CI=true.
func requireLink(t *testing.T) {
	t.Helper()
	why := ""
	if os.Geteuid() != 0 {
		why = "needs root"
	} else if _, err := os.Stat("/dev/net/tun"); err != nil {
		why = "needs /dev/net/tun"
	} else if _, err := exec.LookPath("ip"); err != nil {
		why = "needs the ip command (iproute2)"
	}
	if why == "" {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("the link emulator %s (required when CI=true)", why)
	}
	t.Skipf("the link emulator %s", why)
}

func startLink(t *testing.T, cfg Config) *Link {
	t.Helper()
	requireLink(t)
	l, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// TestCheck: at zero loss the link shows the configured round trip and
// rate, and Close removes both namespaces. The bounds asserted are those
// the relay guarantees on any machine: no packet crosses sooner than its
// delay (less the relay's early slack each way), none faster than the
// rate. How close the link comes to them depends on the CPU it gets, so
// the self-check's problems are only logged here (bench prints them).
func TestCheck(t *testing.T) {
	cfg := Symmetric(20*time.Millisecond, 0, 100e6)
	l := startLink(t, cfg)
	r, err := l.Check(context.Background(), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: %s", cfg, r)
	if floor := cfg.RTT() - 2*early; r.RTT < floor {
		t.Errorf("round trip %s, below the configured %s", r.RTT, cfg.RTT())
	}
	if r.Rate > 1.02*cfg.AtoB.Rate || r.Rate < 0.25*cfg.AtoB.Rate {
		t.Errorf("one TCP stream at %.1f Mbit/s across a %s link", r.Rate/1e6, FormatRate(cfg.AtoB.Rate))
	}
	l.Close()
	for _, s := range []Side{A, B} {
		if _, err := os.Stat("/run/netns/" + l.Namespace(s)); !os.IsNotExist(err) {
			t.Errorf("namespace %s still there after Close (%v)", l.Namespace(s), err)
		}
	}
}

// TestLossyTransfer: a TCP transfer across a link that loses and reorders
// packets arrives byte-identical, and the relay did lose and reorder.
func TestLossyTransfer(t *testing.T) {
	cfg := Symmetric(10*time.Millisecond, 0.02, 200e6)
	cfg.AtoB.Reorder = 0.01
	cfg.Seed = 1
	l := startLink(t, cfg)
	ln, err := l.ListenTCP(B, nil, AddrB+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	data := make([]byte, 8<<20)
	rand.Read(data)
	got := make(chan [32]byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- [32]byte{}
			return
		}
		defer c.Close()
		h := sha256.New()
		io.Copy(h, c)
		got <- [32]byte(h.Sum(nil))
	}()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := l.DialTCP(ctx, A, nil, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(c, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	sum := <-got
	c.Close()
	if sum != sha256.Sum256(data) {
		t.Fatal("the bytes that crossed the lossy link differ from those sent")
	}
	atob, btoa := l.Stats()
	t.Logf("a→b %+v, b→a %+v", atob, btoa)
	if atob.Lost == 0 || btoa.Lost == 0 || atob.Reordered == 0 {
		t.Errorf("the link lost or reordered nothing: a→b %+v, b→a %+v", atob, btoa)
	}
}

// TestCut: while the link is cut nothing crosses; once healed, a stream
// goes on.
func TestCut(t *testing.T) {
	l := startLink(t, Symmetric(2*time.Millisecond, 0, 0))
	ln, err := l.ListenTCP(B, nil, AddrB+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := l.DialTCP(ctx, A, nil, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	l.Cut(true)
	before, _ := l.Stats()
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	s.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, err := s.Read(make([]byte, 4)); err == nil {
		t.Fatalf("read %d bytes across a cut link", n)
	}
	after, _ := l.Stats()
	if after.Lost == before.Lost {
		t.Error("the cut link dropped nothing")
	}
	l.Cut(false)
	s.SetReadDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("after healing: %q, %v", buf, err)
	}
}

func TestParseProfile(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Config
	}{
		{"wan", Profiles["wan"]},
		{"rtt=40ms,loss=1%,rate=200mbit", Config{Name: "rtt=40ms,loss=1%,rate=200mbit",
			AtoB: Direction{Delay: 20 * time.Millisecond, Loss: 0.01, Rate: 200e6},
			BtoA: Direction{Delay: 20 * time.Millisecond, Loss: 0.01, Rate: 200e6}}},
		{"fat,queue=2MB,mtu=9000", Config{Name: "fat,queue=2MB,mtu=9000", MTU: 9000,
			AtoB: Direction{Delay: 50 * time.Millisecond, Rate: 1e9, Queue: 2e6},
			BtoA: Direction{Delay: 50 * time.Millisecond, Rate: 1e9, Queue: 2e6}}},
	} {
		got, err := ParseProfile(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("ParseProfile(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{"", "lan", "rtt=fast", "loss=200%", "wan,colour=red", "rate=-1"} {
		if _, err := ParseProfile(bad); err == nil {
			t.Errorf("ParseProfile(%q) accepted", bad)
		}
	}
}
