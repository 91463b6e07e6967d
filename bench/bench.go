package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/migtun/migtun/internal/linkemu"
)

// Baseline names, in the order they run.
const (
	Direct      = "direct"
	GoTLSRelay  = "go-tls-relay"
	QUICGoNaive = "quic-go-naive"
	Socat       = "socat"
	// SocatCubic is socat with cubic, the congestion control most
	// distributions default to, set on both its TCP sockets.
	SocatCubic = "socat-cubic"
	Stunnel    = "stunnel"
)

// AllBaselines lists every baseline, in the order they run.
var AllBaselines = []string{Direct, GoTLSRelay, QUICGoNaive, Socat, SocatCubic, Stunnel}

// Guest contents of a QEMU run (Config.Guest).
const (
	// GuestRandom is random RAM and disk: nothing compresses.
	GuestRandom = "random"
	// GuestCompressible has three quarters of each page a repeated text,
	// as code and text pages compress.
	GuestCompressible = "compressible"
)

// Transports lists the migtun transports a run may measure.
var Transports = []string{"tls", "quic", "plain"}

// DefaultSize is the volume pushed through each path when Config.Size is 0.
const DefaultSize = 4 << 30

// DefaultStall is how long a path may move no byte before it is declared
// failed, when Config.Stall is 0.
const DefaultStall = 30 * time.Second

// Config says what a run measures. The zero value of every field but
// Migtun is a useful default.
type Config struct {
	// Migtun is the migtun binary: it runs the migtun paths and the Go
	// relay helpers ("migtun bench --internal-relay"). Required unless
	// only the direct and socat/stunnel baselines are asked for.
	Migtun string
	// Transports are the migtun transports to measure: tls, quic, plain.
	Transports []string
	// Streams are the stream counts to measure each transport with
	// (default 1).
	Streams []int
	// Baselines are the baseline paths to measure, see AllBaselines. They
	// run with one stream.
	Baselines []string
	// Size is the volume pushed through each path, in bytes (default
	// DefaultSize).
	Size int64
	// Dir is where the run's sockets, certificates and logs go; a fresh
	// temporary directory, removed at the end, when empty.
	Dir string
	// Stall fails a path that moves no byte for this long (default
	// DefaultStall).
	Stall time.Duration
	// Progress, when set, is called about every 250ms while a path runs,
	// and once when it ends.
	Progress func(Progress)
	// Link, when set, is the emulated link every path crosses (see
	// StartLink): each path's first hop runs in the link's namespace A,
	// its second in B, and they talk over the link; the load generator
	// stays outside. The direct baseline is skipped.
	Link *linkemu.Link
	// ServeArgs are more flags for every "migtun serve" of the migtun
	// paths (e.g. --tcp-congestion cubic), to compare settings.
	ServeArgs []string
	// Disk, for RunQEMU, is the size of the guest disk copied with the
	// migration (a mirror over NBD, as "--copy-storage all" does); 0
	// migrates RAM and device state only.
	Disk int64
	// Guest, for RunQEMU, is what the guest's RAM and disk hold: GuestRandom
	// (the default, also for "") or GuestCompressible.
	Guest string
	// MultifdCompression, for RunQEMU, is QEMU's multifd-compression on
	// the migtun paths with multifd (none, zlib, zstd); empty keeps QEMU's.
	MultifdCompression string
	// Limit, when set, cuts a path short after this long: its Result holds
	// the bytes the sink counted by then and is marked Partial. A run
	// across a slow or lossy link uses it so that one stalled baseline
	// does not take an hour.
	Limit time.Duration
}

// Progress is the state of the path being measured.
type Progress struct {
	Path    string
	Index   int // 1-based position of the path in the run
	Total   int // paths in the run
	Bytes   int64
	Size    int64
	Elapsed time.Duration
	Done    bool
}

