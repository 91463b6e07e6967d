package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/migtun/migtun/migrate"
)

// isTerminal reports whether w is a character device.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// newProgressPrinter prints JSON lines with asJSON, a redrawn bar on a
// terminal, plain lines otherwise.
func newProgressPrinter(w io.Writer, asJSON bool) *progressPrinter {
	mode := "plain"
	if asJSON {
		mode = "json"
	} else if isTerminal(w) {
		mode = "bar"
	}
	return &progressPrinter{w: w, mode: mode}
}

// failed prints a failed migration's error as a JSON line, in JSON mode.
func (p *progressPrinter) failed(err error) {
	if p.mode != "json" {
		return
	}
	step := ""
	var se *migrate.StepError
	if errors.As(err, &se) {
		step = se.Step
	}
	json.NewEncoder(p.w).Encode(map[string]string{"event": "error", "step": step, "error": err.Error()})
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
