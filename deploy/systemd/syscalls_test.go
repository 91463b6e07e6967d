package systemd

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/migtun/migtun/deploy/internal/testbin"
)

// allowedSyscalls resolves the unit's SystemCallFilter= lines (an allow
// list, then "~" lists taken away) into system call names, expanding the
// groups the way this machine's systemd defines them.
func allowedSyscalls(t *testing.T, analyze string, u Unit) map[string]bool {
	t.Helper()
	out, err := exec.Command(analyze, "syscall-filter", "--no-pager").Output()
	if err != nil {
		t.Fatalf("systemd-analyze syscall-filter: %v", err)
	}
	groups := map[string][]string{}
	cur := ""
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 0 || strings.HasPrefix(f[0], "#"):
		case strings.HasPrefix(line, "@"):
			cur = f[0]
		case cur != "":
			groups[cur] = append(groups[cur], f[0])
		}
	}
	var expand func(names []string, into map[string]bool)
	expand = func(names []string, into map[string]bool) {
		for _, n := range names {
			if !strings.HasPrefix(n, "@") {
				into[n] = true
				continue
			}
			members, ok := groups[n]
			if !ok {
				t.Fatalf("systemd knows no group %s", n)
			}
			expand(members, into)
		}
	}
	allowed := map[string]bool{}
	for i, v := range u["Service"]["SystemCallFilter"] {
		deny := strings.HasPrefix(v, "~")
		names := strings.Fields(strings.TrimPrefix(v, "~"))
		if i == 0 && deny {
			t.Fatal("SystemCallFilter starts with a deny list: want an allow list first")
		}
		set := map[string]bool{}
		expand(names, set)
		for n := range set {
			if deny {
				delete(allowed, n)
			} else {
				allowed[n] = true
			}
		}
	}
	if len(allowed) == 0 {
		t.Fatal("no SystemCallFilter= in the unit")
	}
	return allowed
}

var (
	traceLine  = regexp.MustCompile(`^\d+\s+([a-z0-9_]+)\(`)
	socketLine = regexp.MustCompile(`^\d+\s+socket\((AF_[A-Z0-9]+)`)
)

// traced is a migtun serve run under strace -f.
type traced struct {
	strace *exec.Cmd
	trace  string
	logs   *bytes.Buffer
}

func startTraced(t *testing.T, strace, bin, dir, name string, args ...string) *traced {
	t.Helper()
	tr := &traced{trace: filepath.Join(dir, name+".trace"), logs: &bytes.Buffer{}}
	tr.strace = exec.Command(strace, append([]string{"-f", "-qq", "-o", tr.trace, "--", bin, "serve"}, args...)...)
	stdout, err := tr.strace.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	tr.strace.Stderr = tr.logs
	if err := tr.strace.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stdout)
	if !sc.Scan() || !strings.HasPrefix(sc.Text(), "migtun ready") {
		tr.strace.Process.Kill()
		tr.strace.Wait()
		t.Fatalf("%s: no ready line\n%s", name, tr.logs.String())
	}
	go io.Copy(io.Discard, stdout)
	return tr
}

