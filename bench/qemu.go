package bench

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/migtun/migtun/internal/vmtest"
	"github.com/migtun/migtun/qmp"
)

// DefaultQEMURAM is the guest RAM of a QEMU run when Config.Size is 0.
const DefaultQEMURAM = 512 << 20

// QEMUCPUNote says how the CPU columns of a QEMU run are measured.
const QEMUCPUNote = "QEMU run: a paused guest with random RAM migrated through each path (migtun/T/N: multifd with N channels " +
	"when N > 1; baselines over one channel); MB/s is the RAM QEMU sent over the time from migrate to completion on the " +
	"destination. CPU s/GB: both QEMU processes and the path's two hops (utime+stime from /proc/PID/stat, children " +
	"included); relay CPU: the two hops only. MB = 10^6 bytes, GB = 10^9 bytes."

// qemuTargets is the target for real migrations on loopback: through tls,
// the migration phase is no slower than through socat's plaintext hops.
var qemuTargets = []targetSpec{{"qemu tls/1 vs socat", "migtun/tls/1", Socat, 1, false}}

// NewQEMUReport computes the ratios and targets of a RunQEMU run with
// ram bytes of guest RAM.
func NewQEMUReport(ram int64, results []Result) Report {
	r := newReport(ram, results, qemuTargets)
	r.Mode, r.CPUNote = ModeQEMU, QEMUCPUNote
	return r
}

// qemuMaxBandwidth lifts QEMU's 128 MiB/s default bandwidth limit.
const qemuMaxBandwidth = 100 << 30

// RunQEMU migrates a real QEMU guest through every path cfg asks for, one
// after the other: for each path a fresh destination QEMU listens on the
// sink's socket (migrate-incoming), the path's processes start, and a fresh
// paused source QEMU with cfg.Size of random RAM (default DefaultQEMURAM)
// migrates into the path's entry. A migtun path with N streams migrates
// with multifd and N channels when N > 1. Each Result counts the RAM
// QEMU sent, the time from migrate until the destination completed, and
// the CPU of both QEMUs and the path's processes; the guest RAM must be
// identical on both sides afterwards, or the path fails. Errors are as for
// Run.
func RunQEMU(ctx context.Context, cfg Config) ([]Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Size == 0 {
		cfg.Size = DefaultQEMURAM
	}
	if cfg.Size%(1<<20) != 0 {
		return nil, &ConfigError{"size", fmt.Sprintf("%d: guest RAM must be a multiple of 1MiB", cfg.Size)}
	}
	if cfg.Stall == 0 {
		cfg.Stall = DefaultStall
	}
	if _, err := vmtest.QEMUBinary(); err != nil {
		return nil, fmt.Errorf("%w (apt-get install qemu-system-x86)", err)
	}
	return runPaths(ctx, &cfg, "in.sock", measureQEMU)
}

