package bench

import (
	"context"
	"fmt"
	"time"

	"github.com/migtun/migtun/internal/vmtest"
	"github.com/migtun/migtun/migrate"
	"github.com/migtun/migtun/qmp"
)

// DefaultQEMURAM is the guest RAM of a QEMU run when Config.Size is 0.
const DefaultQEMURAM = 512 << 20

// QEMUCPUNote says how the CPU columns of a QEMU run are measured.
const QEMUCPUNote = "QEMU run: a paused guest with random RAM migrated through each path (migtun/T/N: multifd with N channels " +
	"when N > 1; baselines over one channel; a disk, when copied, mirrored over NBD on a channel of its own); MB/s is the RAM QEMU sent and the disk " +
	"mirrored over the time from the first QMP command until the migration and the mirror were complete. CPU s/GB: both QEMU processes and the path's two hops (utime+stime from /proc/PID/stat, children " +
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
// after the other: for each path a fresh destination QEMU and a fresh
// paused source QEMU with cfg.Size of random RAM (default DefaultQEMURAM)
// start, then the path's processes; the destination listens on the sink's
// socket (migrate-incoming) and the source migrates into the path's entry.
// With cfg.Disk, the source first mirrors a random disk of that size into
// the destination's NBD export over a second channel of the path, as
// "--copy-storage all" does. A migtun path with N streams migrates with
// multifd and N channels when N > 1. Each Result counts the RAM QEMU sent
// and the disk mirrored, the time from the first QMP command to the
// destination until the migration and mirror were complete, and the CPU of
// both QEMUs and the path's processes; the guest RAM (and disk) must be
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
	channels := []string{benchChannel}
	if cfg.Disk > 0 {
		channels = append(channels, nbdChannel)
	}
	return runPaths(ctx, &cfg, channels, measureQEMU)
}

// nbdChannel carries the disk copy of a QEMU run.
const nbdChannel = "nbd"

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
	disk := cfg.Disk
	if disk == 0 {
		disk = 1 << 20 // a disk is part of every VM; without Disk it is not copied
	}
	sctx, cancel := context.WithTimeout(ctx, 2*time.Minute) // bounds the VMs' start
	defer cancel()
	dst, err := vmtest.Start(sctx, vmtest.Options{Dir: e.dir, Name: "dst", RAM: cfg.Size, Disk: disk, Incoming: true})
	if err != nil {
		return fail("starting the destination QEMU: %v", err)
	}
	defer dst.Close()
	src, err := vmtest.Start(sctx, vmtest.Options{Dir: e.dir, Name: "src", RAM: cfg.Size, Disk: disk, Random: true,
		Compressible: cfg.Guest == GuestCompressible})
	if err != nil {
		return fail("starting the source QEMU: %v", err)
	}
	defer src.Close()
	entries, procs, err := p.setup(e)
	defer func() {
		for _, pr := range procs {
			pr.stop(5 * time.Second)
		}
	}()
	if err != nil {
		return fail("%v", err)
	}
	o := vmtest.MigrateOptions{MainURI: "unix:" + entries[0], IncomingURI: "unix:" + e.sink(), MaxBandwidth: qemuMaxBandwidth}
	if p.streams > 1 {
		o.Multifd, o.MultifdCompression = p.streams, cfg.MultifdCompression
	}
	if cfg.Disk > 0 {
		// The mirror keeps as much in flight as "migtun migrate" has it.
		o.NBDServerPath, o.NBDClientPath, o.MirrorBuffer = e.channels[1].sink, entries[1], migrate.DefaultMirrorBuffer
	}
	cpu := func() (all, relay time.Duration) {
		for _, pr := range procs {
			relay += pr.cpu()
		}
		return relay + treeCPU(src.PID(), 0) + treeCPU(dst.PID(), 0), relay
	}
	mctx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	w := watch{cfg: cfg, stop: stop, last: time.Now()}
	start := time.Now()
	w.progress = func(moved int64) {
		if cfg.Progress != nil {
			cfg.Progress(Progress{Path: p.name, Index: index, Total: total, Bytes: moved, Size: cfg.Size + cfg.Disk, Elapsed: time.Since(start)})
		}
	}
	o.Progress = w.observe
	all0, relay0 := cpu()
	mr, err := vmtest.Migrate(mctx, src, dst, o)
	if err != nil {
		if c := context.Cause(mctx); c != nil && ctx.Err() == nil {
			err = c
		}
		return fail("%v%s", err, procTails(procs))
	}
	wall := time.Since(start)
	all1, relay1 := cpu()
	res.Sent = mr.RAMBytes + mr.DiskBytes
	res.Bytes, res.DiskBytes = res.Sent, mr.DiskBytes
	res.MirrorSeconds, res.MigrationSeconds = mr.Mirror.Seconds(), mr.Migration.Seconds()
	res.Seconds = wall.Seconds()
	res.MBps = float64(res.Bytes) / 1e6 / res.Seconds
	res.CPUSeconds, res.RelayCPUSeconds = (all1 - all0).Seconds(), (relay1 - relay0).Seconds()
	gb := float64(res.Bytes) / 1e9
	res.CPUPerGB, res.RelayCPUPerGB = res.CPUSeconds/gb, res.RelayCPUSeconds/gb
	if cfg.Progress != nil {
		cfg.Progress(Progress{Path: p.name, Index: index, Total: total, Bytes: res.Bytes, Size: cfg.Size + cfg.Disk, Elapsed: wall, Done: true})
	}
	compare := vmtest.CompareRAM
	if cfg.Disk > 0 {
		compare = vmtest.CompareImages
	}
	if err := compare(src, dst); err != nil {
		return fail("after the migration: %v", err)
	}
	return res
}

// watch follows a migration's progress: it reports the bytes moved
// (mirrored disk, then RAM sent) about every 250ms, and stops the
// migration when a stage moves nothing for cfg.Stall.
type watch struct {
	cfg      *Config
	stop     context.CancelCauseFunc
	progress func(moved int64)

	stage        string
	disk, ram    int64
	last, report time.Time
}

// observe is a vmtest.MigrateOptions.Progress.
func (w *watch) observe(stage string, info *qmp.MigrationInfo, job *qmp.BlockJob) {
	now := time.Now()
	moved := w.disk + w.ram
	switch {
	case job != nil:
		w.disk = job.Offset
	case info != nil && info.RAM != nil && stage == vmtest.StageMigrate:
		w.ram = info.RAM.Transferred
	}
	if stage != w.stage || w.disk+w.ram != moved {
		w.stage, w.last = stage, now
	} else if now.Sub(w.last) > w.cfg.Stall {
		w.stop(fmt.Errorf("stalled while %s: QEMU moved %d bytes, none for %s", stage, moved, w.cfg.Stall))
	}
	if now.Sub(w.report) >= 250*time.Millisecond {
		w.progress(w.disk + w.ram)
		w.report = now
	}
}
