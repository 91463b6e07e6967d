package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/migtun/migtun/bench"
	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/migrate"
)

const migrateSynopsis = `migrate --control unix:PATH --peer HOST:PORT --qmp unix:SRC_QMP --dest-vm NAME
               [--copy-storage all|inc] [--disks NODE[,NODE]...] [--mirror-buffer 64MiB]
               [--multifd N [--multifd-compression none|zlib|zstd]]
               [--postcopy] [--postcopy-start first-pass|immediately]
               [--postcopy-bandwidth BYTES_PER_S] [--recover-timeout DURATION]
               [--max-bandwidth BYTES_PER_S] [--downtime MS]
               [--paused] [--quit-source] [--timeout DURATION] [--json]`

func runMigrate(args []string, stdout, stderr io.Writer) error {
	o, opts, err := parseMigrate(args, stderr)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if opts.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, opts.timeout)
		defer cancel()
	}
	pr := newProgressPrinter(stdout, opts.json)
	o.Progress = pr.update
	res, err := migrate.Run(ctx, o)
	pr.end()
	if err != nil {
		pr.failed(err)
		return migrateError(err)
	}
	pr.summary(res)
	return nil
}

// migrateFlags are the flags of migrate that are not migrate.Options.
type migrateFlags struct {
	timeout time.Duration
	json    bool
}

// parseMigrate reads migrate's flags into checked migrate.Options.
func parseMigrate(args []string, stderr io.Writer) (migrate.Options, migrateFlags, error) {
	var o migrate.Options
	var f migrateFlags
	var qmpSpec, disks, tokenFile, mirrorBuffer string
	var downtime int64
	var preempt bool
	fs := newFlagSet("migrate", migrateSynopsis, stderr)
	fs.StringVar(&o.Control, "control", "", "the local migtun's control endpoint: unix:PATH or tcp:HOST:PORT")
	fs.StringVar(&tokenFile, "control-token-file", "", "the TCP control endpoint's token, in a file (serve's --control-token-file)")
	fs.StringVar(&o.Peer, "peer", "", "host:port of the destination's migtun")
	fs.StringVar(&qmpSpec, "qmp", "", "the source QEMU's QMP socket: unix:PATH")
	fs.StringVar(&o.DestVM, "dest-vm", "", "the VM's name on the destination (its serve --qmp NAME=…)")
	fs.StringVar(&o.CopyStorage, "copy-storage", "", "copy the disks through the tunnel: all (whole disks) or inc (top image only); default: shared storage")
	fs.StringVar(&disks, "disks", "", "copy only these block nodes, comma-separated (default: every writable disk)")
	fs.IntVar(&o.Multifd, "multifd", 0, "multifd channels (0: a single channel)")
	fs.StringVar(&o.MultifdCompression, "multifd-compression", "", "with --multifd, compress each channel on both QEMUs: none, zlib or zstd (spends CPU to send fewer bytes; helps a slow link when guest RAM compresses; default: QEMU's, none)")
	fs.StringVar(&mirrorBuffer, "mirror-buffer", bench.FormatSize(migrate.DefaultMirrorBuffer), "with --copy-storage, each disk mirror's data in flight (QEMU's buf-size): a mirror moves at most this per round trip, so a long fast path needs more than QEMU's 16MiB")
	fs.BoolVar(&o.Postcopy, "postcopy", false, "let the migration switch to postcopy (when both QEMUs offer it); a tunnel break in postcopy is recovered")
	fs.StringVar(&o.PostcopyStart, "postcopy-start", migrate.PostcopyAfterFirstPass, "with --postcopy, when to switch: first-pass (once all RAM was sent once) or immediately")
	fs.BoolVar(&preempt, "postcopy-preempt", true, "with --postcopy, use QEMU's postcopy-preempt channel when both QEMUs offer it")
	fs.Int64Var(&o.PostcopyBandwidth, "postcopy-bandwidth", 0, "with --postcopy, limit the background page push in postcopy to this many bytes/s (0: no limit)")
	fs.DurationVar(&o.RecoverTimeout, "recover-timeout", migrate.DefaultRecoverTimeout, "with --postcopy, keep trying to resume a postcopy migration paused by a tunnel break for this long (keep it below both hosts' --session-ttl)")
	fs.Int64Var(&o.MaxBandwidth, "max-bandwidth", migrate.DefaultMaxBandwidth, "migration bandwidth limit in bytes/s (QEMU's own default of 128 MiB/s is never kept)")
	fs.Int64Var(&downtime, "downtime", 0, "downtime limit in milliseconds (default: QEMU's)")
	fs.BoolVar(&o.Paused, "paused", false, "leave the destination guest paused")
	fs.BoolVar(&o.QuitSource, "quit-source", false, "quit the source QEMU after success (default: leave it paused)")
	fs.DurationVar(&f.timeout, "timeout", 0, "give up (and roll back) after this long (default: no limit)")
	fs.BoolVar(&f.json, "json", false, "print progress and the result as JSON lines")
	if err := parse(fs, args); err != nil {
		return o, f, err
	}
	if err := required("migrate", map[string]string{"control": o.Control, "peer": o.Peer, "qmp": qmpSpec, "dest-vm": o.DestVM},
		"control", "peer", "qmp", "dest-vm"); err != nil {
		return o, f, err
	}
	ep, err := endpoint.ParseUnix(qmpSpec)
	if err != nil {
		return o, f, fmt.Errorf("migrate: --qmp: %w", err)
	}
	o.QMP = ep.Address
	if tokenFile != "" {
		if o.ControlToken, err = control.ReadTokenFile(tokenFile); err != nil {
			return o, f, fmt.Errorf("migrate: --control-token-file: %w", err)
		}
	}
	if o.MirrorBuffer, err = bench.ParseSize(mirrorBuffer); err != nil {
		return o, f, fmt.Errorf("migrate: --mirror-buffer: %w", err)
	}
	o.Downtime = time.Duration(downtime) * time.Millisecond
	o.NoPostcopyPreempt = !preempt
	if disks != "" {
		o.Disks = strings.Split(disks, ",")
	}
	switch {
	case o.MaxBandwidth <= 0:
		return o, f, errors.New("migrate: --max-bandwidth must be positive")
	case o.PostcopyStart != migrate.PostcopyAfterFirstPass && o.PostcopyStart != migrate.PostcopyImmediately:
		return o, f, fmt.Errorf("migrate: --postcopy-start %q: want %s or %s", o.PostcopyStart, migrate.PostcopyAfterFirstPass, migrate.PostcopyImmediately)
	case o.PostcopyBandwidth < 0 || o.RecoverTimeout <= 0:
		return o, f, errors.New("migrate: --postcopy-bandwidth must be 0 or more and --recover-timeout positive")
	}
	return o, f, nil
}

// migrateError says, beside the error, where the guest is left.
func migrateError(err error) error {
	var se *migrate.StepError
	switch {
	case errors.Is(err, migrate.ErrPostcopyFailed):
		return fmt.Errorf("migrate: %w (the guest's state is split between the hosts: neither QEMU was resumed or cancelled)", err)
	case errors.As(err, &se) && se.Step == migrate.StepConfirm:
		return fmt.Errorf("migrate: %w (the VM runs on the destination)", err)
	}
	return fmt.Errorf("migrate: %w (the source VM was left as it was)", err)
}
