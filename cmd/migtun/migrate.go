package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/migtun/migtun/migrate"
)

const migrateSynopsis = `migrate --control unix:PATH --peer HOST:PORT --qmp unix:SRC_QMP --dest-vm NAME
               [--copy-storage all|inc] [--disks NODE[,NODE]...] [--multifd N]
               [--postcopy] [--postcopy-start first-pass|immediately]
               [--postcopy-bandwidth BYTES_PER_S] [--recover-timeout DURATION]
               [--max-bandwidth BYTES_PER_S] [--downtime MS]
               [--paused] [--quit-source] [--timeout DURATION] [--json]`

func runMigrate(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("migrate", migrateSynopsis, stderr)
	control := fs.String("control", "", "the local migtun's control endpoint: unix:PATH or tcp:HOST:PORT")
	peer := fs.String("peer", "", "host:port of the destination's migtun")
	qmpSpec := fs.String("qmp", "", "the source QEMU's QMP socket: unix:PATH")
	destVM := fs.String("dest-vm", "", "the VM's name on the destination (its serve --qmp NAME=…)")
	copyStorage := fs.String("copy-storage", "", "copy the disks through the tunnel: all (whole disks) or inc (top image only); default: shared storage")
	disks := fs.String("disks", "", "copy only these block nodes, comma-separated (default: every writable disk)")
	multifd := fs.Int("multifd", 0, "multifd channels (0: a single channel)")
	postcopy := fs.Bool("postcopy", false, "let the migration switch to postcopy (when both QEMUs offer it); a tunnel break in postcopy is recovered")
	postcopyStart := fs.String("postcopy-start", migrate.PostcopyAfterFirstPass, "with --postcopy, when to switch: first-pass (once all RAM was sent once) or immediately")
	postcopyPreempt := fs.Bool("postcopy-preempt", true, "with --postcopy, use QEMU's postcopy-preempt channel when both QEMUs offer it")
	postcopyBW := fs.Int64("postcopy-bandwidth", 0, "with --postcopy, limit the background page push in postcopy to this many bytes/s (0: no limit)")
	recoverTimeout := fs.Duration("recover-timeout", migrate.DefaultRecoverTimeout, "with --postcopy, keep trying to resume a postcopy migration paused by a tunnel break for this long (keep it below both hosts' --session-ttl)")
	maxBW := fs.Int64("max-bandwidth", migrate.DefaultMaxBandwidth, "migration bandwidth limit in bytes/s (QEMU's own default of 128 MiB/s is never kept)")
	downtime := fs.Int64("downtime", 0, "downtime limit in milliseconds (default: QEMU's)")
	paused := fs.Bool("paused", false, "leave the destination guest paused")
	quitSource := fs.Bool("quit-source", false, "quit the source QEMU after success (default: leave it paused)")
	timeout := fs.Duration("timeout", 0, "give up (and roll back) after this long (default: no limit)")
	jsonOut := fs.Bool("json", false, "print progress and the result as JSON lines")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required("migrate", map[string]string{"control": *control, "peer": *peer, "qmp": *qmpSpec, "dest-vm": *destVM},
		"control", "peer", "qmp", "dest-vm"); err != nil {
		return err
	}
	qmpPath, ok := strings.CutPrefix(*qmpSpec, "unix:")
	if !ok || qmpPath == "" {
		return fmt.Errorf("migrate: --qmp %q: want unix:PATH", *qmpSpec)
	}
	o := migrate.Options{Control: *control, Peer: *peer, QMP: qmpPath, DestVM: *destVM, CopyStorage: *copyStorage,
		Multifd: *multifd, Postcopy: *postcopy, PostcopyStart: *postcopyStart, PostcopyBandwidth: *postcopyBW, NoPostcopyPreempt: !*postcopyPreempt,
		RecoverTimeout: *recoverTimeout, MaxBandwidth: *maxBW, Downtime: time.Duration(*downtime) * time.Millisecond,
		Paused: *paused, QuitSource: *quitSource}
	if *disks != "" {
		o.Disks = strings.Split(*disks, ",")
	}
	if *maxBW <= 0 {
		return errors.New("migrate: --max-bandwidth must be positive")
	}
	if *postcopyStart != migrate.PostcopyAfterFirstPass && *postcopyStart != migrate.PostcopyImmediately {
		return fmt.Errorf("migrate: --postcopy-start %q: want %s or %s", *postcopyStart, migrate.PostcopyAfterFirstPass, migrate.PostcopyImmediately)
	}
	if *postcopyBW < 0 || *recoverTimeout <= 0 {
		return errors.New("migrate: --postcopy-bandwidth must be 0 or more and --recover-timeout positive")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if *timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}
	mode := "plain"
	if *jsonOut {
		mode = "json"
	} else if isTerminal(stdout) {
		mode = "bar"
	}
	pr := &progressPrinter{w: stdout, mode: mode}
	o.Progress = pr.update
	res, err := migrate.Run(ctx, o)
	pr.end()
	if err != nil {
		if mode == "json" {
			step := ""
			var se *migrate.StepError
			if errors.As(err, &se) {
				step = se.Step
			}
			json.NewEncoder(stdout).Encode(map[string]string{"event": "error", "step": step, "error": err.Error()})
		}
		if errors.Is(err, migrate.ErrPostcopyFailed) {
			return fmt.Errorf("migrate: %w (the guest's state is split between the hosts: neither QEMU was resumed or cancelled)", err)
		}
		if errors.As(err, new(*migrate.StepError)) && err.(*migrate.StepError).Step == migrate.StepConfirm {
			return fmt.Errorf("migrate: %w (the VM runs on the destination)", err)
		}
		return fmt.Errorf("migrate: %w (the source VM was left as it was)", err)
	}
	pr.summary(res)
	return nil
}

