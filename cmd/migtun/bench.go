package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/migtun/migtun/bench"
	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/internal/linkemu"
)

const benchSynopsis = `bench [--qemu [--disk 256MiB] [--guest random|compressible] [--multifd-compression zstd]] [--transport tls,quic,plain] [--streams 1,4] [--size 4GiB]
              [--baselines direct,go-tls-relay,quic-go-naive,socat,stunnel]
              [--link metro|wan|lossy|fat|rtt=40ms,loss=1%,rate=200mbit] [--limit 60s]
              [--serve-flag FLAG]... [--json] [--svg FILE] [--dir DIR]`

// runBench measures the transports and the baselines through real migtun
// processes and prints the table (or JSON).
func runBench(args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "--internal-relay" {
		return runBenchRelay(args, stdout, stderr)
	}
	fs := newFlagSet("bench", benchSynopsis, stderr)
	transports := fs.String("transport", "tls,quic,plain", "comma-separated transports to measure: tls, quic, plain")
	streams := fs.String("streams", "1,4", "comma-separated stream counts to measure each transport with")
	size := fs.String("size", "4GiB", "volume pushed through each path (e.g. 512MiB, 4GiB); with --qemu the guest RAM, default 512MiB")
	qemu := fs.Bool("qemu", false, "migrate a real QEMU guest (paused, random RAM) through each path instead of pushing bytes; migtun paths with N streams use multifd with N channels")
	disk := fs.String("disk", "256MiB", "with --qemu: the random guest disk each migration also copies, mirrored over NBD on a channel of its own as --copy-storage all does; 0 for RAM only")
	guest := fs.String("guest", bench.GuestRandom, "with --qemu: what guest RAM and disk hold: random, or compressible (three quarters of each page a repeated text)")
	compression := fs.String("multifd-compression", "", "with --qemu: QEMU's multifd-compression (none, zlib, zstd) on the migtun paths with multifd")
	baselines := fs.String("baselines", strings.Join(bench.AllBaselines, ","),
		"comma-separated baselines to measure beside migtun (socat and stunnel are skipped when not installed); \"none\" for none")
	asJSON := fs.Bool("json", false, "print the results as JSON instead of a table")
	svg := fs.String("svg", "", "also write a bar chart of the results to FILE (SVG)")
	dir := fs.String("dir", "", "keep sockets, certificates and process logs in DIR (default: a temporary directory, removed)")
	stall := fs.Duration("stall", bench.DefaultStall, "fail a path that moves no byte for this long")
	link := fs.String("link", "", "run every path across an emulated link (needs root): a profile — "+
		strings.Join(linkemu.ProfileNames(), ", ")+" — or settings rtt=40ms,loss=1%,rate=200mbit[,queue=2MB,reorder=0.1%,mtu=1500,seed=1]; default size: 10s at the link rate")
	limit := fs.Duration("limit", 0, "cut a path short after this long and report its rate so far (default with --link: 60s; 0 without: none)")
	var serveFlags listFlag
	fs.Var(&serveFlags, "serve-flag", "a flag for every \"migtun serve\" of the migtun paths, e.g. --serve-flag=--tcp-congestion=cubic (repeatable)")
	peer := fs.String("peer", "", "measure the real path to a peer's migtun serve --bench-sink at HOST:PORT instead (with --cert, --key and --ca of this host)")
	cert := fs.String("cert", "", "with --peer: this host's certificate")
	key := fs.String("key", "", "with --peer: this host's key")
	ca := fs.String("ca", "", "with --peer: the CA")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *peer != "" {
		return benchPeer(*peer, *cert, *key, *ca, *transports, *streams, *size, *asJSON, *stall, serveFlags, stdout, stderr)
	}
	cfg := bench.Config{Transports: splitBenchList(*transports), Stall: *stall, Dir: *dir, ServeArgs: serveFlags, Limit: *limit}
	var linkCfg linkemu.Config
	if *link != "" {
		var err error
		if linkCfg, err = linkemu.ParseProfile(*link); err != nil {
			return fmt.Errorf("bench: --link: %w", err)
		}
		if !flagSet(fs, "size") && !*qemu {
			*size = bench.FormatSize(bench.LinkSize(linkCfg))
		}
		if !flagSet(fs, "limit") && !*qemu {
			cfg.Limit = 60 * time.Second
		}
	}
	var err error
	if cfg.Streams, err = parseStreams(*streams); err != nil {
		return err
	}
	if *baselines != "none" {
		cfg.Baselines = splitBenchList(*baselines)
	}
	if *qemu && !flagSet(fs, "size") {
		*size = bench.FormatSize(bench.DefaultQEMURAM)
	}
	n, err := bench.ParseSize(*size)
	if err != nil {
		return fmt.Errorf("bench: --size: %w", err)
	}
	cfg.Size = n
	for _, f := range []string{"disk", "guest", "multifd-compression"} {
		if flagSet(fs, f) && !*qemu {
			return fmt.Errorf("bench: --%s needs --qemu (it describes the guest a migration moves)", f)
		}
	}
	cfg.Guest, cfg.MultifdCompression = *guest, *compression
	if *qemu && *disk != "0" {
		if cfg.Disk, err = bench.ParseSize(*disk); err != nil {
			return fmt.Errorf("bench: --disk: %w", err)
		}
	}
	if err := cfg.Validate(); err != nil {
		var ce *bench.ConfigError
		if errors.As(err, &ce) {
			return fmt.Errorf("bench: --%s %s", ce.Field, ce.Msg)
		}
		return fmt.Errorf("bench: %w", err)
	}
	if *svg != "" { // fail before the run, not after it
		f, err := os.OpenFile(*svg, os.O_WRONLY|os.O_CREATE, 0o644)
		if err != nil {
			return fmt.Errorf("bench: --svg: %w", err)
		}
		f.Close()
	}
	if cfg.Migtun, err = os.Executable(); err != nil {
		return fmt.Errorf("bench: finding the migtun binary: %w", err)
	}
	cfg.Progress = benchProgress(stderr)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	run, report := bench.Run, bench.NewReport
	if *qemu {
		run, report = bench.RunQEMU, bench.NewQEMUReport
	}
	var linkInfo bench.LinkInfo
	if *link != "" {
		l, li, err := bench.StartLink(ctx, *link, linkCfg)
		if err != nil {
			return fmt.Errorf("bench: --link: %w", err)
		}
		defer l.Close()
		fmt.Fprintf(stderr, "%s\n", li)
		cfg.Link, linkInfo = l, li
	}
	results, err := run(ctx, cfg)
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	rep := report(cfg.Size, results)
	rep.Disk = cfg.Disk
	if *qemu {
		rep.Guest, rep.MultifdCompression = cfg.Guest, cfg.MultifdCompression
	}
	if cfg.Link != nil {
		linkInfo.AddStats(cfg.Link)
		rep.SetLink(linkInfo)
	}
	if *svg != "" {
		f, err := os.Create(*svg)
		if err == nil {
			err = bench.WriteSVG(f, rep)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
		}
		if err != nil {
			return fmt.Errorf("bench: --svg: %w", err)
		}
	}
	return writeBench(stdout, rep, *asJSON)
}

