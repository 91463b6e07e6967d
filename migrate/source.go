package migrate

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/qmp"
)

// DefaultMirrorBuffer is each disk mirror's data in flight. A mirror
// moves at most this much per round trip of its NBD requests, so QEMU's
// own 16 MiB holds a 1 Gbit/s path with a 100 ms round trip to about half
// its rate (docs/benchmarks.md measures 63 MB/s, and 83 MB/s with 64 MiB).
// It costs that much memory of the source QEMU per disk while copying.
const DefaultMirrorBuffer = 64 << 20

// MultifdCompressions are the values of Options.MultifdCompression.
var MultifdCompressions = []string{"none", "zlib", "zstd"}

// DefaultMaxBandwidth replaces QEMU's 128 MiB/s default migration bandwidth
// limit: 100 GiB/s, in effect no limit.
const DefaultMaxBandwidth = 100 << 30

// Steps, as errors and progress name them.
const (
	StepBegin   = "begin"
	StepPrepare = "prepare"
	StepMirror  = "mirror" // part of perform: the disks are copied
	StepPerform = "perform"
	StepFinish  = "finish"
	StepConfirm = "confirm"
)

// Options describe one migration, seen from the source host.
type Options struct {
	// Control is the local migtun's control endpoint: unix:PATH or
	// tcp:HOST:PORT.
	Control string
	// ControlToken is the bearer token of a TCP control endpoint.
	ControlToken string
	// Peer is the destination migtun's host:port.
	Peer string
	// QMP is the source QEMU's QMP UNIX socket path.
	QMP string
	// DestVM is the VM name registered on the destination (serve --qmp).
	DestVM string
	// CopyStorage is "" (shared storage: no disk is copied), "all" (whole
	// disks) or "inc" (the top image only).
	CopyStorage string
	// Disks limits the copy to these block nodes (or device names).
	Disks []string
	// Multifd is the number of multifd channels; 0 disables multifd.
	Multifd int
	// MultifdCompression, with Multifd, is QEMU's multifd-compression on
	// both sides: "none" (also for ""), "zlib" or "zstd". Compression
	// spends CPU on both hosts to send fewer bytes: it helps a slow link
	// and a guest whose RAM compresses, and costs throughput elsewhere.
	MultifdCompression string
	// MirrorBuffer bounds each disk mirror's data in flight (QEMU's
	// blockdev-mirror buf-size); default DefaultMirrorBuffer.
	MirrorBuffer int64
	// Postcopy lets the migration switch to postcopy, when PostcopyStart
	// says. If the tunnel breaks in postcopy, both QEMUs pause and the
	// migration is recovered through the same session once the path is
	// back, for up to RecoverTimeout.
	Postcopy bool
	// PostcopyStart is PostcopyAfterFirstPass (the default, also for "")
	// or PostcopyImmediately.
	PostcopyStart string
	// NoPostcopyPreempt, with Postcopy, leaves QEMU's postcopy-preempt
	// channel off even when the source QEMU offers it.
	NoPostcopyPreempt bool
	// PostcopyBandwidth limits the background page push in postcopy, in
	// bytes/s (QEMU's max-postcopy-bandwidth); 0 sets no limit.
	PostcopyBandwidth int64
	// RecoverTimeout bounds the recovery of a postcopy migration paused
	// by a broken channel; default DefaultRecoverTimeout. It should stay
	// below both hosts' session time-to-live.
	RecoverTimeout time.Duration
	// MaxBandwidth is the migration bandwidth limit in bytes/s; default
	// DefaultMaxBandwidth.
	MaxBandwidth int64
	// Downtime is the downtime limit; 0 keeps QEMU's.
	Downtime time.Duration
	// Paused leaves the destination guest paused.
	Paused bool
	// QuitSource quits the source QEMU after success.
	QuitSource bool
	// Progress, if set, is called at each step and with each poll.
	Progress func(Progress)
}