// Result is the measurement of one path.
type Result struct {
	Path      string `json:"path"`
	Baseline  bool   `json:"baseline"`
	Transport string `json:"transport,omitempty"`
	Streams   int    `json:"streams"`
	// Sent is the bytes the sender wrote; Bytes the bytes counted at the
	// sink. They differ only when a path lost or invented bytes, which is
	// reported in Err.
	Sent  int64 `json:"bytes_sent"`
	Bytes int64 `json:"bytes_received"`
	// DiskBytes is the part of Bytes a QEMU run's disk mirror copied;
	// MirrorSeconds the part of Seconds until the mirror was in sync,
	// MigrationSeconds the time from migrate until the destination had
	// the RAM.
	DiskBytes        int64   `json:"disk_bytes,omitempty"`
	MirrorSeconds    float64 `json:"mirror_seconds,omitempty"`
	MigrationSeconds float64 `json:"migration_seconds,omitempty"`
	Seconds          float64 `json:"seconds"`
	// MBps is Bytes/Seconds in 10^6 bytes per second.
	MBps float64 `json:"mb_per_s"`
	// CPUSeconds is the CPU time of every process of the path, the
	// in-process load generator (sender and sink) included.
	CPUSeconds float64 `json:"cpu_seconds"`
	// RelayCPUSeconds is the CPU time of the path's own processes only
	// (the two hops), without the load generator; 0 for direct.
	RelayCPUSeconds float64 `json:"relay_cpu_seconds"`
	// CPUPerGB and RelayCPUPerGB are the same per 10^9 bytes moved.
	CPUPerGB      float64 `json:"cpu_s_per_gb"`
	RelayCPUPerGB float64 `json:"relay_cpu_s_per_gb"`
	// Partial says the path was cut short by Config.Limit: Bytes is what
	// had arrived by then, and MBps the rate until then.
	Partial bool `json:"partial,omitempty"`
	// Skipped says why the path was not measured (a tool not installed).
	Skipped string `json:"skipped,omitempty"`
	// Err says why the measurement failed.
	Err string `json:"error,omitempty"`
}

// setFigures records bytes moved in wall, the path's own CPU time relay
// and the load generator's self, and the rates derived from them.
func (r *Result) setFigures(bytes int64, wall, relay, self time.Duration) {
	r.Bytes, r.Seconds = bytes, wall.Seconds()
	r.RelayCPUSeconds = relay.Seconds()
	r.CPUSeconds = r.RelayCPUSeconds + self.Seconds()
	if r.Seconds > 0 {
		r.MBps = float64(r.Bytes) / 1e6 / r.Seconds
	}
	if r.Bytes > 0 {
		gb := float64(r.Bytes) / 1e9
		r.CPUPerGB, r.RelayCPUPerGB = r.CPUSeconds/gb, r.RelayCPUSeconds/gb
	}
}

// OK reports whether r holds a measurement.
func (r Result) OK() bool { return r.Skipped == "" && r.Err == "" && r.Seconds > 0 }

// path is one thing to measure.
type path struct {
	name      string
	baseline  bool
	transport string
	streams   int
	skip      string
	// setup starts the path's processes: bytes written to entries[i] must
	// come out at env.channels[i].sink.
	setup func(env *env) (entries []string, procs []*proc, err error)
}

// channel is one kind of stream a path carries: its name on migtun's wire
// (the channel of the route and the forward) and the socket its bytes
// must come out at.
type channel struct {
	name string
	sink string
}

// benchChannel carries the bytes of Run, and QEMU's migration streams.
const benchChannel = "bench"

// env is what a path's setup works with.
type env struct {
	cfg      *Config
	dir      string    // this path's directory
	channels []channel // the streams to carry; the first is the main one
	pki      func() (*pki, error)
	link     *linkemu.Link // nil on loopback
}

// sink is the socket of the main channel.
func (e *env) sink() string { return e.channels[0].sink }

// perChannel makes a setup that runs one pair of hops for each channel of
// its env: one(e, ch, entry) starts hops that carry what is written to
// entry to ch.sink.
func perChannel(one func(e *env, ch channel, entry string) ([]*proc, error)) func(*env) ([]string, []*proc, error) {
	return func(e *env) ([]string, []*proc, error) {
		var entries []string
		var procs []*proc
		for _, ch := range e.channels {
			entry := filepath.Join(e.dir, ch.name+"-src.sock")
			ps, err := one(e, ch, entry)
			procs = append(procs, ps...)
			if err != nil {
				return nil, procs, err
			}
			entries = append(entries, entry)
		}
		return entries, procs, nil
	}
}

// host returns the address side's hop listens on: the link's, or loopback.
func (e *env) host(s linkemu.Side) string {
	if e.link == nil {
		return "127.0.0.1"
	}
	return e.link.Addr(s)
}

// exec returns argv to run on side of the link (unchanged on loopback).
func (e *env) exec(s linkemu.Side, argv ...string) []string {
	if e.link == nil {
		return argv
	}
	return e.link.Exec(s, argv...)
}

// ConfigError is a bad Config field; Field names it as the flag of
// "migtun bench" does (transport, streams, baselines, size).
type ConfigError struct {
	Field string
	Msg   string
}

func (e *ConfigError) Error() string { return e.Field + ": " + e.Msg }

