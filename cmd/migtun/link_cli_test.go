package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestLinkFlagsNamed: bad values of the link, socket, striping, disk and
// mirror flags are refused with the flag named, before anything starts.
func TestLinkFlagsNamed(t *testing.T) {
	dir := t.TempDir()
	for _, name := range []string{"c.crt", "c.key", "ca.crt"} {
		os.WriteFile(filepath.Join(dir, name), nil, 0o600)
	}
	files := []string{"--listen", "127.0.0.1:0", "--cert", filepath.Join(dir, "c.crt"), "--key", filepath.Join(dir, "c.key"), "--ca", filepath.Join(dir, "ca.crt")}
	for _, c := range []struct {
		args []string
		want string
	}{
		{append([]string{"serve", "--tcp-buffer", "lots"}, files...), "--tcp-buffer"},
		{append([]string{"serve", "--tcp-buffer", "2GiB"}, files...), "--tcp-buffer"},
		{append([]string{"serve", "--stripes", "17"}, files...), "--stripes"},
		{append([]string{"serve", "--stripes", "4", "--transport", "quic"}, files...), "--stripes"},
		{[]string{"bench", "--disk", "1GiB"}, "--disk"},
		{[]string{"bench", "--qemu", "--disk", "1000"}, "--disk"},
		{[]string{"migrate", "--control", "unix:/x", "--peer", "p:1", "--qmp", "unix:/q", "--dest-vm", "v", "--mirror-buffer", "lots"}, "--mirror-buffer"},
		{[]string{"bench", "--link", "lan"}, "--link"},
		{[]string{"bench", "--link", "rtt=40ms,loss=300%"}, "--link"},
	} {
		t.Run(strings.Join(c.args[:3], " "), func(t *testing.T) {
			_, stderr, err := runCLI(c.args...)
			if err == nil {
				t.Fatal("accepted")
			}
			if msg := err.Error() + "\n" + stderr; !strings.Contains(msg, c.want) {
				t.Fatalf("message does not mention %q:\n%s", c.want, msg)
			}
		})
	}
}
