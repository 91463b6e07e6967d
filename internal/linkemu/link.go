package linkemu

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Side names one end of the link.
type Side int

const (
	// A is the first namespace, 10.77.0.1.
	A Side = iota
	// B is the second namespace, 10.77.0.2.
	B
)

func (s Side) String() string {
	if s == A {
		return "a"
	}
	return "b"
}

// The addresses of the two ends.
const (
	AddrA = "10.77.0.1"
	AddrB = "10.77.0.2"
)

// DefaultMTU is the MTU of both TUN devices when Config.MTU is 0: a plain
// Ethernet frame's, so TCP sees as many packets, and as many losses, as on
// a real link.
const DefaultMTU = 1500

// Direction is what the link does to the packets of one direction.
type Direction struct {
	// Delay is the one-way delay every packet gets.
	Delay time.Duration
	// Loss is the probability, from 0 to 1, that a packet is dropped.
	Loss float64
	// Rate is the link rate in bits per second (IP packets, headers
	// included); 0 means unlimited.
	Rate float64
	// Queue is how many bytes may wait for the rate limit; a packet that
	// does not fit is dropped (tail drop). 0 means Rate × 25ms, at least
	// 64 packets of the MTU. Unused without Rate.
	Queue int
	// Reorder is the probability, from 0 to 1, that a packet is held back
	// by ReorderDelay more, so packets sent after it overtake it.
	Reorder float64
	// ReorderDelay is the extra delay of a reordered packet (default 1ms).
	ReorderDelay time.Duration
}

// Config configures a link: AtoB applies to packets sent by namespace A to
// B, BtoA to the packets coming back.
type Config struct {
	// Name is shown by String (a profile name such as "wan"); optional.
	Name       string
	AtoB, BtoA Direction
	// MTU of both TUN devices (default DefaultMTU).
	MTU int
	// Seed makes the losses and reorderings of a run repeatable; 0 picks
	// one at random.
	Seed uint64
}

// Symmetric returns a link with the same loss and rate both ways and a
// round trip of rtt (half of it each way).
func Symmetric(rtt time.Duration, loss, rate float64) Config {
	d := Direction{Delay: rtt / 2, Loss: loss, Rate: rate}
	return Config{AtoB: d, BtoA: d}
}

// RTT returns the round trip the link adds (both one-way delays).
func (c Config) RTT() time.Duration { return c.AtoB.Delay + c.BtoA.Delay }

// String describes the link, e.g. "wan: rtt 40ms, loss 0.1%, 400 Mbit/s".
func (c Config) String() string {
	d := c.AtoB
	s := fmt.Sprintf("rtt %s, loss %s, %s", c.RTT(), FormatLoss(d.Loss), FormatRate(d.Rate))
	if d.Reorder > 0 {
		s += fmt.Sprintf(", reorder %s", FormatLoss(d.Reorder))
	}
	if c.AtoB != c.BtoA {
		b := c.BtoA
		s += fmt.Sprintf(" (back: delay %s, loss %s, %s)", b.Delay, FormatLoss(b.Loss), FormatRate(b.Rate))
	}
	if c.Name != "" {
		s = c.Name + ": " + s
	}
	return s
}

// FormatLoss renders a probability as a percentage, e.g. "0.1%".
func FormatLoss(p float64) string {
	return strconv.FormatFloat(100*p, 'f', -1, 64) + "%"
}

// FormatRate renders bits per second, e.g. "400 Mbit/s".
func FormatRate(r float64) string {
	switch {
	case r <= 0:
		return "unlimited rate"
	case r >= 1e9:
		return strconv.FormatFloat(r/1e9, 'f', -1, 64) + " Gbit/s"
	case r >= 1e6:
		return strconv.FormatFloat(r/1e6, 'f', -1, 64) + " Mbit/s"
	}
	return strconv.FormatFloat(r/1e3, 'f', -1, 64) + " kbit/s"
}

func (c Config) withDefaults() Config {
	if c.MTU == 0 {
		c.MTU = DefaultMTU
	}
	if c.Seed == 0 {
		c.Seed = rand.Uint64()
	}
	for _, d := range []*Direction{&c.AtoB, &c.BtoA} {
		if d.Rate > 0 && d.Queue == 0 {
			d.Queue = max(int(d.Rate/8*0.025), 64*c.MTU)
		}
		if d.ReorderDelay == 0 {
			d.ReorderDelay = time.Millisecond
		}
	}
	return c
}