// isTerminal reports whether w is a character device.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// progressPrinter shows a migration's progress: plain lines, a redrawn
// bar on a terminal, or JSON lines.
type progressPrinter struct {
	w         io.Writer
	mode      string // plain, bar or json
	step      string
	status    string // QEMU's migration status last shown
	last      time.Time
	barShown  bool
	lastBytes int64
	lastAt    time.Duration
	rate      float64 // bytes/s of RAM, from the last two samples
}

func (p *progressPrinter) update(pg migrate.Progress) {
	if pg.Migration != nil && pg.Migration.RAM != nil {
		if dt := (pg.Elapsed - p.lastAt).Seconds(); dt >= 0.5 {
			p.rate = float64(pg.Migration.RAM.Transferred-p.lastBytes) / dt
			p.lastBytes, p.lastAt = pg.Migration.RAM.Transferred, pg.Elapsed
		}
	}
	status := ""
	if pg.Migration != nil {
		status = pg.Migration.Status
	}
	// A new step or migration status shows at once.
	changed := pg.Step != p.step || status != p.status
	p.step, p.status = pg.Step, status
	every := time.Second
	if p.mode == "bar" {
		every = 200 * time.Millisecond
	} else if p.mode == "json" {
		every = 500 * time.Millisecond
	}
	if !changed && time.Since(p.last) < every {
		return
	}
	p.last = time.Now()
	switch p.mode {
	case "json":
		json.NewEncoder(p.w).Encode(struct {
			Event string `json:"event"`
			migrate.Progress
		}{"progress", pg})
	case "bar":
		fmt.Fprintf(p.w, "\r\033[K%s", migrationLine(pg, p.rate))
		p.barShown = true
	default:
		fmt.Fprintln(p.w, migrationLine(pg, p.rate))
	}
}

// end finishes a bar's line.
func (p *progressPrinter) end() {
	if p.barShown {
		fmt.Fprintln(p.w)
		p.barShown = false
	}
}