// Validate checks cfg and returns a *ConfigError for the first bad field.
func (cfg *Config) Validate() error {
	for _, t := range cfg.Transports {
		if !slices.Contains(Transports, t) {
			return &ConfigError{"transport", fmt.Sprintf("%q: want tls, quic or plain", t)}
		}
	}
	for _, n := range cfg.Streams {
		if n < 1 || n > 256 {
			return &ConfigError{"streams", fmt.Sprintf("%d: want 1 to 256", n)}
		}
	}
	for _, b := range cfg.Baselines {
		if !slices.Contains(AllBaselines, b) {
			return &ConfigError{"baselines", fmt.Sprintf("%q: want one of %v", b, AllBaselines)}
		}
	}
	if cfg.Size < 0 {
		return &ConfigError{"size", fmt.Sprintf("%d: want a positive volume", cfg.Size)}
	}
	if cfg.Guest != "" && cfg.Guest != GuestRandom && cfg.Guest != GuestCompressible {
		return &ConfigError{"guest", fmt.Sprintf("%q: want %s or %s", cfg.Guest, GuestRandom, GuestCompressible)}
	}
	switch cfg.MultifdCompression {
	case "", "none", "zlib", "zstd":
	default:
		return &ConfigError{"multifd-compression", fmt.Sprintf("%q: want none, zlib or zstd", cfg.MultifdCompression)}
	}
	if cfg.Disk < 0 || cfg.Disk%512 != 0 {
		return &ConfigError{"disk", fmt.Sprintf("%d: want a multiple of 512 bytes", cfg.Disk)}
	}
	if len(cfg.Transports) == 0 && len(cfg.Baselines) == 0 {
		return &ConfigError{"transport", "and --baselines are both empty: nothing to measure"}
	}
	return nil
}

// plan lists the paths of a run in order: baselines first, then each
// transport with each stream count.
func (cfg *Config) plan() []path {
	var ps []path
	for _, b := range AllBaselines {
		if slices.Contains(cfg.Baselines, b) {
			p := baselinePath(b)
			if b == Direct && cfg.Link != nil {
				p.skip = "no network hop to put on the link"
			}
			ps = append(ps, p)
		}
	}
	streams := cfg.Streams
	if len(streams) == 0 {
		streams = []int{1}
	}
	for _, t := range cfg.Transports {
		for _, n := range streams {
			ps = append(ps, migtunPath(t, n))
		}
	}
	return ps
}

// Run measures every path cfg asks for, one after the other, and returns
// one Result per path. A path that fails or is skipped says so in its
// Result; Run returns an error only for a bad Config, a cancelled ctx or a
// run directory it cannot make.
func Run(ctx context.Context, cfg Config) ([]Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Size == 0 {
		cfg.Size = DefaultSize
	}
	if cfg.Stall == 0 {
		cfg.Stall = DefaultStall
	}
	return runPaths(ctx, &cfg, []string{benchChannel}, measure)
}

// measureFunc measures path p, the index-th of total, in e.
type measureFunc func(ctx context.Context, cfg *Config, p path, e *env, index, total int) Result

