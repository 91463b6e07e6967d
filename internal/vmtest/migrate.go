package vmtest

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/migtun/migtun/qmp"
)

// DefaultMaxBandwidth replaces QEMU's 128 MiB/s default migration bandwidth
// limit, which would otherwise dominate every measurement.
const DefaultMaxBandwidth = 10 << 30

// Names used on the QMP side of a migration.
const (
	// DiskNode is the node name of every VM's disk.
	DiskNode = "disk0"
	// MirrorJob is the job id of the source's disk mirror.
	MirrorJob = "mirror0"
	// NBDTargetNode is the source's NBD client node.
	NBDTargetNode = "nbd-target"
)

// Progress stages reported to [MigrateOptions.Progress].
const (
	StageMirror   = "mirror"   // the disk mirror is copying; job is set
	StageMigrate  = "migrate"  // the source is migrating; info is set
	StageIncoming = "incoming" // the destination is receiving; info is set
	StageFinish   = "finish"   // ending the mirror and the NBD server
)

// pollInterval is how often Migrate polls QEMU for progress.
const pollInterval = 50 * time.Millisecond

// MigrateOptions describe where a migration's streams go.
type MigrateOptions struct {
	// MainURI is the URI the source migrates to, e.g. "unix:/path/main.sock"
	// (a migtun forward, or IncomingURI directly).
	MainURI string
	// IncomingURI is the URI the destination listens on.
	IncomingURI string
	// NBDServerPath is the destination's NBD server UNIX socket. When
	// empty, no disk is copied: only RAM and device state migrate.
	NBDServerPath string
	// NBDClientPath is where the source's NBD client connects (a migtun
	// forward, or NBDServerPath directly).
	NBDClientPath string
	// Multifd is the number of multifd channels; 0 disables multifd.
	Multifd int
	// MultifdCompression, with Multifd, is both QEMUs' multifd-compression
	// (none, zlib, zstd); empty keeps QEMU's.
	MultifdCompression string
	// MirrorBuffer is the disk mirror's data in flight (QEMU's buf-size);
	// 0 keeps QEMU's default.
	MirrorBuffer int64
	// MaxBandwidth is the migration bandwidth limit in bytes/s; default
	// [DefaultMaxBandwidth].
	MaxBandwidth int64
	// BeforeNBDStop, if set, runs after the source has dropped its NBD
	// client and before the destination's NBD server stops, so a relay in
	// between can deliver the client's last request first.
	BeforeNBDStop func(context.Context) error
	// Progress, if set, is called with each stage's state: job for
	// StageMirror, info for StageMigrate and StageIncoming.
	Progress func(stage string, info *qmp.MigrationInfo, job *qmp.BlockJob)
}

// Result summarises a migration.
type Result struct {
	// RAMBytes is the RAM traffic the source reported (all channels).
	RAMBytes int64
	// DiskBytes is the amount the mirror copied.
	DiskBytes int64
	// Mirror is the time until the mirror was ready.
	Mirror time.Duration
	// Migration is the time from migrate until the destination completed.
	Migration time.Duration
	// Info is the source's final query-migrate reply.
	Info *qmp.MigrationInfo
}

// Migrate live-migrates src to dst, both paused VMs: the destination
// exports its disk over NBD and listens; the source mirrors its disk into
// the export until in sync, migrates, and then completes the mirror
// (without NBDServerPath, only the migration). Both
// VMs stay paused, so their images can be compared afterwards. On failure
// Migrate cancels what it started, best effort.
func Migrate(ctx context.Context, src, dst *VM, o MigrateOptions) (*Result, error) {
	if o.MaxBandwidth == 0 {
		o.MaxBandwidth = DefaultMaxBandwidth
	}
	if o.Progress == nil {
		o.Progress = func(string, *qmp.MigrationInfo, *qmp.BlockJob) {}
	}
	m := &migration{src: src.QMP, dst: dst.QMP, o: o}
	res, err := m.run(ctx)
	if err != nil {
		return nil, errors.Join(err, m.abort())
	}
	return res, nil
}

// migration is the state of one Migrate call.
type migration struct {
	src, dst *qmp.Client
	o        MigrateOptions

	// What has been started, for abort.
	nbdServer, nbdNode, mirror, migrating bool
}

func (m *migration) run(ctx context.Context) (*Result, error) {
	o := m.o
	caps := map[string]bool{"multifd": o.Multifd > 0}
	params := map[string]any{"max-bandwidth": o.MaxBandwidth}
	if o.Multifd > 0 {
		params["multifd-channels"] = o.Multifd
		if o.MultifdCompression != "" {
			params["multifd-compression"] = o.MultifdCompression
		}
	}

	// Destination: capabilities before migrate-incoming, then the export.
	if err := m.dst.MigrateSetCapabilities(ctx, caps); err != nil {
		return nil, fmt.Errorf("vmtest: destination: %w", err)
	}
	if err := m.dst.MigrateSetParameters(ctx, params); err != nil {
		return nil, fmt.Errorf("vmtest: destination: %w", err)
	}
	disk := o.NBDServerPath != ""
	if disk {
		if err := m.dst.NBDServerStartUnix(ctx, o.NBDServerPath); err != nil {
			return nil, fmt.Errorf("vmtest: destination: %w", err)
		}
		m.nbdServer = true
		if err := m.dst.NBDServerAdd(ctx, DiskNode, true); err != nil {
			return nil, fmt.Errorf("vmtest: destination: %w", err)
		}
	}
	if err := m.dst.MigrateIncoming(ctx, o.IncomingURI); err != nil {
		return nil, fmt.Errorf("vmtest: destination: %w", err)
	}
	res := &Result{}
	if disk {
		if err := m.mirrorDisk(ctx, res); err != nil {
			return nil, err
		}
	}
	if err := m.migrate(ctx, res, caps, params); err != nil {
		return nil, err
	}
	if disk {
		if err := m.finishMirror(ctx, res); err != nil {
			return nil, err
		}
	}
	return res, nil
}

