package main

// Helpers of the reliability tests: migtun processes whose PID the test
// knows, session hosts, sinks and network namespaces.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/internal/sidecar"
	"github.com/migtun/migtun/internal/vmtest"
)

// knownBug fails the test with a finding that was once a bug of migtun's
// (fixed since; see docs/reliability.md), so a regression reads as what it is.
func knownBug(t *testing.T, format string, args ...any) {
	t.Helper()
	t.Fatal("regression of a fixed bug: " + fmt.Sprintf(format, args...))
}

// relProc is a "migtun serve" whose PID the test knows, so that it can be
// killed with SIGKILL and its memory read.
type relProc = sidecar.Proc

// startRel starts "migtun serve" with its tunnel port at listen, optionally
// under wrap (which must exec migtun, as "ip netns exec" does), and stops
// it when the test ends unless the test killed it.
func startRel(t *testing.T, pkiDir, host, listen string, wrap []string, args ...string) *relProc {
	t.Helper()
	return startServeAt(t, pkiDir, host, listen, wrap, args...)
}

// rss returns the resident set size of the process in bytes.
func rss(t *testing.T, p *relProc) int64 {
	return procStatusBytes(t, p.PID(), "VmRSS")
}

func procStatusBytes(t *testing.T, pid int, field string) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// relPKI makes a CA and a certificate per host valid for the given SANs.
func relPKI(t *testing.T, sans map[string][]string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "pki")
	if out, err := migtun(t, "certs", "init", "--dir", dir); err != nil {
		t.Fatalf("certs init: %v\n%s", err, out)
	}
	for h, ss := range sans {
		args := []string{"certs", "issue", "--dir", dir, "--name", h}
		for _, s := range ss {
			args = append(args, "--san", s)
		}
		if out, err := migtun(t, args...); err != nil {
			t.Fatalf("certs issue: %v\n%s", err, out)
		}
	}
	return dir
}

// sessionsOf lists the sessions of a host through the CLI.
func sessionsOf(t *testing.T, ctl string) []control.SessionInfo {
	t.Helper()
	out, err := migtun(t, "session", "list", "--control", ctl)
	if err != nil {
		t.Fatalf("session list: %v\n%s", err, out)
	}
	var list []control.SessionInfo
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("session list printed %q: %v", out, err)
	}
	return list
}

func sessionState(t *testing.T, ctl, id string) (control.State, string) {
	for _, s := range sessionsOf(t, ctl) {
		if s.ID == id {
			return s.State, s.Error
		}
	}
	return "", ""
}

func openState(s control.State) bool {
	return s == control.StatePrepared || s == control.StateActive || s == control.StateFinishing
}

