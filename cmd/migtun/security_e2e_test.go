package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/migtun/migtun/control"
)

// countingSocket listens on a UNIX socket and counts the connections it
// is given, as a stand-in for a route target or a QMP socket.
func countingSocket(t *testing.T, path string) *atomic.Int64 {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	var n atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return &n
}

// scrape reads one sample from a host's metrics through its control socket.
func scrape(t *testing.T, ctl, name, labels string) float64 {
	t.Helper()
	hc := unixHTTP(strings.TrimPrefix(ctl, "unix:"))
	resp, err := hc.Get("http://migtun/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(line, name) && strings.Contains(line, labels) {
			f := strings.Fields(line)
			var v float64
			json.Unmarshal([]byte(f[len(f)-1]), &v)
			return v
		}
	}
	return 0
}

func unixHTTP(path string) *http.Client {
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		}}}
}

// TestAttackSessionlessStream: with the README's session setup on the
// destination (a control socket, static nbd and libvirt routes), a second
// peer holding a certificate of the CA but no session forwards to the nbd
// and libvirt channels: both are refused before the targets see a
// connection, and counted as unauthorized.
func TestAttackSessionlessStream(t *testing.T) {
	dir := shortTempDir(t)
	ca := pki(t, "dst", "mallory")
	nbd, lv := countingSocket(t, filepath.Join(dir, "nbd.sock")), countingSocket(t, filepath.Join(dir, "libvirt.sock"))
	ctl := "unix:" + filepath.Join(dir, "dst.ctl")
	dst := startServe(t, ca, "dst", nil, "--control", ctl, "--socket-dir", filepath.Join(dir, "ds"),
		"--route", "nbd=unix:"+filepath.Join(dir, "nbd.sock"), "--route", "libvirt=unix:"+filepath.Join(dir, "libvirt.sock"))
	fwdNBD, fwdLV := filepath.Join(dir, "m-nbd.sock"), filepath.Join(dir, "m-lv.sock")
	startServe(t, ca, "mallory", nil, "--socket-dir", filepath.Join(dir, "ms"),
		"--forward", "unix:"+fwdNBD+"="+dst.Addr+"/nbd", "--forward", "unix:"+fwdLV+"="+dst.Addr+"/libvirt")
	for _, fwd := range []string{fwdNBD, fwdLV} {
		c, err := net.Dial("unix", fwd)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("NBDMAGIC…"))
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Errorf("%s: the destination answered a stream without a session", fwd)
		}
		c.Close()
	}
	if n := scrape(t, ctl, "migtun_streams_refused_total", `reason="unauthorized"`); n < 2 {
		t.Errorf("migtun_streams_refused_total{reason=unauthorized} = %v, want 2", n)
	}
	if nbd.Load()+lv.Load() != 0 {
		t.Errorf("the targets saw %d (nbd) and %d (libvirt) connections from a peer without a session", nbd.Load(), lv.Load())
	}
}

// TestAttackControlEndpoint: the TCP control endpoint does not start
// without a token; with one, a request without it, with a foreign Host or
// with a body that is not JSON is refused with its code, and one with all
// three right is served.
func TestAttackControlEndpoint(t *testing.T) {
	dir := shortTempDir(t)
	ca := pki(t, "h")
	base := []string{"serve", "--listen", "127.0.0.1:0", "--cert", filepath.Join(ca, "h.crt"), "--key", filepath.Join(ca, "h.key"),
		"--ca", filepath.Join(ca, "ca.crt"), "--socket-dir", filepath.Join(dir, "s"), "--control-listen", "127.0.0.1:0"}
	out, err := exec.Command(migtunBin, base...).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "--control-listen needs --control-token-file") {
		t.Fatalf("a TCP control endpoint without a token: %v\n%s", err, out)
	}
	token := filepath.Join(dir, "token")
	os.WriteFile(token, []byte("0123456789abcdef0123456789abcdef\n"), 0o644)
	out, err = exec.Command(migtunBin, append(base, "--control-token-file", token)...).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "lets others read it") {
		t.Fatalf("a token file others may read: %v\n%s", err, out)
	}
	os.Chmod(token, 0o600)
	h := startServe(t, ca, "h", nil, "--socket-dir", filepath.Join(dir, "s2"), "--control-listen", "127.0.0.1:0", "--control-token-file", token)
	addr := ""
	for _, c := range h.Control {
		if a, ok := strings.CutPrefix(c, "tcp:"); ok {
			addr = a
		}
	}
	if addr == "" {
		t.Fatalf("no TCP control endpoint among %v", h.Control)
	}
	call := func(host, tok, ctype, body string) *control.Error {
		req, _ := http.NewRequest("POST", "http://"+addr+"/v1/sessions", strings.NewReader(body))
		req.Host = host
		if tok != "" {
			req.Header.Set("Authorization", "Bearer "+tok)
		}
		if ctype != "" {
			req.Header.Set("Content-Type", ctype)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var e control.Error
		json.NewDecoder(resp.Body).Decode(&e)
		return &e
	}
	good := "0123456789abcdef0123456789abcdef"
	body := `{"peer":"127.0.0.1:1","channels":["libvirt"]}`
	for _, c := range []struct {
		name, host, tok, ctype string
		want                   control.Code
	}{
		{"no token", addr, "", "application/json", control.CodeUnauthorized},
		{"wrong token", addr, "x" + good[1:], "application/json", control.CodeUnauthorized},
		{"foreign Host", "evil.example:80", good, "application/json", control.CodeBadRequest},
		{"not JSON", addr, good, "text/plain", control.CodeUnsupported},
		// All right: the request is served (and fails only at the peer).
		{"authorized", addr, good, "application/json", control.CodeUnavailable},
	} {
		if e := call(c.host, c.tok, c.ctype, body); e.Code != c.want {
			t.Errorf("%s: code %q (%s), want %q", c.name, e.Code, e.Message, c.want)
		}
	}
}