// runPaths measures each path of cfg's plan in turn, each in a directory
// of its own under cfg.Dir (a temporary directory, removed at the end,
// when empty), carrying the channels named (a sink socket "NAME.sock"
// each, there).
func runPaths(ctx context.Context, cfg *Config, channels []string, measure measureFunc) ([]Result, error) {
	dir := cfg.Dir
	if dir == "" {
		d, err := os.MkdirTemp("", "migtun-bench-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(d)
		dir = d
	}
	sans := []string{"127.0.0.1"}
	if cfg.Link != nil {
		sans = append(sans, cfg.Link.Addr(linkemu.A), cfg.Link.Addr(linkemu.B))
	}
	getPKI := sync.OnceValues(func() (*pki, error) { return makePKI(cfg.Migtun, filepath.Join(dir, "pki"), sans) })
	paths := cfg.plan()
	var results []Result
	for i, p := range paths {
		if err := ctx.Err(); err != nil {
			return results, err
		}
		pdir := filepath.Join(dir, strconv.Itoa(i))
		if err := os.MkdirAll(pdir, 0o700); err != nil {
			return results, err
		}
		e := &env{cfg: cfg, dir: pdir, pki: getPKI, link: cfg.Link}
		for _, c := range channels {
			e.channels = append(e.channels, channel{name: c, sink: filepath.Join(pdir, c+".sock")})
		}
		results = append(results, measure(ctx, cfg, p, e, i+1, len(paths)))
	}
	return results, ctx.Err()
}

// measure runs one path.
func measure(ctx context.Context, cfg *Config, p path, e *env, index, total int) (res Result) {
	res = Result{Path: p.name, Baseline: p.baseline, Transport: p.transport, Streams: p.streams}
	if p.skip != "" {
		res.Skipped = p.skip
		return res
	}
	sk, err := newSink(e.sink(), cfg.Size)
	if err != nil {
		res.Err = err.Error()
		return res
	}
	defer sk.close()
	entries, procs, err := p.setup(e)
	defer func() {
		for _, pr := range procs {
			pr.stop(5 * time.Second)
		}
	}()
	if err != nil {
		res.Err = err.Error()
		return res
	}
	entry := entries[0]
	report := func(done bool, elapsed time.Duration) {
		if cfg.Progress != nil {
			cfg.Progress(Progress{Path: p.name, Index: index, Total: total, Bytes: sk.bytes.Load(),
				Size: cfg.Size, Elapsed: elapsed, Done: done})
		}
	}
	pathCPU := func() time.Duration {
		var sum time.Duration
		for _, pr := range procs {
			sum += pr.cpu()
		}
		return sum
	}

	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	relay0, self0 := pathCPU(), selfCPU()
	start := time.Now()
	var sent atomic.Int64
	senderDone := make(chan error, 1)
	go func() { senderDone <- send(sctx, entry, p.streams, cfg.Size, &sent, sk.full) }()

	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	var limit <-chan time.Time
	if cfg.Limit > 0 {
		t := time.NewTimer(cfg.Limit)
		defer t.Stop()
		limit = t.C
	}
	var (
		sendErr   error
		sendEnded bool
		lastBytes int64
		lastMove  = start
	)
	for sk.bytes.Load() < cfg.Size {
		select {
		case <-ctx.Done():
			cancel()
			if !sendEnded {
				<-senderDone
			}
			res.Err = ctx.Err().Error()
			return res
		case sendErr = <-senderDone:
			sendEnded = true
			senderDone = nil
			if sendErr != nil {
				res.Err = sendErr.Error()
				return res
			}
		case now := <-tick.C:
			b := sk.bytes.Load()
			if b != lastBytes {
				lastBytes, lastMove = b, now
			} else if now.Sub(lastMove) > cfg.Stall {
				cancel()
				if !sendEnded {
					<-senderDone
				}
				res.Err = fmt.Sprintf("stalled: %d of %d bytes at the sink, none for %s%s", b, cfg.Size, cfg.Stall, procTails(procs))
				return res
			}
			report(false, now.Sub(start))
		case <-sk.full:
		case <-limit:
			b := sk.bytes.Load()
			wall := time.Since(start)
			cancel()
			if !sendEnded {
				<-senderDone
			}
			report(true, wall)
			res.Partial, res.Sent, res.Bytes, res.Seconds = true, sent.Load(), b, wall.Seconds()
			res.MBps = float64(b) / 1e6 / wall.Seconds()
			return res
		}
		if err := sk.firstErr(); err != nil {
			res.Err = err.Error()
			return res
		}
	}
	// The sink has counted the last byte: the transfer is over.
	relay1, self1 := pathCPU(), selfCPU()
	wall := sk.fullAt().Sub(start)
	if !sendEnded {
		sendErr = <-senderDone
	}
	// Give a path that would invent bytes a moment to show it.
	time.Sleep(50 * time.Millisecond)
	report(true, wall)

	res.Sent = sent.Load()
	res.setFigures(sk.bytes.Load(), wall, relay1-relay0, self1-self0)
	switch {
	case sendErr != nil:
		res.Err = sendErr.Error()
	case res.Sent != res.Bytes:
		res.Err = fmt.Sprintf("sent %d bytes but the sink counted %d", res.Sent, res.Bytes)
	}
	return res
}

// procTails returns the last log lines of each process, for an error.
func procTails(procs []*proc) string {
	var s string
	for _, p := range procs {
		s += "\n--- " + p.name + ":\n" + p.tail(5)
	}
	return s
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// pki is the certificate directory of a run, made with "migtun certs".
type pki struct {
	ca, cert, key   string // the destination host's (dst) certificate
	srcCert, srcKey string
}

func makePKI(migtun, dir string, sans []string) (*pki, error) {
	if migtun == "" {
		return nil, errors.New("no migtun binary given (Config.Migtun)")
	}
	var san []string
	for _, s := range sans {
		san = append(san, "--san", s)
	}
	for _, args := range [][]string{
		{"certs", "init", "--dir", dir},
		append([]string{"certs", "issue", "--dir", dir, "--name", "dst"}, san...),
		append([]string{"certs", "issue", "--dir", dir, "--name", "src"}, san...),
	} {
		if out, err := exec.Command(migtun, args...).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("migtun %v: %v: %s", args, err, out)
		}
	}
	j := func(n string) string { return filepath.Join(dir, n) }
	return &pki{ca: j("ca.crt"), cert: j("dst.crt"), key: j("dst.key"), srcCert: j("src.crt"), srcKey: j("src.key")}, nil
}
