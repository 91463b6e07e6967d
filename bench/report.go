package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"strconv"
	"strings"
	"text/tabwriter"
)

// CPUNote says how the CPU columns are measured.
const CPUNote = "CPU s/GB: all processes of the path — the two hops (utime+stime from /proc/PID/stat, children included) " +
	"plus the in-process load generator, sender and sink (getrusage RUSAGE_SELF); relay CPU: the two hops only. " +
	"MB = 10^6 bytes, GB = 10^9 bytes. Baselines run with 1 stream."

// Report modes: what a run measured.
const (
	// ModeStream is Run: a volume of bytes pushed through each path.
	ModeStream = "stream"
	// ModeQEMU is RunQEMU: a real QEMU migration through each path.
	ModeQEMU = "qemu"
)

// Report is the outcome of a run, as "migtun bench --json" prints it.
type Report struct {
	// Mode is ModeStream or ModeQEMU.
	Mode string `json:"mode"`
	// Size is the volume pushed (ModeStream) or the guest RAM (ModeQEMU).
	Size int64 `json:"size_bytes"`
	// Disk is the guest disk a ModeQEMU run copied with each migration;
	// Guest and MultifdCompression are the run's Config.Guest and
	// Config.MultifdCompression.
	Disk               int64    `json:"disk_bytes,omitempty"`
	Guest              string   `json:"guest,omitempty"`
	MultifdCompression string   `json:"multifd_compression,omitempty"`
	Machine            Machine  `json:"machine"`
	CPUNote            string   `json:"cpu_note"`
	Results            []Result `json:"results"`
	Ratios             []Ratio  `json:"ratios"`
	Targets            []Target `json:"targets"`
	// Link is the emulated link the run crossed; nil on loopback.
	Link *LinkInfo `json:"link,omitempty"`
}

// Machine describes where a run happened.
type Machine struct {
	CPUs      int    `json:"cpus"`
	CPUModel  string `json:"cpu_model"`
	Kernel    string `json:"kernel"`
	GoVersion string `json:"go_version"`
}

// Ratio compares one path with one baseline.
type Ratio struct {
	Path     string `json:"path"`
	Baseline string `json:"baseline"`
	// Throughput is path MB/s over baseline MB/s; CPU is path CPU s/GB
	// over baseline CPU s/GB (all processes).
	Throughput float64 `json:"throughput"`
	CPU        float64 `json:"cpu"`
}

// Target is one of the speed targets, checked on a run.
type Target struct {
	Name string `json:"name"`
	// Want is the ratio asked for; AtMost means Got must not exceed it.
	Want   float64 `json:"want"`
	AtMost bool    `json:"at_most,omitempty"`
	Got    float64 `json:"got"`
	Met    bool    `json:"met"`
	// Missing names a path the run did not measure.
	Missing string `json:"missing,omitempty"`
}

// String renders t as "tls/1 vs stunnel ≥ 2.00×: 2.31× met".
func (t Target) String() string {
	op := "≥"
	if t.AtMost {
		op = "≤"
	}
	s := fmt.Sprintf("%s %s %.2f×: ", t.Name, op, t.Want)
	switch {
	case t.Missing != "":
		return s + "not measured (" + t.Missing + ")"
	case t.Met:
		return s + fmt.Sprintf("%.2f× met", t.Got)
	}
	by := (t.Want - t.Got) / t.Want
	if t.AtMost {
		by = (t.Got - t.Want) / t.Want
	}
	return s + fmt.Sprintf("%.2f× missed by %.0f%%", t.Got, 100*by)
}

// NewPeerReport is the report of a RunPeer to peer: no baselines and no
// targets, since only the real path is measured.
func NewPeerReport(size int64, results []Result, peer string) Report {
	r := newReport(size, results, nil)
	r.CPUNote = "CPU s/GB: this host's side of the path — the local migtun serve (utime+stime from /proc/PID/stat) plus the in-process sender (getrusage RUSAGE_SELF); relay CPU: the local migtun serve only. The peer " + peer + " counted every byte (its bench sink reports its count back). MB = 10^6 bytes, GB = 10^9 bytes."
	return r
}