// Validate reports a configuration the link cannot apply.
func (c Config) Validate() error {
	if c.MTU != 0 && (c.MTU < 576 || c.MTU > 65535) {
		return fmt.Errorf("linkemu: MTU %d: want 576 to 65535", c.MTU)
	}
	for _, d := range []Direction{c.AtoB, c.BtoA} {
		switch {
		case d.Delay < 0 || d.Delay > time.Minute:
			return fmt.Errorf("linkemu: delay %s: want 0 to 1m", d.Delay)
		case d.Loss < 0 || d.Loss > 1 || d.Reorder < 0 || d.Reorder > 1:
			return errors.New("linkemu: loss and reorder are probabilities from 0 to 1")
		case d.Rate < 0 || d.Queue < 0:
			return errors.New("linkemu: rate and queue must not be negative")
		}
	}
	return nil
}

// Link is a running emulated link. Its methods may be called from any
// goroutine.
type Link struct {
	cfg   Config
	ns    [2]string // namespace names
	tun   [2]*os.File
	pipes [2]*pipe // AtoB, BtoA
	wg    sync.WaitGroup
	once  sync.Once
	stop  func() bool
	// cut, when set, drops every packet both ways (Cut).
	cut atomic.Bool
}

// nsPrefix starts the name of every namespace this package makes; the
// process ID follows, so stale namespaces can be told from live ones.
const nsPrefix = "migtun-link-"

var linkSeq atomic.Int64

// Start creates the two namespaces and starts the relay between them. The
// link closes itself when ctx ends; Close it when done.
func Start(ctx context.Context, cfg Config) (*Link, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	if _, err := exec.LookPath("ip"); err != nil {
		return nil, errors.New("linkemu: the ip command (iproute2) is not installed")
	}
	removeStale()
	id := fmt.Sprintf("%s%d-%d-", nsPrefix, os.Getpid(), linkSeq.Add(1))
	l := &Link{cfg: cfg, ns: [2]string{id + "a", id + "b"}}
	if err := l.setup(); err != nil {
		l.teardown()
		return nil, err
	}
	rng := rand.New(rand.NewPCG(cfg.Seed, cfg.Seed^0x9e3779b97f4a7c15))
	l.pipes[0] = newPipe(l.tun[A], l.tun[B], cfg.AtoB, cfg.MTU, rand.New(rand.NewPCG(rng.Uint64(), rng.Uint64())), &l.cut)
	l.pipes[1] = newPipe(l.tun[B], l.tun[A], cfg.BtoA, cfg.MTU, rand.New(rand.NewPCG(rng.Uint64(), rng.Uint64())), &l.cut)
	for _, p := range l.pipes {
		l.wg.Add(2)
		go func() { defer l.wg.Done(); p.readLoop() }()
		go func() { defer l.wg.Done(); p.writeLoop() }()
	}
	l.stop = context.AfterFunc(ctx, func() { l.Close() })
	return l, nil
}

// setup makes both namespaces, their TUN devices and addresses.
func (l *Link) setup() error {
	addrs := [2][2]string{{AddrA, AddrB}, {AddrB, AddrA}}
	for side := range 2 {
		ns := l.ns[side]
		if err := run("ip", "netns", "add", ns); err != nil {
			l.ns[side] = "" // not ours to delete
			return err
		}
		err := l.Do(Side(side), func() error {
			f, err := openTUN("link0")
			l.tun[side] = f
			return err
		})
		if err != nil {
			return fmt.Errorf("linkemu: opening a TUN device: %w", err)
		}
		mtu := strconv.Itoa(l.cfg.MTU)
		for _, args := range [][]string{
			{"-n", ns, "link", "set", "lo", "up"},
			{"-n", ns, "addr", "add", addrs[side][0], "peer", addrs[side][1], "dev", "link0"},
			{"-n", ns, "link", "set", "link0", "mtu", mtu, "txqueuelen", "4096", "up"},
		} {
			if err := run("ip", args...); err != nil {
				return err
			}
		}
	}
	return nil
}

// Close stops the relay and deletes both namespaces (a process still
// running inside one keeps it alive, unreachable, until it exits). It may
// be called more than once.
func (l *Link) Close() error {
	l.once.Do(func() {
		if l.stop != nil {
			l.stop()
		}
		for _, p := range l.pipes {
			p.close()
		}
		l.teardown()
		l.wg.Wait()
	})
	return nil
}

