package main

import (
	"bufio"
	"context"
	"encoding/json"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/migtun/migtun/internal/vmtest"
	"github.com/migtun/migtun/migrate"
	"github.com/migtun/migtun/qmp"
)

// TestPostcopyRecovery cuts the network between the two hosts (network
// namespaces joined by veth, every packet dropped) while a migration with
// storage copy runs in postcopy, for each transport. Both QEMUs must pause
// (postcopy-paused) instead of failing; once the link is back, migtun
// migrate must recover through the same session (migrate-recover on the
// destination, migrate resume on the source) and complete, with RAM and
// disk identical on both hosts and no session or socket left. A link that
// stays cut past --recover-timeout, and a --timeout that ends the command
// in postcopy, must fail it with neither QEMU resumed or cancelled: the
// guest's state is split between the hosts.
//
// It runs on each QEMU generation, the cases of one generation in
// parallel (they mostly wait). Over TLS the postcopy-preempt channel is on
// (the default of --postcopy where QEMU offers it): it must cross the
// tunnel as its own stream of the session's main channel, and be opened
// again, after the main stream, by every recovery. Over QUIC
// --postcopy-preempt=false turns it off: one main stream per connection.
func TestPostcopyRecovery(t *testing.T) {
	requireRootFor(t, "ip netns and tc")
	vmtest.Each(t, func(t *testing.T, q vmtest.QEMU) {
		for _, transport := range []string{"tls", "quic"} {
			t.Run(transport, func(t *testing.T) {
				t.Parallel()
				testPostcopyRecovery(t, q, transport, healed)
			})
		}
		t.Run("tls/never-healed", func(t *testing.T) {
			t.Parallel()
			testPostcopyRecovery(t, q, "tls", neverHealed)
		})
		t.Run("tls/timeout-in-postcopy", func(t *testing.T) {
			t.Parallel()
			testPostcopyRecovery(t, q, "tls", timeoutInPostcopy)
		})
	})
}

// How TestPostcopyRecovery's link fares.
const (
	healed            = "healed"       // cut in postcopy, healed once the source paused
	neverHealed       = "never-healed" // cut in postcopy for good
	timeoutInPostcopy = "timeout"      // never cut; migtun migrate's --timeout ends it in postcopy
)

