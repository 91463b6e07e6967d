// Command demo shows migtun's main job end to end on one machine, the way an
// operator would run it on two hosts: it creates certificates, starts a
// paused QEMU VM with random RAM and a random disk on host-a and an empty one
// waiting on host-b, starts two "migtun serve" processes on loopback (one
// tunnel port between them; host-b registers its VM with --qmp), runs
// "migtun migrate" on host-a, whose progress shows as it goes, and checks
// that both VMs end up byte-identical. "make demo" runs it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/migtun/migtun/internal/sidecar"
	"github.com/migtun/migtun/internal/vmtest"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1) // the one exit point
	}
}

func run() error {
	bin := flag.String("migtun", "bin/migtun", "the migtun binary")
	transport := flag.String("transport", "tls", "tls, quic or plain")
	multifd := flag.Int("multifd", 4, "multifd channels (0: one main channel)")
	ramMiB := flag.Int64("ram", 512, "guest RAM in MiB")
	diskMiB := flag.Int64("disk", 256, "guest disk in MiB")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	dir, err := os.MkdirTemp("", "migtun-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	step("1. Certificates: one CA, a certificate per host")
	pki := filepath.Join(dir, "pki")
	for _, args := range [][]string{
		{"certs", "init", "--dir", pki},
		{"certs", "issue", "--dir", pki, "--name", "host-a", "--san", "127.0.0.1"},
		{"certs", "issue", "--dir", pki, "--name", "host-b", "--san", "127.0.0.1"},
	} {
		if err := show(*bin, args...); err != nil {
			return err
		}
	}

	step(fmt.Sprintf("2. QEMU: a paused VM with %d MiB of random RAM and a %d MiB random disk on host-a, an empty one waiting on host-b", *ramMiB, *diskMiB))
	src, err := vmtest.Start(ctx, vmtest.Options{Dir: dir, Name: "vm-a", RAM: *ramMiB << 20, Disk: *diskMiB << 20, Random: true})
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := vmtest.Start(ctx, vmtest.Options{Dir: dir, Name: "vm-b", RAM: *ramMiB << 20, Disk: *diskMiB << 20, Incoming: true})
	if err != nil {
		return err
	}
	defer dst.Close()
	accel := "TCG"
	if vmtest.KVMAvailable() {
		accel = "KVM"
	}
	fmt.Printf("  both QEMUs are up (%s); host-a's monitor is %s, host-b's %s\n", accel, src.QMPPath, dst.QMPPath)
	// migtun drives both QEMUs from here on: let go of their monitors.
	src.QMP.Close()
	dst.QMP.Close()

	step("3. Two migtun sidecars on loopback, one tunnel port between them")
	var plain []string
	if *transport == "plain" {
		plain = []string{"--insecure-plaintext"}
	}
	hostFlags := func(name string) []string {
		return append([]string{"--listen", "127.0.0.1:0", "--transport", *transport,
			"--cert", filepath.Join(pki, name+".crt"), "--key", filepath.Join(pki, name+".key"),
			"--ca", filepath.Join(pki, "ca.crt"),
			"--control", "unix:" + filepath.Join(dir, name+".ctl"), "--socket-dir", filepath.Join(dir, name+"-sockets")}, plain...)
	}
	bArgs := append(append([]string{"serve"}, hostFlags("host-b")...), "--qmp", "vm1=unix:"+dst.QMPPath)
	fmt.Printf("  host-b$ migtun %s\n", strings.Join(bArgs, " "))
	hostB, err := sidecar.Start(*bin, nil, filepath.Join(dir, "host-b.log"), bArgs...)
	if err != nil {
		return err
	}
	defer hostB.Stop(10 * time.Second)
	fmt.Printf("  host-b is ready: its one port is %s; peers may migrate into its VM \"vm1\"\n", hostB.Addr)
	aArgs := append([]string{"serve"}, hostFlags("host-a")...)
	fmt.Printf("  host-a$ migtun %s\n", strings.Join(aArgs, " "))
	hostA, err := sidecar.Start(*bin, nil, filepath.Join(dir, "host-a.log"), aArgs...)
	if err != nil {
		return err
	}
	defer hostA.Stop(10 * time.Second)
	fmt.Println("  host-a is ready")

	step(fmt.Sprintf("4. Live migration with migtun migrate (%s, multifd %d): the disk over NBD, then RAM, one port", *transport, *multifd))
	mArgs := []string{"migrate", "--control", "unix:" + filepath.Join(dir, "host-a.ctl"), "--peer", hostB.Addr,
		"--qmp", "unix:" + src.QMPPath, "--dest-vm", "vm1", "--copy-storage", "all", "--multifd", fmt.Sprint(*multifd), "--paused"}
	fmt.Printf("  host-a$ migtun %s\n\n", strings.Join(mArgs, " "))
	start := time.Now()
	cmd := exec.CommandContext(ctx, *bin, mArgs...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("migtun migrate: %w\nhost-a log:\n%s\nhost-b log:\n%s", err, hostA.Log(10), hostB.Log(10))
	}
	total := time.Since(start)

	step("5. Result: is host-b's VM host-a's, byte for byte?")
	fmt.Printf("  migtun migrate took %v through one %s port; both VMs are left paused to compare them\n", total.Round(time.Millisecond), *transport)
	for _, f := range []struct{ what, a, b string }{{"RAM ", src.RAMPath, dst.RAMPath}, {"disk", src.DiskPath, dst.DiskPath}} {
		ha, err := vmtest.HashFile(f.a)
		if err != nil {
			return err
		}
		hb, err := vmtest.HashFile(f.b)
		if err != nil {
			return err
		}
		verdict := "equal"
		if ha != hb {
			verdict = "DIFFERENT"
		}
		fmt.Printf("  %s sha256 host-a %s…  host-b %s…  %s\n", f.what, ha[:16], hb[:16], verdict)
		if ha != hb {
			return errors.New("the destination's " + strings.TrimSpace(f.what) + " differs from the source's")
		}
	}
	fmt.Println("\nThe VM's RAM and disk crossed through migtun byte for byte.")
	return nil
}

func step(s string) { fmt.Printf("\n== %s\n", s) }

// show prints and runs a migtun command.
func show(bin string, args ...string) error {
	fmt.Printf("  $ migtun %s\n", strings.Join(args, " "))
	out, err := exec.Command(bin, args...).CombinedOutput()
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		fmt.Printf("    %s\n", l)
	}
	return err
}