// stop sends SIGTERM to migtun (strace's child), waits for both, and
// returns the system calls migtun made.
func (tr *traced) stop(t *testing.T) []string {
	t.Helper()
	pid := tr.strace.Process.Pid
	children, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	if err != nil {
		t.Fatalf("finding migtun under strace: %v", err)
	}
	f := strings.Fields(string(children))
	if len(f) != 1 {
		t.Fatalf("strace has children %q, want migtun alone", f)
	}
	child, _ := strconv.Atoi(f[0])
	if err := syscall.Kill(child, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := tr.strace.Wait(); err != nil {
		t.Errorf("migtun serve under strace: %v\n%s", err, tr.logs.String())
	}
	data, err := os.ReadFile(tr.trace)
	if err != nil {
		t.Fatal(err)
	}
	var calls []string
	for _, line := range strings.Split(string(data), "\n") {
		if m := traceLine.FindStringSubmatch(line); m != nil {
			calls = append(calls, m[1])
		}
		if m := socketLine.FindStringSubmatch(line); m != nil {
			calls = append(calls, "socket:"+m[1])
		}
	}
	return calls
}

// TestSyscallFilter runs two migtun serve processes under strace, one
// forwarding a UNIX socket to the other's route, over each transport (tls,
// quic, plain with splice), relays bytes through them and stops them with
// SIGTERM; every system call they made must be one the unit's
// SystemCallFilter= allows, or systemd would fail it with EPERM, and every
// socket they opened of a family RestrictAddressFamilies= allows.
func TestSyscallFilter(t *testing.T) {
	analyze := testbin.NeedTool(t, "systemd-analyze")
	strace := testbin.NeedTool(t, "strace")
	u, _ := loadUnit(t)
	allowed := allowedSyscalls(t, analyze, u)
	bin := testbin.Migtun(t)
	dir := t.TempDir()
	pki := filepath.Join(dir, "pki")
	for _, args := range [][]string{{"certs", "init", "--dir", pki},
		{"certs", "issue", "--dir", pki, "--name", "a", "--san", "127.0.0.1"},
		{"certs", "issue", "--dir", pki, "--name", "b", "--san", "127.0.0.1"}} {
		if out, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
			t.Fatalf("migtun %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	files := func(name string) []string {
		return []string{"--cert", filepath.Join(pki, name+".crt"), "--key", filepath.Join(pki, name+".key"), "--ca", filepath.Join(pki, "ca.crt")}
	}

	used := map[string][]string{} // system call → transports that made it
	for _, transport := range []string{"tls", "quic", "plain"} {
		tdir := filepath.Join(dir, transport)
		for _, d := range []string{"a", "b"} {
			if err := os.MkdirAll(filepath.Join(tdir, d), 0o700); err != nil {
				t.Fatal(err)
			}
		}
		sinkPath := filepath.Join(tdir, "sink.sock")
		sink, err := net.Listen("unix", sinkPath)
		if err != nil {
			t.Fatal(err)
		}
		got := make(chan int64, 1)
		go func() {
			c, err := sink.Accept()
			if err != nil {
				got <- -1
				return
			}
			n, _ := io.Copy(io.Discard, c)
			c.Close()
			got <- n
		}()
		extra := []string{"--transport", transport}
		if transport == "plain" {
			extra = append(extra, "--insecure-plaintext")
		}
		peer := freePort(t)
		b := startTraced(t, strace, bin, tdir, "b", slices.Concat([]string{"--listen", peer, "--socket-dir", filepath.Join(tdir, "b"),
			"--route", "main=unix:" + sinkPath}, files("b"), extra)...)
		fwd := filepath.Join(tdir, "a", "main.sock")
		a := startTraced(t, strace, bin, tdir, "a", slices.Concat([]string{"--listen", "127.0.0.1:0", "--socket-dir", filepath.Join(tdir, "a"),
			"--forward", "unix:" + fwd + "=" + peer + "/main"}, files("a"), extra)...)

		const size = 4 << 20
		c, err := net.Dial("unix", fwd)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(time.Minute))
		if _, err := io.CopyN(c, zeros{}, size); err != nil {
			t.Fatalf("%s: writing: %v", transport, err)
		}
		c.(*net.UnixConn).CloseWrite()
		if n := <-got; n != size {
			t.Errorf("%s: sink got %d bytes, want %d", transport, n, size)
		}
		io.Copy(io.Discard, c) // EOF once the sink closed
		c.Close()
		sink.Close()
		for _, p := range []*traced{a, b} {
			for _, call := range p.stop(t) {
				if !slices.Contains(used[call], transport) {
					used[call] = append(used[call], transport)
				}
			}
		}
	}
	if len(used) == 0 {
		t.Fatal("strace recorded no system calls")
	}
	t.Logf("%d distinct system calls", len(used))
	families := strings.Fields(u.Get("Service", "RestrictAddressFamilies"))
	for _, call := range slices.Sorted(maps.Keys(used)) {
		if family, ok := strings.CutPrefix(call, "socket:"); ok {
			if !slices.Contains(families, family) {
				t.Errorf("migtun opens %s sockets (%s), which RestrictAddressFamilies= refuses", family, strings.Join(used[call], ", "))
			}
			continue
		}
		if !allowed[call] {
			t.Errorf("migtun calls %s (%s), which SystemCallFilter= refuses", call, strings.Join(used[call], ", "))
		}
	}
}

// zeros reads as an endless run of zero bytes.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
