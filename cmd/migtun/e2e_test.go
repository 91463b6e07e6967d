package main

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/migtun/migtun/internal/vmtest"
)

// TestMigration migrates a paused QEMU VM with random RAM and a random disk
// through two migtun processes, over each transport, with one main channel
// and with multifd, and compares the images on both sides byte for byte.
// While it runs, garbage is thrown at the destination's port.
//
// It runs on one QEMU generation (the first selected), full size: the
// other end-to-end tests run every generation with small guests.
func TestMigration(t *testing.T) {
	q := vmtest.One(t)
	ram, disk := int64(vmtest.DefaultRAM), int64(vmtest.DefaultDisk)
	if testing.Short() {
		ram, disk = 128<<20, 64<<20
	}
	for _, tr := range []string{"tls", "quic", "plain"} {
		for _, multifd := range []int{0, 4} {
			name := tr + "/single"
			if multifd > 0 {
				name = tr + "/multifd" + strconv.Itoa(multifd)
			}
			t.Run(name, func(t *testing.T) {
				// The plain transport must move the bulk bytes with splice(2)
				// on both hosts: run both under strace and count.
				testMigration(t, q, tr, multifd, ram, disk, tr == "plain" && multifd == 0)
			})
		}
	}
}

func testMigration(t *testing.T, q vmtest.QEMU, transport string, multifd int, ram, disk int64, traceSplice bool) {
	dir := shortTempDir(t)
	wrap := func(string) []string { return nil }
	if traceSplice {
		strace := requireTool(t, "strace")
		wrap = func(host string) []string {
			return []string{strace, "-f", "--seccomp-bpf", "-e", "trace=splice", "-o", filepath.Join(dir, host+".strace")}
		}
	}
	ca := pki(t, "src", "dst")
	var extra []string
	if transport == "plain" {
		extra = []string{"--insecure-plaintext"}
	}
	dstIn, dstNBD := filepath.Join(dir, "dst-in.sock"), filepath.Join(dir, "dst-nbd.sock")
	dst := startServe(t, ca, "dst", wrap("dst"), append([]string{"--transport", transport,
		"--route", "main=unix:" + dstIn, "--route", "nbd=unix:" + dstNBD}, extra...)...)
	fwdMain, fwdNBD := filepath.Join(dir, "fwd-main.sock"), filepath.Join(dir, "fwd-nbd.sock")
	src := startServe(t, ca, "src", wrap("src"), append([]string{"--transport", transport,
		"--forward", "unix:" + fwdMain + "=" + dst.Addr + "/main",
		"--forward", "unix:" + fwdNBD + "=" + dst.Addr + "/nbd"}, extra...)...)
	if transport == "plain" {
		for _, p := range []string{src.LogPath, dst.LogPath} {
			if !logHas(p, "level=WARN", "plaintext allowed") {
				t.Errorf("%s: no warning at start that plaintext is allowed", p)
			}
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	srcVM, err := vmtest.Start(ctx, vmtest.Options{Dir: dir, Name: "src", RAM: ram, Disk: disk, Random: true, QEMU: q})
	if err != nil {
		t.Fatal(err)
	}
	defer srcVM.Close()
	dstVM, err := vmtest.Start(ctx, vmtest.Options{Dir: dir, Name: "dst", RAM: ram, Disk: disk, Incoming: true, QEMU: q})
	if err != nil {
		t.Fatal(err)
	}
	defer dstVM.Close()
	if err := vmtest.CompareImages(srcVM, dstVM); err == nil {
		t.Fatal("images equal before migrating: the comparison proves nothing")
	}

	stopJunk := throwJunk(t, transport, dst.Addr)
	res, err := vmtest.Migrate(ctx, srcVM, dstVM, vmtest.MigrateOptions{
		MainURI: "unix:" + fwdMain, IncomingURI: "unix:" + dstIn,
		NBDServerPath: dstNBD, NBDClientPath: fwdNBD,
		Multifd: multifd,
	})
	junk := stopJunk()
	if err != nil {
		t.Fatalf("migration through migtun (%s): %v", transport, err)
	}
	if err := vmtest.CompareImages(srcVM, dstVM); err != nil {
		t.Fatalf("after migration through migtun (%s): %v", transport, err)
	}
	t.Logf("%s multifd=%d: RAM %d MiB in %v, disk %d MiB mirrored in %v; %d junk connections sent meanwhile",
		transport, multifd, res.RAMBytes>>20, res.Migration.Round(time.Millisecond),
		res.DiskBytes>>20, res.Mirror.Round(time.Millisecond), junk)

	// Streams: one per multifd channel plus main, and nbd.
	srcVM.Close()
	dstVM.Close()
	stopServe(t, src)
	stopServe(t, dst)
	wantMain := 1 + multifd
	if got := countLines(t, dst.LogPath, `msg="stream accepted".*channel=main`); got != wantMain {
		t.Errorf("destination accepted %d main streams, want %d", got, wantMain)
	}
	// Junk TCP connections are refused and logged; junk UDP datagrams are
	// dropped by QUIC without a connection, so there is nothing to log.
	if got := countLines(t, dst.LogPath, `msg="stream refused"`); got < 1 && transport != "quic" {
		t.Errorf("no junk connection was refused and logged")
	}
	if traceSplice {
		for _, host := range []string{"src", "dst"} {
			spliced := splicedBytes(t, filepath.Join(dir, host+".strace"))
			// Each byte is spliced twice (socket to pipe, pipe to socket).
			t.Logf("%s: %d MiB moved by splice(2)", host, spliced>>20)
			if spliced < ram {
				t.Errorf("%s: only %d bytes moved by splice(2), want at least the %d bytes of RAM", host, spliced, ram)
			}
		}
	}
	for _, p := range []string{fwdMain, fwdNBD} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("socket file %s left behind after SIGTERM", p)
		}
	}
}

// throwJunk sends malformed connections at addr until the returned function
// is called; that function returns how many were sent.
func throwJunk(t *testing.T, transport, addr string) func() int {
	network := "tcp"
	if transport == "quic" {
		network = "udp"
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	var n int
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			case <-time.After(20 * time.Millisecond):
			}
			c, err := net.DialTimeout(network, addr, time.Second)
			if err != nil {
				continue
			}
			c.Write([]byte("MGTN\x01\x01\x00\x04 this is not a valid header, nor TLS \x16\x03"))
			c.Close()
			n++
		}
	}()
	return func() int {
		close(done)
		wg.Wait()
		return n
	}
}

func countLines(t *testing.T, path, pattern string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(pattern)
	n := 0
	for _, l := range strings.Split(string(b), "\n") {
		if re.MatchString(l) {
			n++
		}
	}
	return n
}

// shortTempDir returns a temporary directory with a short path: UNIX socket
// paths are limited to 107 bytes and t.TempDir's names are long.
func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "mt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

var spliceRE = regexp.MustCompile(`splice\(.*\) = (\d+)$`)

// splicedBytes sums the results of the successful splice calls in an
// strace log.
func splicedBytes(t *testing.T, path string) int64 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var sum int64
	for _, l := range strings.Split(string(b), "\n") {
		if m := spliceRE.FindStringSubmatch(l); m != nil {
			n, _ := strconv.ParseInt(m[1], 10, 64)
			sum += n
		}
	}
	return sum
}
