package main

import (
	"bytes"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/migtun/migtun/control"
)

// runCLI runs the command line in-process and returns stdout, stderr and
// the error, as main would see them.
func runCLI(args ...string) (string, string, error) {
	var out, errOut bytes.Buffer
	err := run(args, &out, &errOut)
	return out.String(), errOut.String(), err
}

// TestBadFlagsNamed checks that a bad command line is refused with a
// message naming what is wrong, before anything starts.
func TestBadFlagsNamed(t *testing.T) {
	dir := t.TempDir()
	for _, name := range []string{"c.crt", "c.key", "ca.crt"} {
		os.WriteFile(filepath.Join(dir, name), nil, 0o600)
	}
	files := []string{"--cert", filepath.Join(dir, "c.crt"), "--key", filepath.Join(dir, "c.key"), "--ca", filepath.Join(dir, "ca.crt")}
	cases := []struct {
		args []string
		want string // in the error or on stderr
	}{
		{[]string{}, "no command"},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"serve", "--no-such-flag"}, "no-such-flag"},
		{[]string{"serve", "--route", "main"}, "-route"},
		{[]string{"serve", "--route", "main=unix:relative/path"}, "absolute"},
		{[]string{"serve", "--route", "Main=unix:/x"}, "bad channel name"},
		{[]string{"serve", "--forward", "unix:/x=host/main"}, "-forward"},
		{[]string{"serve", "--forward", "unix:/x=host:99999/main"}, "bad port"},
		{[]string{"serve", "--dial-timeout", "soon"}, "-dial-timeout"},
		{append([]string{"serve"}, files...), "--listen is required"},
		{[]string{"serve", "--listen", "127.0.0.1:0", "--key", "k", "--ca", "c"}, "--cert is required"},
		{append([]string{"serve", "--listen", "127.0.0.1:0", "--transport", "carrier-pigeon"}, files...), "--transport"},
		{append([]string{"serve", "--listen", "127.0.0.1:0", "--transport", "plain"}, files...), "--insecure-plaintext"},
		{append([]string{"serve", "--listen", "127.0.0.1:0", "--log-format", "xml"}, files...), "--log-format"},
		{append([]string{"serve", "--listen", "127.0.0.1:0"}, files...), "ca.crt: certs: no certificate"}, // empty PEM files
		{[]string{"serve", "stray"}, "unexpected argument"},
		{[]string{"certs"}, "init or issue"},
		{[]string{"certs", "init"}, "--dir is required"},
		{[]string{"certs", "issue", "--dir", dir}, "--name is required"},
		{[]string{"certs", "issue", "--dir", dir, "--name", "../evil"}, "evil"},
		{[]string{"session"}, "prepare, show, list, finish or abort"},
		{[]string{"session", "show", "--control", "unix:/nonexistent.sock"}, "exactly one session ID"},
		{[]string{"session", "prepare", "--peer", "h:1", "--channel", "main"}, "--control is required"},
		{[]string{"session", "list", "--control", "unix:" + filepath.Join(dir, "none.sock")}, "is 'migtun serve --control"},
		{[]string{"migrate", "--control", "unix:/c", "--peer", "h:1", "--qmp", "unix:/q", "--dest-vm", "vm1", "--postcopy-start", "later"}, "--postcopy-start"},
		{[]string{"migrate", "--control", "unix:/c", "--peer", "h:1", "--qmp", "unix:/q", "--dest-vm", "vm1", "--recover-timeout", "0s"}, "--recover-timeout"},
		{[]string{"bench", "--qemu", "--size", "1.5MiB", "--baselines", "direct", "--transport", ""}, "multiple of 1MiB"},
	}
	for _, c := range cases {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			_, stderr, err := runCLI(c.args...)
			if err == nil {
				t.Fatal("accepted")
			}
			msg := err.Error() + "\n" + stderr
			if !strings.Contains(msg, c.want) {
				t.Fatalf("message does not mention %q:\n%s", c.want, msg)
			}
		})
	}
}

func TestHelpAndVersion(t *testing.T) {
	out, _, err := runCLI("version")
	if err != nil || !strings.HasPrefix(out, "migtun ") {
		t.Fatalf("version: %q %v", out, err)
	}
	_, stderr, err := runCLI("serve", "--help")
	if !errors.Is(err, flag.ErrHelp) || !strings.Contains(stderr, "--route") && !strings.Contains(stderr, "-route") {
		t.Fatalf("serve --help: %v\n%s", err, stderr)
	}
}