// NewReport computes the ratios and targets of a Run's results.
func NewReport(size int64, results []Result) Report {
	return newReport(size, results, streamTargets)
}

func newReport(size int64, results []Result, specs []targetSpec) Report {
	r := Report{Mode: ModeStream, Size: size, Machine: DescribeMachine(), CPUNote: CPUNote, Results: results}
	for _, p := range results {
		if !p.OK() {
			continue
		}
		for _, b := range results {
			if !b.Baseline || !b.OK() || b.Path == p.Path {
				continue
			}
			r.Ratios = append(r.Ratios, Ratio{Path: p.Path, Baseline: b.Path,
				Throughput: p.MBps / b.MBps, CPU: div(p.CPUPerGB, b.CPUPerGB)})
		}
	}
	r.Targets = targets(results, specs)
	return r
}

func div(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// targetSpec is a target: path's throughput (or, with cpu, its CPU per
// GB, at most want) over base's.
type targetSpec struct {
	name, path, base string
	want             float64
	cpu              bool
}

// streamTargets are the ratios asked of a Run on loopback.
var streamTargets = []targetSpec{
	{"plain/1 throughput vs socat", "migtun/plain/1", Socat, 1.1, false},
	{"plain/1 CPU per GB vs socat", "migtun/plain/1", Socat, 0.9, true},
	{"tls/1 vs stunnel", "migtun/tls/1", Stunnel, 2, false},
	{"tls/1 vs go-tls-relay", "migtun/tls/1", GoTLSRelay, 1.5, false},
	{"tls/4 vs tls/1", "migtun/tls/4", "migtun/tls/1", 1.2, false},
	{"quic/1 vs quic-go-naive", "migtun/quic/1", QUICGoNaive, 3, false},
	{"quic/1 vs tls/1", "migtun/quic/1", "migtun/tls/1", 0.6, false},
}

// targets checks specs on results.
func targets(results []Result, specs []targetSpec) []Target {
	find := func(name string) (Result, bool) {
		for _, r := range results {
			if r.Path == name && r.OK() {
				return r, true
			}
		}
		return Result{}, false
	}
	var out []Target
	for _, s := range specs {
		t := Target{Name: s.name, Want: s.want, AtMost: s.cpu}
		p, ok1 := find(s.path)
		b, ok2 := find(s.base)
		switch {
		case !ok1:
			t.Missing = s.path
		case !ok2:
			t.Missing = s.base
		case s.cpu:
			t.Got = div(p.CPUPerGB, b.CPUPerGB)
			t.Met = t.Got <= t.Want
		default:
			t.Got = p.MBps / b.MBps
			t.Met = t.Got >= t.Want
		}
		out = append(out, t)
	}
	return out
}

// DescribeMachine reads the CPU count and model, the kernel and the Go
// version.
func DescribeMachine() Machine {
	m := Machine{CPUs: runtime.NumCPU(), GoVersion: runtime.Version()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	return m
}

// WriteJSON writes r as indented JSON.
func WriteJSON(w io.Writer, r Report) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteTable writes r as a table for people, with the ratios against each
// baseline and the targets.
func WriteTable(w io.Writer, r Report) error {
	m := r.Machine
	what := " through each path"
	if r.Mode == ModeQEMU {
		what = " of guest RAM migrated by QEMU through each path"
		if r.Disk > 0 {
			what = " of guest RAM and a " + FormatSize(r.Disk) + " disk (--copy-storage all) migrated by QEMU through each path"
		}
		if r.Guest == GuestCompressible {
			what += "; a compressible guest"
		}
		if r.MultifdCompression != "" {
			what += "; multifd-compression " + r.MultifdCompression
		}
	}
	fmt.Fprintf(w, "%s%s; %d CPUs, %s, Linux %s, %s\n\n", FormatSize(r.Size), what, m.CPUs, m.CPUModel, m.Kernel, m.GoVersion)
	if r.Link != nil {
		fmt.Fprintf(w, "%s\n\n", r.Link)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "path\tMB/s\tCPU s/GB\trelay CPU s/GB\t\tthroughput vs baselines")
	for _, p := range r.Results {
		switch {
		case p.Skipped != "":
			fmt.Fprintf(tw, "%s\t-\t-\t-\t\tskipped: %s\n", p.Path, p.Skipped)
			continue
		case p.Err != "":
			fmt.Fprintf(tw, "%s\t-\t-\t-\t\tfailed: %s\n", p.Path, firstLine(p.Err))
			continue
		}
		var rs []string
		for _, x := range r.Ratios {
			if x.Path == p.Path {
				rs = append(rs, fmt.Sprintf("×%s %s", ratio(x.Throughput), x.Baseline))
			}
		}
		if p.Partial {
			rs = append(rs, fmt.Sprintf("(cut short after %.0fs, %s arrived)", p.Seconds, FormatSize(p.Bytes&^(1<<20-1))))
		}
		rate := mbps(p.MBps)
		cpu, relayCPU := fmt.Sprintf("%.2f", p.CPUPerGB), fmt.Sprintf("%.2f", p.RelayCPUPerGB)
		if p.Partial { // not sampled when a path is cut short
			cpu, relayCPU = "-", "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t\t%s\n", p.Path, rate, cpu, relayCPU, strings.Join(rs, "  "))
	}
	tw.Flush()
	fmt.Fprintf(w, "\n%s\n", r.CPUNote)
	if len(r.Targets) > 0 {
		fmt.Fprintf(w, "\ntargets:\n")
	}
	for _, t := range r.Targets {
		fmt.Fprintf(w, "  %s\n", t)
	}
	for _, p := range r.Results {
		if p.Err != "" && strings.Contains(p.Err, "\n") {
			fmt.Fprintf(w, "\n%s failed:\n%s\n", p.Path, p.Err)
		}
	}
	return nil
}

// mbps renders a rate for the table and the chart: whole MB/s, two
// decimals below 10.
func mbps(v float64) string {
	if v < 10 {
		return fmt.Sprintf("%.2f", v)
	}
	return fmt.Sprintf("%.0f", v)
}

func ratio(x float64) string {
	if x >= 10 {
		return strconv.FormatFloat(x, 'f', 0, 64)
	}
	return strconv.FormatFloat(x, 'f', 2, 64)
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}

// ParseSize reads a volume such as 4GiB, 512MiB, 1.5GB, 64KiB or 1000.
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	units := []struct {
		suffix string
		mult   float64
	}{
		{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
		{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
		{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"T", 1 << 40}, {"B", 1},
	}
	mult := 1.0
	for _, u := range units { // longest suffixes first: "GIB" before "B"
		if strings.HasSuffix(strings.ToUpper(t), strings.ToUpper(u.suffix)) {
			mult = u.mult
			t = strings.TrimSpace(t[:len(t)-len(u.suffix)])
			break
		}
	}
	v, err := strconv.ParseFloat(t, 64)
	if err != nil || v <= 0 || math.IsInf(v, 0) || math.IsNaN(v) || v*mult > 1<<50 {
		return 0, fmt.Errorf("size %q: want a positive volume such as 512MiB, 4GiB or 1GB", s)
	}
	return int64(v * mult), nil
}

// FormatSize renders n bytes in binary units, as ParseSize reads them.
func FormatSize(n int64) string {
	for _, u := range []struct {
		s string
		m int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if n >= u.m && n%(u.m/1024) == 0 {
			return strconv.FormatFloat(float64(n)/float64(u.m), 'f', -1, 64) + u.s
		}
	}
	return strconv.FormatInt(n, 10) + "B"
}