func (l *Link) teardown() {
	for i, f := range l.tun {
		if f != nil {
			f.Close()
			l.tun[i] = nil
		}
	}
	for _, ns := range l.ns {
		if ns != "" {
			_ = run("ip", "netns", "delete", ns)
		}
	}
}

// removeStale deletes the namespaces of links whose process is gone.
func removeStale() {
	ents, err := os.ReadDir("/run/netns")
	if err != nil {
		return
	}
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), nsPrefix)
		if !ok {
			continue
		}
		pid, err := strconv.Atoi(strings.SplitN(rest, "-", 2)[0])
		if err != nil || pid == os.Getpid() {
			continue
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			_ = run("ip", "netns", "delete", e.Name())
		}
	}
}

// Config returns the link's configuration, defaults filled in.
func (l *Link) Config() Config { return l.cfg }

// Namespace returns the name of side's namespace, for "ip netns exec".
func (l *Link) Namespace(s Side) string { return l.ns[s] }

// Addr returns side's IP address.
func (l *Link) Addr(s Side) string {
	if s == A {
		return AddrA
	}
	return AddrB
}

// Exec returns argv prefixed so that it runs inside side's namespace:
// "ip netns exec NS argv...". The program keeps its process: "ip" execs it.
func (l *Link) Exec(s Side, argv ...string) []string {
	return append([]string{"ip", "netns", "exec", l.ns[s]}, argv...)
}

// Cut drops every packet both ways while on is true, as a link that went
// down would; the queues already scheduled still drain.
func (l *Link) Cut(on bool) { l.cut.Store(on) }

// Do runs f on an OS thread that has entered side's namespace, and waits
// for it. Sockets f creates belong to the namespace and may be used from
// any goroutine afterwards. The thread is thrown away when f returns.
func (l *Link) Do(s Side, f func() error) error {
	path := "/run/netns/" + l.ns[s]
	errc := make(chan error, 1)
	go func() {
		// No UnlockOSThread: the runtime ends a thread whose goroutine
		// exits locked, so no other goroutine runs in the namespace.
		runtime.LockOSThread()
		fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err != nil {
			errc <- fmt.Errorf("linkemu: %w", err)
			return
		}
		_, _, e := syscall.RawSyscall(sysSetns, uintptr(fd), syscall.CLONE_NEWNET, 0)
		syscall.Close(fd)
		if e != 0 {
			errc <- fmt.Errorf("linkemu: setns %s: %w", path, e)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// ListenTCP listens on addr ("host:port"; host may be empty) inside side,
// with lc (nil for defaults).
func (l *Link) ListenTCP(s Side, lc *net.ListenConfig, addr string) (*net.TCPListener, error) {
	if lc == nil {
		lc = &net.ListenConfig{}
	}
	var ln net.Listener
	err := l.Do(s, func() (err error) {
		ln, err = lc.Listen(context.Background(), "tcp", addr)
		return err
	})
	if err != nil {
		return nil, err
	}
	return ln.(*net.TCPListener), nil
}

// DialTCP connects from inside side to addr with d (nil for defaults).
func (l *Link) DialTCP(ctx context.Context, s Side, d *net.Dialer, addr string) (*net.TCPConn, error) {
	if d == nil {
		d = &net.Dialer{}
	}
	var conn net.Conn
	err := l.Do(s, func() (err error) {
		conn, err = d.DialContext(ctx, "tcp", addr)
		return err
	})
	if err != nil {
		return nil, err
	}
	return conn.(*net.TCPConn), nil
}

// Stats is what the relay has done so far, per direction.
type Stats struct {
	// Packets read from the sending namespace.
	Packets int64
	// Bytes of the packets read; Delivered of those written to the other
	// side.
	Bytes, Delivered int64
	// Lost were dropped at random (Loss) or by Cut; Overflow did not fit
	// the rate limit's queue.
	Lost, Overflow int64
	// Reordered were held back (Reorder).
	Reordered int64
	// Late counts packets written more than 1ms after their time; MaxLate
	// is the latest. Many late packets mean the relay could not keep up
	// and the link was slower than configured.
	Late    int64
	MaxLate time.Duration
}

// Stats returns the counters of both directions: A to B, then B to A.
func (l *Link) Stats() (atob, btoa Stats) { return l.pipes[0].stats(), l.pipes[1].stats() }

// run runs a command and returns its output in the error.
func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("linkemu: %s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