// Progress is the state of a migration at one moment.
type Progress struct {
	Step    string        `json:"step"`
	Elapsed time.Duration `json:"elapsed_ns"`
	// Disks is each disk's mirror.
	Disks []DiskProgress `json:"disks,omitempty"`
	// Migration is the source's query-migrate reply (perform).
	Migration *qmp.MigrationInfo `json:"migration,omitempty"`
	// Postcopy is true once postcopy was started.
	Postcopy bool `json:"postcopy,omitempty"`
	// Recovering says why a postcopy migration paused by a broken channel
	// is not resumed yet (the last attempt's error), while it is retried.
	Recovering string `json:"recovering,omitempty"`
}

// DiskProgress is one disk's mirror.
type DiskProgress struct {
	Node  string `json:"node"`
	Done  int64  `json:"done"`
	Total int64  `json:"total"`
	Ready bool   `json:"ready"`
}

// Result summarises a migration that succeeded.
type Result struct {
	Session  string `json:"session"`
	DestQEMU string `json:"dest_qemu"`
	// RAMBytes is the RAM traffic the source reported.
	RAMBytes int64 `json:"ram_bytes"`
	// DiskBytes is what the mirrors copied.
	DiskBytes int64 `json:"disk_bytes"`
	// Mirror is the time until every mirror was ready; Migration from
	// migrate until completed; Total the whole command.
	Mirror    time.Duration `json:"mirror_ns"`
	Migration time.Duration `json:"migration_ns"`
	Total     time.Duration `json:"total_ns"`
	// Downtime is QEMU's measured downtime.
	Downtime time.Duration `json:"downtime_ns"`
	Postcopy bool          `json:"postcopy"`
	// Recoveries counts the times a postcopy migration paused by a broken
	// channel was resumed.
	Recoveries int `json:"recoveries,omitempty"`
	// DestStatus and SourceStatus are the VMs' run states at the end.
	DestStatus   string `json:"dest_status"`
	SourceStatus string `json:"source_status"`
	// Channels are the session's channels as finish reported them;
	// Mismatch the differences between both hosts' counts (none expected).
	Channels []control.ChannelInfo `json:"channels"`
	Mismatch []string              `json:"mismatch"`
}

// StepError is a failed migration: the step and what failed.
type StepError struct {
	Step string
	Err  error
}

func (e *StepError) Error() string { return e.Step + ": " + e.Err.Error() }
func (e *StepError) Unwrap() error { return e.Err }

// disk is a disk to copy.
type disk struct {
	node, device string
	size         int64
	job, target  string // mirror job id, NBD client node
	added, mirr  bool   // what was started, for rollback
}

// run is the state of one migration.
type run struct {
	o     Options
	q     *qmp.Client
	ctl   *control.Client
	dest  destVM // the destination VM, once the session is prepared
	start time.Time
	// reported is when progress was last passed to the local migtun.
	reported time.Time

	wasRunning bool
	disks      []*disk
	session    *control.SessionInfo
	vmPrepared bool
	migrating  bool
	finished   bool // vm-finish answered: the destination owns the VM
	postcopy   bool // migrate-start-postcopy was sent
	// inPostcopy is set once QEMU reported a postcopy state: from then on
	// the destination runs the guest and the source must never resume.
	inPostcopy bool
	// pausedAt is when the current postcopy pause began; zero when the
	// migration is not paused.
	pausedAt time.Time
	res      Result
}