// mirrorDisk mirrors the source's disk into the destination's export
// until the two are in sync.
func (m *migration) mirrorDisk(ctx context.Context, res *Result) error {
	o := m.o
	if err := m.src.BlockdevAdd(ctx, map[string]any{
		"driver": "nbd", "node-name": NBDTargetNode, "export": DiskNode,
		"server": map[string]any{"type": "unix", "path": o.NBDClientPath},
	}); err != nil {
		return fmt.Errorf("vmtest: source: %w", err)
	}
	m.nbdNode = true
	start := time.Now()
	if err := m.src.BlockdevMirror(ctx, MirrorJob, DiskNode, NBDTargetNode, "full", o.MirrorBuffer); err != nil {
		return fmt.Errorf("vmtest: source: %w", err)
	}
	m.mirror = true
	err := m.src.WaitBlockJobReady(ctx, MirrorJob, pollInterval, func(j qmp.BlockJob) {
		res.DiskBytes = j.Offset
		o.Progress(StageMirror, nil, &j)
	})
	if err != nil {
		return fmt.Errorf("vmtest: source: %w", err)
	}
	res.Mirror = time.Since(start)
	return nil
}

// migrate migrates the source's RAM and device state and waits until the
// destination has it.
func (m *migration) migrate(ctx context.Context, res *Result, caps map[string]bool, params map[string]any) error {
	o := m.o
	if err := m.src.MigrateSetCapabilities(ctx, caps); err != nil {
		return fmt.Errorf("vmtest: source: %w", err)
	}
	if err := m.src.MigrateSetParameters(ctx, params); err != nil {
		return fmt.Errorf("vmtest: source: %w", err)
	}
	start := time.Now()
	if err := m.src.Migrate(ctx, o.MainURI); err != nil {
		return fmt.Errorf("vmtest: source: %w", err)
	}
	m.migrating = true
	info, err := m.src.WaitMigration(ctx, pollInterval, func(i *qmp.MigrationInfo) { o.Progress(StageMigrate, i, nil) })
	if err != nil {
		return fmt.Errorf("vmtest: source: %w", err)
	}
	m.migrating = false
	res.Info = info
	if info.RAM != nil {
		res.RAMBytes = info.RAM.Transferred
	}
	if _, err := m.dst.WaitMigration(ctx, pollInterval, func(i *qmp.MigrationInfo) { o.Progress(StageIncoming, i, nil) }); err != nil {
		return fmt.Errorf("vmtest: destination: %w", err)
	}
	res.Migration = time.Since(start)
	return nil
}

// finishMirror completes the mirror, cancelling it once ready, which
// leaves the destination's disk a consistent copy; then the export goes.
func (m *migration) finishMirror(ctx context.Context, res *Result) error {
	o := m.o
	o.Progress(StageFinish, nil, nil)
	if err := m.src.BlockJobCancel(ctx, MirrorJob, false); err != nil {
		return fmt.Errorf("vmtest: source: %w", err)
	}
	if err := m.src.WaitBlockJobGone(ctx, MirrorJob, pollInterval); err != nil {
		return fmt.Errorf("vmtest: source: %w", err)
	}
	m.mirror = false
	if e, ok := m.src.LastJobEnd(MirrorJob); ok && e.Offset > res.DiskBytes {
		res.DiskBytes = e.Offset
	}
	if err := m.src.BlockdevDel(ctx, NBDTargetNode); err != nil {
		return fmt.Errorf("vmtest: source: %w", err)
	}
	m.nbdNode = false
	if o.BeforeNBDStop != nil {
		if err := o.BeforeNBDStop(ctx); err != nil {
			return fmt.Errorf("vmtest: before stopping the NBD server: %w", err)
		}
	}
	if err := m.dst.NBDServerStop(ctx); err != nil {
		return fmt.Errorf("vmtest: destination: %w", err)
	}
	m.nbdServer = false
	return nil
}

// abort undoes what run started, best effort, within a few seconds even if
// the caller's context has ended. It reports only failures that leave
// something behind.
func (m *migration) abort() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var errs []error
	if m.migrating {
		m.src.MigrateCancel(ctx)
	}
	if m.mirror {
		if err := m.src.BlockJobCancel(ctx, MirrorJob, true); err == nil {
			m.src.WaitBlockJobGone(ctx, MirrorJob, pollInterval)
		}
	}
	if m.nbdNode {
		m.src.BlockdevDel(ctx, NBDTargetNode)
	}
	if m.nbdServer {
		if err := m.dst.NBDServerStop(ctx); err != nil {
			errs = append(errs, fmt.Errorf("vmtest: abort: %w", err))
		}
	}
	return errors.Join(errs...)
}