// waitSessionEnded polls a host until session id is no longer open, up to
// limit; it returns the state and how long it took (or -1).
func waitSessionEnded(t *testing.T, ctl, id string, limit time.Duration) (control.State, string, time.Duration) {
	start := time.Now()
	for {
		st, why := sessionState(t, ctl, id)
		if !openState(st) {
			return st, why, time.Since(start)
		}
		if time.Since(start) > limit {
			return st, why, -1
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// relSessionHosts starts a destination routing main to dstIn and a source
// with a control socket and a socket directory.
type relSessionHosts struct {
	dir, socketDir, dstIn string
	src, dst              *relProc
	srcCtl, dstCtl        string
}

func newRelSessionHosts(t *testing.T, transport string, dstExtra, srcExtra []string) *relSessionHosts {
	return newRelSessionHostsTo(t, transport, "", dstExtra, srcExtra)
}

// newRelSessionHostsTo routes main to route (CHANNEL=... target) if set.
func newRelSessionHostsTo(t *testing.T, transport, route string, dstExtra, srcExtra []string) *relSessionHosts {
	h := &relSessionHosts{dir: shortTempDir(t)}
	ca := pki(t, "src", "dst")
	h.dstIn = filepath.Join(h.dir, "in.sock")
	if route == "" {
		route = "unix:" + h.dstIn
	}
	h.socketDir = filepath.Join(h.dir, "s")
	h.srcCtl, h.dstCtl = "unix:"+filepath.Join(h.dir, "src.ctl"), "unix:"+filepath.Join(h.dir, "dst.ctl")
	var extra []string
	if transport == "plain" {
		extra = []string{"--insecure-plaintext"}
	}
	h.dst = startRel(t, ca, "dst", "127.0.0.1:0", nil, append(append([]string{"--transport", transport,
		"--control", h.dstCtl, "--route", "main=" + route}, extra...), dstExtra...)...)
	h.src = startRel(t, ca, "src", "127.0.0.1:0", nil, append(append([]string{"--transport", transport,
		"--control", h.srcCtl, "--socket-dir", h.socketDir}, extra...), srcExtra...)...)
	return h
}

// abortSession aborts a session by hand so that the source can stop (see
// TestReliabilityShutdownWithOpenSession).
func (h *relSessionHosts) abortSession(t *testing.T, id string) {
	if out, err := migtun(t, "session", "abort", "--control", h.srcCtl, id); err != nil {
		t.Logf("session abort: %v\n%s", err, out)
	}
}

func (h *relSessionHosts) prepare(t *testing.T) control.SessionInfo {
	t.Helper()
	out, err := migtun(t, "session", "prepare", "--control", h.srcCtl, "--peer", h.dst.Addr, "--channel", "main")
	if err != nil {
		t.Fatalf("session prepare: %v\n%s", err, out)
	}
	var info control.SessionInfo
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatal(err)
	}
	return info
}

// sink accepts connections on a UNIX socket and reads each to its end,
// optionally at a limited rate; it reports, per connection, how many bytes
// arrived and how reading ended.
type sink struct {
	ln   net.Listener
	rate atomic.Int64 // bytes per second; 0: as fast as possible
	read atomic.Int64
	ends chan sinkEnd
}

type sinkEnd struct {
	n   int64
	sum [32]byte
	err error
	at  time.Time
}

func newSink(t *testing.T, path string, rate int64) *sink {
	return newSinkOn(t, "unix", path, rate)
}

// newSinkOn is newSink on any network: on TCP the sink can tell a reset
// (a failure passed on) from a clean end.
func newSinkOn(t *testing.T, network, addr string, rate int64) *sink {
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &sink{ln: ln, ends: make(chan sinkEnd, 16)}
	s.rate.Store(rate)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { // ends with the connection
				defer wg.Done()
				defer c.Close()
				hs := sha256.New()
				buf := make([]byte, 64<<10)
				var n int64
				start := time.Now()
				var rerr error
				for {
					if rate := s.rate.Load(); rate > 0 {
						if ahead := time.Duration(float64(n)/float64(rate)*float64(time.Second)) - time.Since(start); ahead > 0 {
							time.Sleep(ahead)
						}
					}
					k, err := c.Read(buf)
					hs.Write(buf[:k])
					n += int64(k)
					s.read.Add(int64(k))
					if err != nil {
						if err != io.EOF {
							rerr = err
						}
						break
					}
				}
				var e sinkEnd
				e.n, e.err, e.at = n, rerr, time.Now()
				copy(e.sum[:], hs.Sum(nil))
				s.ends <- e
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return s
}

// netnsPairs counts the pairs made by this process.
var netnsPairs atomic.Int32

// netnsPair is two network namespaces joined by a veth pair.
type netnsPair struct {
	a, b       string // namespace names
	ipA, ipB   string
	devA, devB string
}

func newNetnsPair(t *testing.T) *netnsPair {
	t.Helper()
	requireTool(t, "ip")
	requireTool(t, "tc")
	// Unique per process and pair: tests using pairs run in parallel.
	suffix := fmt.Sprintf("%d%c", os.Getpid()%100000, 'a'+netnsPairs.Add(1)%26)
	p := &netnsPair{a: "mta" + suffix, b: "mtb" + suffix, ipA: "10.231.0.1", ipB: "10.231.0.2",
		devA: "mva" + suffix, devB: "mvb" + suffix}
	run := func(args ...string) error {
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
		}
		return nil
	}
	if err := run("ip", "netns", "add", p.a); err != nil {
		cannot(t, "network namespaces are not permitted here: %v", err)
	}
	t.Cleanup(func() { run("ip", "netns", "del", p.a) })
	if err := run("ip", "netns", "add", p.b); err != nil {
		cannot(t, "network namespaces are not permitted here: %v", err)
	}
	t.Cleanup(func() { run("ip", "netns", "del", p.b) })
	for _, cmd := range [][]string{
		{"ip", "link", "add", p.devA, "netns", p.a, "type", "veth", "peer", "name", p.devB, "netns", p.b},
		{"ip", "-n", p.a, "addr", "add", p.ipA + "/24", "dev", p.devA},
		{"ip", "-n", p.b, "addr", "add", p.ipB + "/24", "dev", p.devB},
		{"ip", "-n", p.a, "link", "set", p.devA, "up"},
		{"ip", "-n", p.b, "link", "set", p.devB, "up"},
		{"ip", "-n", p.a, "link", "set", "lo", "up"},
		{"ip", "-n", p.b, "link", "set", "lo", "up"},
	} {
		if err := run(cmd...); err != nil {
			cannot(t, "cannot build the veth pair: %v", err)
		}
	}
	return p
}

// cut drops every packet both ways on the veth pair: tc netem loss 100%,
// or where the kernel lacks netem, a token bucket whose burst (1 byte) no
// packet fits, which drops them all as well.
func (p *netnsPair) cut(t *testing.T) string {
	t.Helper()
	how := "tc netem loss 100%"
	for _, ns := range [][2]string{{p.a, p.devA}, {p.b, p.devB}} {
		out, err := exec.Command("ip", "netns", "exec", ns[0], "tc", "qdisc", "add", "dev", ns[1], "root", "netem", "loss", "100%").CombinedOutput()
		if err != nil {
			how = "tc tbf rate 1kbit burst 1 limit 1 (no netem in this kernel)"
			out, err = exec.Command("ip", "netns", "exec", ns[0], "tc", "qdisc", "add", "dev", ns[1], "root", "tbf", "rate", "1kbit", "burst", "1", "limit", "1").CombinedOutput()
		}
		if err != nil {
			t.Fatalf("tc in %s: %v: %s", ns[0], err, out)
		}
	}
	return how
}

// unaddress removes the destination's address: what the source sends to it
// is dropped by the destination's kernel (not for this host), which the
// source cannot tell from a loss on the way; the destination's own packets
// have no route any more.
func (p *netnsPair) unaddress(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "-n", p.b, "addr", "flush", "dev", p.devB).CombinedOutput()
	if err != nil {
		t.Fatalf("ip addr flush in %s: %v: %s", p.b, err, out)
	}
	return "ip addr flush on the destination's veth"
}

// heal undoes cut: the qdiscs that dropped every packet are removed.
func (p *netnsPair) heal(t *testing.T) {
	t.Helper()
	for _, ns := range [][2]string{{p.a, p.devA}, {p.b, p.devB}} {
		if out, err := exec.Command("ip", "netns", "exec", ns[0], "tc", "qdisc", "del", "dev", ns[1], "root").CombinedOutput(); err != nil {
			t.Fatalf("tc qdisc del in %s: %v: %s", ns[0], err, out)
		}
	}
}

// netnsMigrateHosts is a migration between the namespaces of a netnsPair:
// two VMs in the host's namespace (they reach migtun over UNIX sockets,
// which namespaces share), a destination migtun in ns.b driving "vm1" and
// a source migtun in ns.a, each listening on port.
type netnsMigrateHosts struct {
	srcVM, dstVM       *vmtest.VM
	src, dst           *relProc
	srcCtl, dstCtl     string
	srcSocks, dstSocks string
}

// newNetnsMigrateHosts starts the VMs (ram and disk bytes, the source's
// random) and both migtuns with extra flags; the test lets go of the VMs'
// monitors, as migtun drives them.
func newNetnsMigrateHosts(ctx context.Context, t *testing.T, ns *netnsPair, q vmtest.QEMU, port int, ram, disk int64, extra ...string) *netnsMigrateHosts {
	t.Helper()
	dir := shortTempDir(t)
	h := &netnsMigrateHosts{
		srcCtl: "unix:" + filepath.Join(dir, "src.ctl"), dstCtl: "unix:" + filepath.Join(dir, "dst.ctl"),
		srcSocks: filepath.Join(dir, "ss"), dstSocks: filepath.Join(dir, "ds"),
	}
	h.srcVM, h.dstVM = startVMs(ctx, t, q, dir, ram, disk)
	h.srcVM.QMP.Close()
	h.dstVM.QMP.Close()
	ca := relPKI(t, map[string][]string{"src": {ns.ipA}, "dst": {ns.ipB}})
	p := ":" + strconv.Itoa(port)
	h.dst = startRel(t, ca, "dst", ns.ipB+p, []string{"ip", "netns", "exec", ns.b},
		append([]string{"--control", h.dstCtl, "--socket-dir", h.dstSocks, "--qmp", "vm1=unix:" + h.dstVM.QMPPath}, extra...)...)
	h.src = startRel(t, ca, "src", ns.ipA+p, []string{"ip", "netns", "exec", ns.a},
		append([]string{"--control", h.srcCtl, "--socket-dir", h.srcSocks}, extra...)...)
	return h
}

// migrateArgs is "migtun migrate" from the source to vm1, with extra flags.
func (h *netnsMigrateHosts) migrateArgs(extra ...string) []string {
	return append([]string{"migrate", "--control", h.srcCtl, "--peer", h.dst.Addr, "--qmp", "unix:" + h.srcVM.QMPPath,
		"--dest-vm", "vm1"}, extra...)
}

// checkClean fails if a session is open on either host or a session
// socket is left.
func (h *netnsMigrateHosts) checkClean(t *testing.T) {
	t.Helper()
	checkHostsClean(t, []string{h.srcCtl, h.dstCtl}, h.srcSocks, h.dstSocks)
}