// Run migrates the VM. On failure it cancels what it started, leaves the
// source guest as it was, and returns a *StepError.
func Run(ctx context.Context, o Options) (*Result, error) {
	if o.MaxBandwidth <= 0 {
		o.MaxBandwidth = DefaultMaxBandwidth
	}
	switch o.CopyStorage {
	case "", "all", "inc":
	default:
		return nil, &StepError{StepBegin, fmt.Errorf("copy-storage %q: want all or inc", o.CopyStorage)}
	}
	if len(o.Disks) > 0 && o.CopyStorage == "" {
		return nil, &StepError{StepBegin, errors.New("disks given without copy-storage all or inc")}
	}
	switch o.PostcopyStart {
	case "":
		o.PostcopyStart = PostcopyAfterFirstPass
	case PostcopyAfterFirstPass, PostcopyImmediately:
	default:
		return nil, &StepError{StepBegin, fmt.Errorf("postcopy start %q: want %s or %s", o.PostcopyStart, PostcopyAfterFirstPass, PostcopyImmediately)}
	}
	if o.RecoverTimeout <= 0 {
		o.RecoverTimeout = DefaultRecoverTimeout
	}
	if o.PostcopyBandwidth < 0 {
		return nil, &StepError{StepBegin, fmt.Errorf("postcopy bandwidth %d: want 0 (no limit) or more", o.PostcopyBandwidth)}
	}
	if o.Multifd < 0 || o.Multifd > 255 {
		return nil, &StepError{StepBegin, fmt.Errorf("multifd %d: want 0 to 255", o.Multifd)}
	}
	if o.MultifdCompression != "" && !slices.Contains(MultifdCompressions, o.MultifdCompression) {
		return nil, &StepError{StepBegin, fmt.Errorf("multifd compression %q: want one of %v", o.MultifdCompression, MultifdCompressions)}
	}
	if o.MultifdCompression != "" && o.MultifdCompression != "none" && o.Multifd == 0 {
		return nil, &StepError{StepBegin, fmt.Errorf("multifd compression %s needs multifd channels", o.MultifdCompression)}
	}
	if o.MirrorBuffer == 0 {
		o.MirrorBuffer = DefaultMirrorBuffer
	}
	if o.MirrorBuffer < 1<<20 || o.MirrorBuffer > 1<<30 {
		return nil, &StepError{StepBegin, fmt.Errorf("mirror buffer %d bytes: want 1MiB to 1GiB", o.MirrorBuffer)}
	}
	ctl, err := control.NewClient(o.Control, &control.Options{Timeout: 2 * time.Minute, Token: o.ControlToken})
	if err != nil {
		return nil, &StepError{StepBegin, err}
	}
	defer ctl.Close()
	r := &run{o: o, ctl: ctl, start: time.Now()}
	res, err := r.run(ctx)
	if r.q != nil {
		defer r.q.Close()
	}
	if err != nil {
		r.rollback(err)
		var se *StepError
		if r.inPostcopy && !errors.Is(err, ErrPostcopyFailed) && errors.As(err, &se) {
			se.Err = fmt.Errorf("%w: %w", ErrPostcopyFailed, se.Err)
		}
		return nil, err
	}
	return res, nil
}

func (r *run) progress(p Progress) {
	r.reportProgress(p)
	if r.o.Progress != nil {
		p.Elapsed = time.Since(r.start)
		p.Postcopy = r.postcopy
		r.o.Progress(p)
	}
}