// writeBench prints a report as JSON or a table, and fails if a path did.
func writeBench(w io.Writer, rep bench.Report, asJSON bool) error {
	var err error
	if asJSON {
		err = bench.WriteJSON(w, rep)
	} else {
		err = bench.WriteTable(w, rep)
	}
	if err != nil {
		return err
	}
	for _, r := range rep.Results {
		if r.Err != "" {
			return errors.New("bench: some paths failed")
		}
	}
	return nil
}

// parseStreams reads --streams: comma-separated counts from 1 to 256.
func parseStreams(s string) ([]int, error) {
	var out []int
	for _, f := range splitBenchList(s) {
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 || n > 256 {
			return nil, fmt.Errorf("bench: --streams %q: want comma-separated counts from 1 to 256", s)
		}
		out = append(out, n)
	}
	return out, nil
}

// benchProgress returns a Progress callback that redraws one line on w
// when w is a terminal, and otherwise writes one line per path as it ends.
func benchProgress(w io.Writer) func(bench.Progress) {
	tty := false
	if f, ok := w.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			tty = true
		}
	}
	return func(p bench.Progress) {
		if !tty {
			if p.Done {
				fmt.Fprintf(w, "[%d/%d] %s: %.1f MB in %s\n", p.Index, p.Total, p.Path, float64(p.Bytes)/1e6, p.Elapsed.Round(time.Millisecond))
			}
			return
		}
		rate := 0.0
		if s := p.Elapsed.Seconds(); s > 0 {
			rate = float64(p.Bytes) / 1e6 / s
		}
		fmt.Fprintf(w, "\r\033[K[%d/%d] %-18s %5.1f%% of %s  %6.0f MB/s  %s", p.Index, p.Total, p.Path,
			100*float64(p.Bytes)/float64(p.Size), bench.FormatSize(p.Size), rate, p.Elapsed.Round(100*time.Millisecond))
		if p.Done {
			fmt.Fprintln(w)
		}
	}
}