// TestAttackSocketDirectory: a socket directory another user prepared
// (writable by all), a symlink, or one owned by another user is refused
// at start with a message naming it; a missing one is created 0700, and
// the control socket is 0600 from the start.
func TestAttackSocketDirectory(t *testing.T) {
	dir := shortTempDir(t)
	ca := pki(t, "h")
	serve := func(sockDir string, extra ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, migtunBin, append([]string{"serve", "--listen", "127.0.0.1:0",
			"--cert", filepath.Join(ca, "h.crt"), "--key", filepath.Join(ca, "h.key"), "--ca", filepath.Join(ca, "ca.crt"),
			"--socket-dir", sockDir}, extra...)...).CombinedOutput()
		return string(out), err
	}
	open := filepath.Join(dir, "open")
	os.Mkdir(open, 0o777)
	os.Chmod(open, 0o777)
	link := filepath.Join(dir, "link")
	os.Symlink(open, link)
	theirs := filepath.Join(dir, "theirs")
	os.Mkdir(theirs, 0o700)
	cases := map[string]string{open: "writable by others", link: "is a symlink"}
	if os.Geteuid() == 0 {
		os.Chown(theirs, 65534, 65534)
		cases[theirs] = "owned by uid 65534"
	}
	for d, want := range cases {
		out, err := serve(d)
		var ee *exec.ExitError
		if !errors.As(err, &ee) || !strings.Contains(out, want) || !strings.Contains(out, d) {
			t.Errorf("socket directory %s: %v, want a refusal saying %q:\n%s", d, err, want, out)
		}
	}
	fresh := filepath.Join(dir, "fresh", "sockets")
	ctl := filepath.Join(dir, "ctl", "control.sock")
	startServe(t, ca, "h", nil, "--socket-dir", fresh, "--control", "unix:"+ctl)
	for path, want := range map[string]os.FileMode{fresh: 0o700, ctl: 0o600, filepath.Dir(ctl): 0o700} {
		fi, err := os.Stat(path)
		if err != nil || fi.Mode().Perm() != want {
			t.Errorf("%s: mode %v (%v), want %04o", path, fi.Mode().Perm(), err, want)
		}
	}
}

// TestAttackForeignPeerClaimsVM: a VM bound to peer "src" is refused to
// another peer of the same CA, before its QMP socket is touched.
func TestAttackForeignPeerClaimsVM(t *testing.T) {
	dir := shortTempDir(t)
	ca := pki(t, "dst", "src", "mallory")
	qmpSock := filepath.Join(dir, "web1.qmp")
	touched := countingSocket(t, qmpSock)
	dst := startServe(t, ca, "dst", nil, "--socket-dir", filepath.Join(dir, "ds"), "--qmp", "web1=unix:"+qmpSock+",peer=src")
	mctl := "unix:" + filepath.Join(dir, "m.ctl")
	startServe(t, ca, "mallory", nil, "--socket-dir", filepath.Join(dir, "ms"), "--control", mctl)
	c, err := control.NewClient(mctl, &control.Options{Timeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	info, err := c.Prepare(ctx, control.PrepareRequest{Peer: dst.Addr, Channels: []string{"main", "nbd"}})
	if err != nil {
		t.Fatal(err)
	}
	err = c.VM(ctx, info.ID, "prepare", map[string]any{"vm": "web1", "prepare": map[string]any{"disks": []any{map[string]any{"node": "disk0", "size": 1 << 20}}}}, nil)
	if !errors.Is(err, control.ErrForbidden) {
		t.Fatalf("vm-prepare of a VM bound to another peer: %v, want code forbidden", err)
	}
	if touched.Load() != 0 {
		t.Errorf("the bound VM's QMP socket was connected %d times", touched.Load())
	}
	if _, err := c.Abort(ctx, info.ID, "test"); err != nil {
		t.Fatal(err)
	}
}