// reportProgress passes the RAM and mirror figures to the local migtun, at
// most once a second, for its metrics; a failure only costs the metrics.
func (r *run) reportProgress(p Progress) {
	if r.session == nil || time.Since(r.reported) < time.Second {
		return
	}
	r.reported = time.Now()
	mp := control.MigrationProgress{}
	if p.Migration != nil && p.Migration.RAM != nil {
		mp.RAMTransferred, mp.RAMRemaining = p.Migration.RAM.Transferred, p.Migration.RAM.Remaining
		mp.DirtyPagesRate = p.Migration.RAM.DirtyPagesRate
	}
	for _, d := range p.Disks {
		mp.Disks = append(mp.Disks, control.DiskMirror{Node: d.Node, Done: d.Done, Total: d.Total})
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	r.ctl.ReportProgress(ctx, r.session.ID, mp)
}

func (r *run) run(ctx context.Context) (*Result, error) {
	if err := r.begin(ctx); err != nil {
		return nil, &StepError{StepBegin, err}
	}
	if err := r.prepare(ctx); err != nil {
		return nil, &StepError{StepPrepare, err}
	}
	if err := r.mirror(ctx); err != nil {
		return nil, &StepError{StepMirror, err}
	}
	if err := r.perform(ctx); err != nil {
		return nil, &StepError{StepPerform, err}
	}
	if err := r.finish(ctx); err != nil {
		return nil, &StepError{StepFinish, err}
	}
	if err := r.confirm(ctx); err != nil {
		return nil, &StepError{StepConfirm, err}
	}
	r.res.Total = time.Since(r.start)
	return &r.res, nil
}

// begin reads the source VM's state and chooses the disks.
func (r *run) begin(ctx context.Context) error {
	r.progress(Progress{Step: StepBegin})
	q, err := qmp.Dial(ctx, r.o.QMP)
	if err != nil {
		return err
	}
	r.q = q
	st, err := q.QueryStatus(ctx)
	if err != nil {
		return err
	}
	switch st.Status {
	case "running", "paused", "prelaunch": // prelaunch: started with -S, never run
	default:
		return fmt.Errorf("the source VM is %q; want running or paused", st.Status)
	}
	r.wasRunning = st.Running
	if r.o.CopyStorage == "" {
		return nil
	}
	var devs []blockDevice
	if err := q.Execute(ctx, "query-block", nil, &devs); err != nil {
		return err
	}
	r.disks, err = selectDisks(devs, r.o.Disks)
	if err != nil {
		return err
	}
	for _, d := range r.disks {
		d.job, d.target = "migtun-mirror-"+d.node, "migtun-nbd-"+d.node
	}
	return nil
}

// blockDevice is an entry of query-block.
type blockDevice struct {
	Device   string `json:"device"`
	QDev     string `json:"qdev"`
	Inserted *struct {
		NodeName string `json:"node-name"`
		ReadOnly bool   `json:"ro"`
		Image    struct {
			VirtualSize int64 `json:"virtual-size"`
		} `json:"image"`
	} `json:"inserted"`
}

// selectDisks picks the writable disks with a medium, only those named in
// want (by node or device name) if any.
func selectDisks(devs []blockDevice, want []string) ([]*disk, error) {
	var all []*disk
	for _, d := range devs {
		if d.Inserted == nil || d.Inserted.ReadOnly || d.Inserted.NodeName == "" {
			continue
		}
		all = append(all, &disk{node: d.Inserted.NodeName, device: d.Device, size: d.Inserted.Image.VirtualSize})
	}
	if len(want) == 0 {
		if len(all) == 0 {
			return nil, errors.New("the VM has no writable disk to copy")
		}
		return all, nil
	}
	var out []*disk
	for _, w := range want {
		i := slices.IndexFunc(all, func(d *disk) bool { return d.node == w || (d.device != "" && d.device == w) })
		if i < 0 {
			var names []string
			for _, d := range all {
				names = append(names, d.node)
			}
			return nil, fmt.Errorf("no writable disk %q (disks: %s)", w, strings.Join(names, ", "))
		}
		if !slices.Contains(out, all[i]) {
			out = append(out, all[i])
		}
	}
	return out, nil
}

// wantCaps are the capabilities both sides set, given those the source
// QEMU offers: with postcopy, the postcopy-preempt channel (QEMU 8.0+) is
// used when offered, unless NoPostcopyPreempt. QEMU opens that channel to the same URI once postcopy
// starts, after the main and multifd channels, so the main channel's
// forward delivers it in its turn like any other.
func (r *run) wantCaps(offered map[string]bool) map[string]bool {
	caps := map[string]bool{}
	if r.o.Multifd > 0 {
		caps["multifd"] = true
	}
	if r.o.Postcopy {
		caps["postcopy-ram"] = true
		if _, ok := offered["postcopy-preempt"]; ok && !r.o.NoPostcopyPreempt {
			caps["postcopy-preempt"] = true
		}
	}
	return caps
}

// prepare creates the session and has the destination VM wait.
func (r *run) prepare(ctx context.Context) error {
	r.progress(Progress{Step: StepPrepare})
	// The source must offer the capabilities before the peer is bothered.
	offered, err := r.q.QueryMigrateCapabilities(ctx)
	if err != nil {
		return err
	}
	want := r.wantCaps(offered)
	caps, err := capabilitySet(offered, want, "source QEMU "+r.q.Version().String())
	if err != nil {
		return err
	}
	channels := []string{"main"}
	if len(r.disks) > 0 {
		channels = append(channels, "nbd")
	}
	info, err := r.ctl.Prepare(ctx, control.PrepareRequest{Peer: r.o.Peer, Channels: channels})
	if err != nil {
		return fmt.Errorf("session: %w", err)
	}
	r.session = info
	r.res.Session = info.ID
	r.dest = destVM{ctl: r.ctl, session: info.ID, vm: r.o.DestVM}
	req := VMPrepare{Capabilities: want}
	if r.o.Multifd > 0 {
		req.MultifdChannels = r.o.Multifd
		req.MultifdCompression = r.o.MultifdCompression
	}
	for _, d := range r.disks {
		req.Disks = append(req.Disks, VMDisk{Node: d.node, Size: d.size})
	}
	r.vmPrepared = true // from here on, vm-abort on failure
	p, err := r.dest.prepare(ctx, req)
	if err != nil {
		return err
	}
	r.res.DestQEMU = p.QEMU
	// The source's capabilities and parameters, set before mirroring so
	// a refusal comes before any byte moves.
	if err := r.q.MigrateSetCapabilities(ctx, caps); err != nil {
		return err
	}
	params := map[string]any{"max-bandwidth": r.o.MaxBandwidth}
	if r.o.Multifd > 0 {
		params["multifd-channels"] = r.o.Multifd
		if r.o.MultifdCompression != "" {
			params["multifd-compression"] = r.o.MultifdCompression
		}
	}
	if r.o.Downtime > 0 {
		params["downtime-limit"] = r.o.Downtime.Milliseconds()
	}
	if r.o.Postcopy {
		params["max-postcopy-bandwidth"] = r.o.PostcopyBandwidth
	}
	return r.q.MigrateSetParameters(ctx, params)
}

func (r *run) uri(channel string) string {
	for _, c := range r.session.Channels {
		if c.Name == channel {
			return c.URI
		}
	}
	return ""
}

// nbdServer is blockdev-add's server argument for the session's nbd URI.
func nbdServer(uri string) (map[string]any, error) {
	ep, err := endpoint.Parse(uri)
	if err != nil {
		return nil, fmt.Errorf("nbd channel: %w", err)
	}
	if ep.Network == "unix" {
		return map[string]any{"type": "unix", "path": ep.Address}, nil
	}
	host, port, _ := net.SplitHostPort(ep.Address) // checked by Parse
	return map[string]any{"type": "inet", "host": host, "port": port}, nil
}

// mirror copies every disk into the nbd channel until all are in sync.
func (r *run) mirror(ctx context.Context) error {
	if len(r.disks) == 0 {
		return nil
	}
	server, err := nbdServer(r.uri("nbd"))
	if err != nil {
		return err
	}
	sync := "full"
	if r.o.CopyStorage == "inc" {
		sync = "top"
	}
	start := time.Now()
	for _, d := range r.disks {
		args := map[string]any{"driver": "nbd", "node-name": d.target, "export": d.node, "server": server}
		if r.o.Postcopy {
			// A tunnel break in postcopy also breaks the nbd streams: the
			// NBD client reconnects through the session's nbd socket
			// meanwhile, holding its requests, instead of failing the
			// mirror the destination's disks depend on.
			args["reconnect-delay"] = int64(r.o.RecoverTimeout / time.Second)
		}
		if err := r.q.BlockdevAdd(ctx, args); err != nil {
			return fmt.Errorf("disk %s: %w", d.node, err)
		}
		d.added = true
		if err := r.q.BlockdevMirror(ctx, d.job, d.node, d.target, sync, r.o.MirrorBuffer); err != nil {
			return fmt.Errorf("disk %s: %w", d.node, err)
		}
		d.mirr = true
	}
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		jobs, err := r.q.QueryBlockJobs(ctx)
		if err != nil {
			return err
		}
		p, ready, err := r.diskProgress(jobs)
		r.progress(Progress{Step: StepMirror, Disks: p})
		if err != nil {
			return err
		}
		if ready {
			r.res.Mirror = time.Since(start)
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// diskProgress reads the mirrors' state from query-block-jobs.
func (r *run) diskProgress(jobs []qmp.BlockJob) ([]DiskProgress, bool, error) {
	var out []DiskProgress
	ready := true
	for _, d := range r.disks {
		i := slices.IndexFunc(jobs, func(j qmp.BlockJob) bool { return j.Device == d.job })
		if i < 0 {
			if e, ok := r.q.LastJobEnd(d.job); ok && e.Error != "" {
				return out, false, fmt.Errorf("disk %s: mirror failed: %s", d.node, e.Error)
			}
			return out, false, fmt.Errorf("disk %s: the mirror job ended before it was ready", d.node)
		}
		j := jobs[i]
		if j.Error != "" {
			return out, false, fmt.Errorf("disk %s: mirror failed: %s", d.node, j.Error)
		}
		out = append(out, DiskProgress{Node: d.node, Done: j.Offset, Total: j.Len, Ready: j.Ready})
		ready = ready && j.Ready
		if j.Offset > r.res.DiskBytes {
			r.res.DiskBytes = j.Offset
		}
	}
	return out, ready, nil
}

// perform migrates RAM and devices, then completes the mirrors.
func (r *run) perform(ctx context.Context) error {
	r.progress(Progress{Step: StepPerform})
	start := time.Now()
	if err := r.q.Migrate(ctx, r.uri("main")); err != nil {
		return err
	}
	r.migrating = true
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		info, err := r.q.QueryMigrate(ctx)
		if err != nil {
			return err
		}
		var dp []DiskProgress
		if len(r.disks) > 0 {
			if jobs, err := r.q.QueryBlockJobs(ctx); err == nil {
				dp, _, _ = r.diskProgress(jobs)
			}
		}
		r.progress(Progress{Step: StepPerform, Migration: info, Disks: dp})
		switch info.Status {
		case qmp.MigrationCompleted:
			r.migrating = false
			r.res.Migration = time.Since(start)
			if info.RAM != nil {
				r.res.RAMBytes = info.RAM.Transferred
			}
			r.res.Downtime = time.Duration(info.Downtime) * time.Millisecond
			r.res.Postcopy = r.postcopy
			return r.completeMirrors(ctx)
		case qmp.MigrationFailed:
			r.migrating = false
			return fmt.Errorf("QEMU: migration failed: %s", info.ErrorDesc)
		case qmp.MigrationCancelled:
			r.migrating = false
			return errors.New("QEMU: migration cancelled")
		case qmp.MigrationActive:
			if r.o.Postcopy && !r.postcopy && (r.o.PostcopyStart == PostcopyImmediately || info.RAM != nil && info.RAM.DirtySyncCount >= 2) {
				if err := r.q.Execute(ctx, "migrate-start-postcopy", nil, nil); err != nil {
					return err
				}
				r.postcopy = true
			}
		case qmp.MigrationPostcopyActive:
			r.inPostcopy = true
			r.pausedAt = time.Time{}
		case qmp.MigrationPostcopyRecover:
			r.inPostcopy = true
		case qmp.MigrationPostcopyPaused:
			r.inPostcopy = true
			if err := r.recoverPostcopy(ctx); err != nil {
				return err
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// completeMirrors ends the ready mirrors (the destination keeps a
// consistent copy), removes the NBD client nodes, and waits until the nbd
// channel has carried the last request, so the NBD server may stop.
func (r *run) completeMirrors(ctx context.Context) error {
	for _, d := range r.disks {
		if err := r.q.BlockJobCancel(ctx, d.job, false); err != nil {
			return fmt.Errorf("disk %s: %w", d.node, err)
		}
	}
	for _, d := range r.disks {
		if err := r.q.WaitBlockJobGone(ctx, d.job, pollInterval); err != nil {
			return fmt.Errorf("disk %s: %w", d.node, err)
		}
		d.mirr = false
		if e, ok := r.q.LastJobEnd(d.job); ok && e.Offset > r.res.DiskBytes {
			r.res.DiskBytes = e.Offset
		}
		if err := r.q.BlockdevDel(ctx, d.target); err != nil {
			return fmt.Errorf("disk %s: %w", d.node, err)
		}
		d.added = false
	}
	if len(r.disks) == 0 {
		return nil
	}
	wctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	for {
		info, err := r.ctl.Session(wctx, r.session.ID)
		if err != nil {
			return fmt.Errorf("waiting for the nbd channel to drain: %w", err)
		}
		i := slices.IndexFunc(info.Channels, func(c control.ChannelInfo) bool { return c.Name == "nbd" })
		if i < 0 || info.Channels[i].ActiveStreams == 0 {
			return nil
		}
		select {
		case <-wctx.Done():
			return fmt.Errorf("waiting for the nbd channel to drain: %w", wctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// finish has the destination complete: NBD server stopped, guest resumed
// if it ran here (unless Paused).
func (r *run) finish(ctx context.Context) error {
	r.progress(Progress{Step: StepFinish})
	res, err := r.dest.finish(ctx, r.wasRunning && !r.o.Paused)
	if err != nil {
		return err
	}
	r.finished = true
	r.res.DestStatus = res.Status
	return nil
}

// confirm leaves the source paused or quits it, and finishes the session.
func (r *run) confirm(ctx context.Context) error {
	r.progress(Progress{Step: StepConfirm})
	if r.o.QuitSource {
		if err := r.q.Quit(ctx); err != nil {
			return err
		}
		r.res.SourceStatus = "quit"
	} else if st, err := r.q.Status(ctx); err == nil {
		r.res.SourceStatus = st
	}
	rep, err := r.ctl.Finish(ctx, r.session.ID, 0)
	if err != nil {
		return fmt.Errorf("session finish: %w", err)
	}
	r.session = nil
	r.res.Channels, r.res.Mismatch = rep.Session.Channels, rep.Mismatch
	return nil
}

// rollback undoes what was started, best effort and bounded in time, so
// the source guest keeps running as before and nothing is left behind.
func (r *run) rollback(cause error) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if r.postcopy && !r.inPostcopy && r.q != nil && r.q.Err() == nil {
		// A switch that the polls did not see, or a migration that
		// completed with postcopy asked for: QEMU leaves such a source in
		// postmigrate, and since the destination may run the guest, the
		// source is left alone either way.
		if st, err := r.q.QueryStatus(ctx); err == nil && (st.Status == "postmigrate" || st.Status == "finish-migrate") {
			r.inPostcopy = true
		}
	}
	if r.inPostcopy {
		// The destination runs the guest from its memory and pulls the
		// rest from the source: cancelling or resuming the source would
		// lose the guest's state. Both QEMUs stay as they are.
		r.releaseSession(ctx, cause)
		return
	}
	if r.q != nil && r.q.Err() == nil {
		if r.migrating {
			r.q.MigrateCancel(ctx)
			wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
			r.q.WaitMigration(wctx, pollInterval, nil)
			wcancel()
		}
		for _, d := range r.disks {
			if d.mirr && r.q.BlockJobCancel(ctx, d.job, true) == nil {
				r.q.WaitBlockJobGone(ctx, d.job, pollInterval)
			}
		}
		for _, d := range r.disks {
			if d.added || d.mirr {
				r.q.BlockdevDel(ctx, d.target)
			}
		}
		// A migration that completed paused the source; while the
		// destination has not taken over, the source goes on.
		if r.wasRunning && !r.finished {
			if st, err := r.q.QueryStatus(ctx); err == nil && !st.Running {
				r.q.Cont(ctx)
			}
		}
	}
	r.releaseSession(ctx, cause)
}

// releaseSession tells the destination to give up the VM and aborts the
// session.
func (r *run) releaseSession(ctx context.Context, cause error) {
	if r.session == nil {
		return
	}
	reason := cause.Error()
	if r.vmPrepared {
		r.dest.abort(ctx, reason)
	}
	r.ctl.Abort(ctx, r.session.ID, reason)
}