// splitBenchList splits a comma-separated flag value, dropping empty items.
func splitBenchList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// runBenchRelay runs one hop of a naive baseline relay; "migtun bench"
// starts it as a helper process.
func runBenchRelay(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("bench --internal-relay", "bench --internal-relay MODE --listen ADDR --connect ADDR --cert FILE --key FILE --ca FILE", stderr)
	var cfg bench.RelayConfig
	fs.StringVar(&cfg.Mode, "internal-relay", "", "tls-client, tls-server, quic-client or quic-server")
	fs.StringVar(&cfg.Listen, "listen", "", "unix:PATH, tcp:HOST:PORT or udp:HOST:PORT")
	fs.StringVar(&cfg.Connect, "connect", "", "unix:PATH, tcp:HOST:PORT or udp:HOST:PORT")
	fs.StringVar(&cfg.Cert, "cert", "", "server certificate (PEM)")
	fs.StringVar(&cfg.Key, "key", "", "server key (PEM)")
	fs.StringVar(&cfg.CA, "ca", "", "CA that signed the server certificate (PEM)")
	if err := parse(fs, args); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	return bench.ServeRelay(ctx, cfg, stdout)
}

// benchPeer measures the real path to a peer's bench sink.
func benchPeer(peer, cert, key, ca, transports, streams, size string, asJSON bool, stall time.Duration, serveFlags []string, stdout, stderr io.Writer) error {
	if err := endpoint.CheckHostPort(peer); err != nil {
		return fmt.Errorf("bench: --peer %q: %w", peer, err)
	}
	if err := required("bench --peer", map[string]string{"cert": cert, "key": key, "ca": ca}, "cert", "key", "ca"); err != nil {
		return err
	}
	cfg := bench.PeerConfig{Peer: peer, Cert: cert, Key: key, CA: ca, Transports: splitBenchList(transports), Stall: stall, ServeArgs: serveFlags}
	var err error
	if cfg.Streams, err = parseStreams(streams); err != nil {
		return err
	}
	n, err := bench.ParseSize(size)
	if err != nil {
		return fmt.Errorf("bench: --size: %w", err)
	}
	cfg.Size = n
	if cfg.Migtun, err = os.Executable(); err != nil {
		return fmt.Errorf("bench: finding the migtun binary: %w", err)
	}
	cfg.Progress = benchProgress(stderr)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	results, err := bench.RunPeer(ctx, cfg)
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	return writeBench(stdout, bench.NewPeerReport(cfg.Size, results, peer), asJSON)
}