// measureQEMU runs one migration through p.
func measureQEMU(ctx context.Context, cfg *Config, p path, e *env, index, total int) (res Result) {
	res = Result{Path: p.name, Baseline: p.baseline, Transport: p.transport, Streams: p.streams}
	if p.skip != "" {
		res.Skipped = p.skip
		return res
	}
	fail := func(format string, args ...any) Result {
		res.Err = fmt.Sprintf(format, args...)
		return res
	}
	sctx, cancel := context.WithTimeout(ctx, 2*time.Minute) // bounds the VMs' start
	defer cancel()
	dst, err := vmtest.Start(sctx, vmtest.Options{Dir: e.dir, Name: "dst", RAM: cfg.Size, Disk: 1 << 20, Incoming: true})
	if err != nil {
		return fail("starting the destination QEMU: %v", err)
	}
	defer dst.Close()
	src, err := vmtest.Start(sctx, vmtest.Options{Dir: e.dir, Name: "src", RAM: cfg.Size, Disk: 1 << 20, Random: true})
	if err != nil {
		return fail("starting the source QEMU: %v", err)
	}
	defer src.Close()
	caps := map[string]bool{"multifd": p.streams > 1}
	params := map[string]any{"max-bandwidth": qemuMaxBandwidth}
	if p.streams > 1 {
		params["multifd-channels"] = p.streams
	}
	for _, vm := range []*vmtest.VM{dst, src} {
		if err := vm.QMP.MigrateSetCapabilities(ctx, caps); err != nil {
			return fail("%s QEMU: %v", vm.Options.Name, err)
		}
		if err := vm.QMP.MigrateSetParameters(ctx, params); err != nil {
			return fail("%s QEMU: %v", vm.Options.Name, err)
		}
	}
	if err := dst.QMP.MigrateIncoming(ctx, "unix:"+e.sink); err != nil {
		return fail("destination QEMU: %v", err)
	}
	entry, procs, err := p.setup(e)
	defer func() {
		for _, pr := range procs {
			pr.stop(5 * time.Second)
		}
	}()
	if err != nil {
		return fail("%v", err)
	}
	cpu := func() (all, relay time.Duration) {
		for _, pr := range procs {
			relay += pr.cpu()
		}
		return relay + treeCPU(src.PID(), 0) + treeCPU(dst.PID(), 0), relay
	}
	all0, relay0 := cpu()
	start := time.Now()
	if err := src.QMP.Migrate(ctx, "unix:"+entry); err != nil {
		return fail("source QEMU: %v", err)
	}
	info, err := followMigration(ctx, cfg, src.QMP, func(sent int64) {
		if cfg.Progress != nil {
			cfg.Progress(Progress{Path: p.name, Index: index, Total: total, Bytes: sent, Size: cfg.Size, Elapsed: time.Since(start)})
		}
	})
	if err != nil {
		cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Second)
		src.QMP.MigrateCancel(cctx)
		ccancel()
		return fail("%v%s", err, procTails(procs))
	}
	if _, err := dst.QMP.WaitMigration(ctx, 10*time.Millisecond, nil); err != nil {
		return fail("destination QEMU: %v", err)
	}
	wall := time.Since(start)
	all1, relay1 := cpu()
	res.Sent = info.RAM.Transferred
	res.Bytes = res.Sent
	res.Seconds = wall.Seconds()
	res.MBps = float64(res.Bytes) / 1e6 / res.Seconds
	res.CPUSeconds, res.RelayCPUSeconds = (all1 - all0).Seconds(), (relay1 - relay0).Seconds()
	gb := float64(res.Bytes) / 1e9
	res.CPUPerGB, res.RelayCPUPerGB = res.CPUSeconds/gb, res.RelayCPUSeconds/gb
	if cfg.Progress != nil {
		cfg.Progress(Progress{Path: p.name, Index: index, Total: total, Bytes: res.Bytes, Size: cfg.Size, Elapsed: wall, Done: true})
	}
	if err := vmtest.CompareRAM(src, dst); err != nil {
		return fail("after the migration: %v", err)
	}
	return res
}

// followMigration polls the source until its migration completes, calling
// progress with the RAM sent so far; a failed migration, or one that sends
// nothing for cfg.Stall, is an error.
func followMigration(ctx context.Context, cfg *Config, q *qmp.Client, progress func(int64)) (*qmp.MigrationInfo, error) {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	var last int64
	lastMove, lastReport := time.Now(), time.Time{}
	for {
		info, err := q.QueryMigrate(ctx)
		if err != nil {
			return nil, fmt.Errorf("source QEMU: %w", err)
		}
		var sent int64
		if info.RAM != nil {
			sent = info.RAM.Transferred
		}
		switch info.Status {
		case qmp.MigrationCompleted:
			if info.RAM == nil {
				return nil, errors.New("source QEMU: completed without RAM statistics")
			}
			return info, nil
		case qmp.MigrationFailed, qmp.MigrationCancelled:
			return nil, fmt.Errorf("source QEMU: migration %s: %s", info.Status, info.ErrorDesc)
		}
		now := time.Now()
		if sent != last {
			last, lastMove = sent, now
		} else if now.Sub(lastMove) > cfg.Stall {
			return nil, fmt.Errorf("stalled: QEMU sent %d bytes, none for %s", sent, cfg.Stall)
		}
		if now.Sub(lastReport) >= 250*time.Millisecond {
			progress(sent)
			lastReport = now
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}