func testPostcopyRecovery(t *testing.T, q vmtest.QEMU, transport, link string) {
	heal := link == healed
	ns := newNetnsPair(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	h := newNetnsMigrateHosts(ctx, t, ns, q, 7400, 128<<20, 16<<20, "--transport", transport, "--idle-timeout", "3s")
	srcVM, dstVM, src, dst := h.srcVM, h.dstVM, h.src, h.dst

	// Postcopy at once, its page push held to 8 MiB/s: the 128 MiB of
	// RAM take about 16 s to arrive, time enough to cut the link in the
	// middle. To end the command in postcopy with --timeout 30s, the push
	// is held to 2 MiB/s (about 64 s), so that however slow the mirror and
	// the switch are to start, the timeout comes after the switch.
	bandwidth, timeout := "8388608", "4m"
	if link == timeoutInPostcopy {
		bandwidth, timeout = "2097152", "30s"
	}
	preempt := transport != "quic"
	cmd := exec.CommandContext(ctx, migtunBin, h.migrateArgs("--copy-storage", "all", "--paused",
		"--postcopy", "--postcopy-start", "immediately", "--postcopy-bandwidth", bandwidth, "--json",
		"--postcopy-preempt="+strconv.FormatBool(preempt),
		"--recover-timeout", map[bool]string{true: "60s", false: "5s"}[heal], "--timeout", timeout)...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var (
		lines              []string
		res                *migrate.Result
		cutAt, pausedAt    time.Time
		healedAt, activeAt time.Time
		inPostcopyAt       time.Time // when postcopy-active was first reported
	)
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		line := sc.Text()
		lines = append(lines, line)
		var kind struct {
			Event string `json:"event"`
		}
		if json.Unmarshal([]byte(line), &kind) != nil {
			continue
		}
		if kind.Event == "result" {
			res = new(migrate.Result)
			if err := json.Unmarshal([]byte(line), res); err != nil {
				t.Fatalf("result line %q: %v", line, err)
			}
			continue
		}
		var ev migrate.Progress
		if json.Unmarshal([]byte(line), &ev) != nil {
			continue
		}
		status := ""
		if ev.Migration != nil {
			status = ev.Migration.Status
		}
		if status == qmp.MigrationPostcopyActive && inPostcopyAt.IsZero() {
			inPostcopyAt = time.Now()
		}
		switch {
		case link != timeoutInPostcopy && cutAt.IsZero() && status == qmp.MigrationPostcopyActive && ev.Migration.RAM != nil && ev.Migration.RAM.Transferred > 32<<20:
			t.Logf("cutting the link in postcopy after %s of RAM, with %s", migSize(ev.Migration.RAM.Transferred), ns.cut(t))
			cutAt = time.Now()
		case !cutAt.IsZero() && pausedAt.IsZero() && status == qmp.MigrationPostcopyPaused:
			pausedAt = time.Now()
			t.Logf("the source QEMU paused %v after the cut", pausedAt.Sub(cutAt).Round(time.Millisecond))
			if heal {
				ns.heal(t)
				healedAt = time.Now()
			}
		case !healedAt.IsZero() && activeAt.IsZero() && status == qmp.MigrationPostcopyActive:
			activeAt = time.Now()
			t.Logf("postcopy active again %v after the link was healed", activeAt.Sub(healedAt).Round(time.Millisecond))
		case ev.Recovering != "":
			t.Logf("recovering: %s", ev.Recovering)
		}
	}
	err = cmd.Wait()
	if !cutAt.IsZero() && healedAt.IsZero() {
		ns.heal(t)
	}
	out := strings.Join(lines, "\n")
	if link == timeoutInPostcopy {
		if inPostcopyAt.IsZero() {
			t.Fatalf("--timeout ended migtun migrate before postcopy began, so this case tests nothing:\n%s\n%s", migTail(out, 12), stderr.String())
		}
		t.Logf("--timeout ended migtun migrate %v after postcopy began", time.Since(inPostcopyAt).Round(time.Millisecond))
		// Ending the command aborts the session, which cuts the streams.
		pausedAt = time.Now()
	}
	if !heal {
		checkSplitLeftAlone(ctx, t, err, out+"\n"+stderr.String(), pausedAt, srcVM, dstVM)
		checkHostsClean(t, []string{h.srcCtl}, h.srcSocks)
		return
	}
	if err != nil {
		t.Fatalf("migtun migrate: %v\n%s\n%s\nsource migtun:\n%s\ndestination migtun:\n%s", err, migTail(out, 12), stderr.String(), src.Log(10), dst.Log(10))
	}
	if cutAt.IsZero() {
		t.Fatalf("the migration never reached postcopy with 32 MiB sent, so the link was never cut:\n%s", migTail(out, 12))
	}
	if pausedAt.IsZero() {
		t.Fatalf("the source QEMU was never seen postcopy-paused after the cut:\n%s", migTail(out, 20))
	}
	if res == nil {
		t.Fatalf("no result line:\n%s", migTail(out, 5))
	}
	if !res.Postcopy || res.Recoveries < 1 {
		t.Errorf("result: postcopy %v, recoveries %d; want postcopy and at least one recovery", res.Postcopy, res.Recoveries)
	}
	t.Logf("migration done in %v, %d recovery, channels %+v, mismatches %q", res.Total.Round(time.Millisecond), res.Recoveries, res.Channels, res.Mismatch)
	checkPausedAndEqual(ctx, t, srcVM, dstVM)
	checkPreempt(ctx, t, srcVM, dstVM, res, preempt)
	h.checkClean(t)
}

// checkSplitLeftAlone checks a postcopy migration that could not be
// recovered: migtun migrate failed saying the state is split, and both
// QEMUs are still postcopy-paused, the source guest not resumed.
func checkSplitLeftAlone(ctx context.Context, t *testing.T, err error, out string, pausedAt time.Time, srcVM, dstVM *vmtest.VM) {
	t.Helper()
	if err == nil {
		t.Fatalf("migtun migrate succeeded with the link cut for good:\n%s", migTail(out, 8))
	}
	if pausedAt.IsZero() {
		t.Fatalf("the source QEMU was never seen postcopy-paused after the cut:\n%s", migTail(out, 20))
	}
	if !strings.Contains(out, "failed in postcopy") || !strings.Contains(out, "split between the hosts") {
		t.Errorf("the error does not say the state is split:\n%s", migTail(out, 4))
	}
	t.Logf("migtun migrate failed as it should: %s", migTail(out, 1))
	reconnect(t, srcVM)
	reconnect(t, dstVM)
	// The destination notices the cut on its own, by keepalive: up to
	// 30 s is given for that.
	for _, vm := range []*vmtest.VM{srcVM, dstVM} {
		deadline := time.Now().Add(30 * time.Second)
		for {
			info, err := vm.QMP.QueryMigrate(ctx)
			if err == nil && info.Status == qmp.MigrationPostcopyPaused {
				break
			}
			if err != nil || info.Status != qmp.MigrationPostcopyActive || time.Now().After(deadline) {
				t.Errorf("%s: migration %+v (%v), want it left postcopy-paused", vm.Options.Name, info, err)
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	if st, err := srcVM.QMP.Status(ctx); err != nil || st == "running" {
		t.Errorf("source: status %q (%v): a source resumed after postcopy began loses the guest's state", st, err)
	}
}

// checkPreempt checks a recovered postcopy migration's main channel, from
// the finish report of both hosts: with preempt, both QEMUs have the
// capability on, and the main channel carried two streams (main, then
// preempt) per connection, the first and one per recovery; without, one.
// Both hosts must agree on the streams, and bytes must have crossed each
// way.
func checkPreempt(ctx context.Context, t *testing.T, srcVM, dstVM *vmtest.VM, res *migrate.Result, preempt bool) {
	t.Helper()
	for _, vm := range []*vmtest.VM{srcVM, dstVM} {
		caps, err := vm.QMP.QueryMigrateCapabilities(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if caps["postcopy-ram"] != true || caps["postcopy-preempt"] != preempt {
			t.Errorf("%s QEMU %s: postcopy-ram %v, postcopy-preempt %v; want true, %v",
				vm.Options.Name, vm.QMP.Version(), caps["postcopy-ram"], caps["postcopy-preempt"], preempt)
		}
	}
	// Bytes in flight when the link was cut were counted by the sender
	// only, so the byte counts may differ; the streams may not.
	for _, m := range res.Mismatch {
		if strings.Contains(m, "streams") {
			t.Errorf("the hosts disagree on the session's streams: %q", m)
		}
	}
	if len(res.Mismatch) != 0 {
		t.Logf("byte counts cut short by the break: %q", res.Mismatch)
	}
	perConnection := int64(1)
	if preempt {
		perConnection = 2
	}
	for _, c := range res.Channels {
		if c.Name != "main" {
			continue
		}
		t.Logf("main channel: %d streams, %d bytes forward, %d back; preempt %v, %d recoveries",
			c.Streams, c.BytesForward, c.BytesReturn, preempt, res.Recoveries)
		if want := perConnection * int64(1+res.Recoveries); c.Streams != want {
			t.Errorf("main channel: %d streams, want %d (%d per connection, %d recoveries)", c.Streams, want, perConnection, res.Recoveries)
		}
		if c.BytesForward == 0 || c.BytesReturn == 0 {
			t.Errorf("main channel: %d bytes forward, %d back; want both", c.BytesForward, c.BytesReturn)
		}
		return
	}
	t.Errorf("no main channel in the finish report: %+v", res.Channels)
}