func TestCertsCommands(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	if _, _, err := runCLI("certs", "init", "--dir", dir); err != nil {
		t.Fatal(err)
	}
	if _, _, err := runCLI("certs", "init", "--dir", dir); err == nil {
		t.Fatal("certs init overwrote an existing CA")
	}
	out, _, err := runCLI("certs", "issue", "--dir", dir, "--name", "host-a", "--san", "10.0.0.1", "--san", "a.example")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"ca.crt", "ca.key", "host-a.crt", "host-a.key"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Fatalf("%s: %v (output %q)", f, err, out)
		}
	}
}

func TestVirshArgs(t *testing.T) {
	ch := func(name, uri string) control.ChannelInfo { return control.ChannelInfo{Name: name, LibvirtURI: uri} }
	p2p := virshArgs(control.SessionInfo{Channels: []control.ChannelInfo{
		ch("libvirt", "qemu+unix:///system?socket=/s/l.sock"), ch("main", "unix:///s/m.sock"), ch("nbd", "unix:///s/n.sock")}})
	want := "virsh migrate --live --p2p --copy-storage-all DOMAIN --desturi 'qemu+unix:///system?socket=/s/l.sock' --migrateuri unix:///s/m.sock --disks-uri unix:///s/n.sock"
	if p2p != want {
		t.Errorf("p2p:\n got %s\nwant %s", p2p, want)
	}
	direct := virshArgs(control.SessionInfo{Channels: []control.ChannelInfo{ch("main", "unix:///s/m.sock"), ch("nbd", "unix:///s/n.sock")}})
	want = "virsh migrate --live --copy-storage-all DOMAIN --desturi DESTURI --migrateuri unix:///s/m.sock --disks-uri unix:///s/n.sock"
	if direct != want {
		t.Errorf("direct:\n got %s\nwant %s", direct, want)
	}
}

// TestCompletionAndMan: the completion scripts and man pages are made from
// the commands' own flags, and mistyped commands and flags get a
// suggestion.
func TestCompletionAndMan(t *testing.T) {
	for _, shell := range []string{"bash", "zsh", "fish"} {
		out, _, err := runCLI("completion", shell)
		if err != nil || !strings.Contains(out, "migtun") || !strings.Contains(out, "__complete") {
			t.Errorf("completion %s: %v\n%.200s", shell, err, out)
		}
	}
	out, _, err := runCLI("__complete", "serve", "--control")
	for _, want := range []string{"--control\t", "--control-listen\t", "--control-token-file\t"} {
		if err != nil || !strings.Contains(out, want) {
			t.Errorf("completing serve --control: %v, no %q in\n%s", err, want, out)
		}
	}
	if out, _, err := runCLI("__complete", "session", "pre"); err != nil || !strings.Contains(out, "prepare") {
		t.Errorf("completing session pre: %v\n%s", err, out)
	}
	dir := t.TempDir()
	if _, _, err := runCLI("man", "--dir", dir); err != nil {
		t.Fatal(err)
	}
	page, err := os.ReadFile(filepath.Join(dir, "migtun-serve.1"))
	if err != nil || !bytes.Contains(page, []byte("control-token-file")) || !bytes.Contains(page, []byte("MIGTUN")) {
		t.Errorf("migtun-serve.1: %v\n%.300s", err, page)
	}
	for _, name := range []string{"migtun.1", "migtun-migrate.1", "migtun-session-prepare.1", "migtun-vm-add.1"} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Error(err)
		}
	}
	if _, _, err := runCLI("serv"); err == nil || !strings.Contains(err.Error(), `did you mean "serve"`) {
		t.Errorf("a mistyped command: %v", err)
	}
	if _, stderr, err := runCLI("serve", "--listne", "x"); err == nil || !strings.Contains(stderr, "Did you mean --listen?") {
		t.Errorf("a mistyped flag: %v\n%s", err, stderr)
	}
	// --help groups the flags by purpose and writes them as they are typed.
	_, stderr, _ := runCLI("serve", "--help")
	for _, want := range []string{"The tunnel port:", "Control and metrics:", "  --listen VALUE", "  --insecure-plaintext\n"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("serve --help lacks %q:\n%s", want, stderr)
		}
	}
}