// migrationLine is one line describing the progress.
func migrationLine(pg migrate.Progress, rate float64) string {
	var b strings.Builder
	fmt.Fprintf(&b, "[%6.1fs] %-8s", pg.Elapsed.Seconds(), pg.Step)
	if m := pg.Migration; m != nil {
		fmt.Fprintf(&b, " %s", m.Status)
		if pg.Postcopy {
			b.WriteString(" (postcopy)")
		}
		if ram := m.RAM; ram != nil {
			pct := 0.0
			if ram.Total > 0 {
				pct = 100 * float64(ram.Total-ram.Remaining) / float64(ram.Total)
			}
			fmt.Fprintf(&b, " RAM %s %5.1f%% sent %s, remaining %s, %s/s",
				migBar(pct, 20), pct, migSize(ram.Transferred), migSize(ram.Remaining), migSize(int64(rate)))
			if ram.DirtyPagesRate > 0 {
				fmt.Fprintf(&b, ", dirty %d pages/s", ram.DirtyPagesRate)
			}
			if rate > 0 && ram.Remaining > 0 {
				fmt.Fprintf(&b, ", ETA %.0fs", float64(ram.Remaining)/rate)
			}
		}
	}
	if pg.Recovering != "" {
		fmt.Fprintf(&b, " recovering: %s", pg.Recovering)
	}
	for _, d := range pg.Disks {
		pct := 100.0
		if d.Total > 0 {
			pct = 100 * float64(d.Done) / float64(d.Total)
		}
		state := ""
		if d.Ready {
			state = " ready"
		}
		fmt.Fprintf(&b, " | disk %s %s %5.1f%% %s/%s%s", d.Node, migBar(pct, 10), pct, migSize(d.Done), migSize(d.Total), state)
	}
	return b.String()
}

func migBar(pct float64, width int) string {
	n := int(pct / 100 * float64(width))
	n = max(0, min(width, n))
	return "[" + strings.Repeat("#", n) + strings.Repeat(".", width-n) + "]"
}

func migSize(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// summary prints the totals.
func (p *progressPrinter) summary(r *migrate.Result) {
	if p.mode == "json" {
		json.NewEncoder(p.w).Encode(struct {
			Event string `json:"event"`
			*migrate.Result
		}{"result", r})
		return
	}
	mbps := 0.0
	if s := r.Migration.Seconds(); s > 0 {
		mbps = float64(r.RAMBytes) / s / 1e6
	}
	fmt.Fprintf(p.w, "migrated: session %s, destination QEMU %s\n", r.Session, r.DestQEMU)
	fmt.Fprintf(p.w, "  RAM   %s in %.2fs (%.1f MB/s)%s\n", migSize(r.RAMBytes), r.Migration.Seconds(), mbps, map[bool]string{true: ", postcopy"}[r.Postcopy])
	if r.Recoveries > 0 {
		fmt.Fprintf(p.w, "  postcopy recovered %d time(s) after the tunnel broke (streams cut by a break may show in the counts below)\n", r.Recoveries)
	}
	if r.DiskBytes > 0 {
		fmt.Fprintf(p.w, "  disks %s, in sync after %.2fs\n", migSize(r.DiskBytes), r.Mirror.Seconds())
	}
	fmt.Fprintf(p.w, "  downtime %d ms, total %.2fs; destination %s, source %s\n", r.Downtime.Milliseconds(), r.Total.Seconds(), r.DestStatus, r.SourceStatus)
	for _, c := range r.Channels {
		fmt.Fprintf(p.w, "  channel %-5s %d streams, %s forward, %s back\n", c.Name, c.Streams, migSize(c.BytesForward), migSize(c.BytesReturn))
	}
	if len(r.Mismatch) > 0 {
		fmt.Fprintf(p.w, "  warning: the hosts' counts differ: %s\n", strings.Join(r.Mismatch, "; "))
	}
}
