// Command demo shows migtun's main job end to end on one machine, the way an
// operator would run it on two hosts: it creates certificates, starts two
// "migtun serve" processes on loopback (host-a the source, host-b the
// destination, one tunnel port between them), starts a paused QEMU VM with
// random RAM and a random disk on host-a and an empty one on host-b, and
// live-migrates RAM and disk through migtun, printing progress and checking
// that both sides end up byte-identical. "make demo" runs it.
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
	"github.com/migtun/migtun/qmp"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1) //nolint:forbidigo // the one exit point
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

	step("2. Two migtun sidecars on loopback, one tunnel port between them")
	var plain []string
	if *transport == "plain" {
		plain = []string{"--insecure-plaintext"}
	}
	hostFlags := func(name string) []string {
		return append([]string{"--transport", *transport,
			"--cert", filepath.Join(pki, name+".crt"), "--key", filepath.Join(pki, name+".key"),
			"--ca", filepath.Join(pki, "ca.crt")}, plain...)
	}
	inSock, nbdSock := filepath.Join(dir, "b-incoming.sock"), filepath.Join(dir, "b-nbd.sock")
	bArgs := append([]string{"serve", "--listen", "127.0.0.1:0"}, hostFlags("host-b")...)
	bArgs = append(bArgs, "--route", "main=unix:"+inSock, "--route", "nbd=unix:"+nbdSock)
	fmt.Printf("  host-b$ migtun %s\n", strings.Join(bArgs, " "))
	hostB, err := sidecar.Start(*bin, nil, filepath.Join(dir, "host-b.log"), bArgs...)
	if err != nil {
		return err
	}
	defer hostB.Stop(10 * time.Second)
	fmt.Printf("  host-b is ready; its one port is %s\n", hostB.Addr)

	fwdMain, fwdNBD := filepath.Join(dir, "a-main.sock"), filepath.Join(dir, "a-nbd.sock")
	aArgs := append([]string{"serve", "--listen", "127.0.0.1:0"}, hostFlags("host-a")...)
	aArgs = append(aArgs, "--forward", "unix:"+fwdMain+"="+hostB.Addr+"/main", "--forward", "unix:"+fwdNBD+"="+hostB.Addr+"/nbd")
	fmt.Printf("  host-a$ migtun %s\n", strings.Join(aArgs, " "))
	hostA, err := sidecar.Start(*bin, nil, filepath.Join(dir, "host-a.log"), aArgs...)
	if err != nil {
		return err
	}
	defer hostA.Stop(10 * time.Second)
	fmt.Println("  host-a is ready: QEMU will connect to its forward sockets instead of to host-b")

	step(fmt.Sprintf("3. QEMU: a paused VM with %d MiB of random RAM and a %d MiB random disk on host-a, an empty one waiting on host-b", *ramMiB, *diskMiB))
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
	fmt.Printf("  both QEMUs are up (%s)\n", accel)

	step(fmt.Sprintf("4. Live migration through migtun (%s, multifd %d): the disk over NBD, then RAM", *transport, *multifd))
	fmt.Printf("  host-b QEMU: nbd-server-start unix:%s; nbd-server-add disk0; migrate-incoming unix:%s\n", nbdSock, inSock)
	fmt.Printf("  host-a QEMU: blockdev-mirror disk0 -> nbd unix:%s; migrate unix:%s\n", fwdNBD, fwdMain)
	start := time.Now()
	res, err := vmtest.Migrate(ctx, src, dst, vmtest.MigrateOptions{
		MainURI: "unix:" + fwdMain, IncomingURI: "unix:" + inSock,
		NBDServerPath: nbdSock, NBDClientPath: fwdNBD, Multifd: *multifd,
		Progress: progress(),
	})
	if err != nil {
		return fmt.Errorf("%w\nhost-a log:\n%s\nhost-b log:\n%s", err, hostA.Log(10), hostB.Log(10))
	}
	total := time.Since(start)

	step("5. Result")
	fmt.Printf("  disk: %d MiB mirrored in %v (%.0f MB/s)\n", res.DiskBytes>>20, res.Mirror.Round(time.Millisecond), mbps(res.DiskBytes, res.Mirror))
	fmt.Printf("  RAM:  %d MiB migrated in %v (%.0f MB/s), downtime %d ms\n", res.RAMBytes>>20, res.Migration.Round(time.Millisecond),
		mbps(res.RAMBytes, res.Migration), res.Info.Downtime)
	fmt.Printf("  total %v through one %s port\n", total.Round(time.Millisecond), *transport)
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

// progress prints a line at most every 200 ms per stage, and the last
// state of the disk mirror when it is in sync.
func progress() func(string, *qmp.MigrationInfo, *qmp.BlockJob) {
	var last time.Time
	var lastStage string
	return func(stage string, info *qmp.MigrationInfo, job *qmp.BlockJob) {
		now := time.Now()
		if stage == lastStage && now.Sub(last) < 200*time.Millisecond && (job == nil || !job.Ready) {
			return
		}
		switch {
		case job != nil:
			state := "copying"
			if job.Ready {
				state = "in sync"
			}
			fmt.Printf("  disk mirror: %4d / %d MiB  %s\n", job.Offset>>20, job.Len>>20, state)
		case stage == vmtest.StageMigrate && info != nil && info.RAM != nil:
			fmt.Printf("  RAM: %-9s %4d MiB sent, %4d MiB remaining\n", info.Status, info.RAM.Transferred>>20, info.RAM.Remaining>>20)
		case stage == vmtest.StageFinish:
			fmt.Printf("  migration completed; completing the disk mirror and stopping the NBD export\n")
		default:
			return
		}
		last, lastStage = now, stage
	}
}

func mbps(bytes int64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(bytes) / 1e6 / d.Seconds()
}
