package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// migtunBin is the migtun binary TestMain builds for the tests and
// benchmarks of this package.
var migtunBin string

func TestMain(m *testing.M) {
	os.Exit(runMain(m)) // TestMain's exit
}

// runMain builds migtun, or uses the binary MIGTUN_BENCH_BIN names.
func runMain(m *testing.M) int {
	if bin := os.Getenv("MIGTUN_BENCH_BIN"); bin != "" {
		migtunBin = bin
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "migtun-bench-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	migtunBin = filepath.Join(dir, "migtun")
	if out, err := exec.Command("go", "build", "-o", migtunBin, "../cmd/migtun").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building migtun: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

// TestBenchCommand runs a tiny "migtun bench" end to end, as JSON and as
// a table, and checks that every path moved exactly the bytes sent.
func TestBenchCommand(t *testing.T) {
	const size = 32 << 20
	svg := filepath.Join(t.TempDir(), "bench.svg")
	cmd := exec.Command(migtunBin, "bench", "--transport", "tls,plain", "--streams", "1", "--size", "32MiB",
		"--baselines", "direct", "--json", "--svg", svg)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("migtun bench: %v\nstdout:\n%s\nstderr:\n%s", err, out, stderr.String())
	}
	var rep Report
	if err := json.Unmarshal(out, &rep); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, out)
	}
	want := []string{"direct", "migtun/tls/1", "migtun/plain/1"}
	if len(rep.Results) != len(want) {
		t.Fatalf("got %d results, want %v:\n%s", len(rep.Results), want, out)
	}
	for i, r := range rep.Results {
		if r.Path != want[i] {
			t.Errorf("result %d is %q, want %q", i, r.Path, want[i])
		}
		if !r.OK() {
			t.Errorf("%s: not measured: %s%s", r.Path, r.Skipped, r.Err)
			continue
		}
		if r.Sent != size || r.Bytes != size {
			t.Errorf("%s: sent %d, sink counted %d, want %d both", r.Path, r.Sent, r.Bytes, size)
		}
		if r.MBps <= 0 || r.CPUPerGB <= 0 {
			t.Errorf("%s: MB/s %v, CPU s/GB %v: want both positive", r.Path, r.MBps, r.CPUPerGB)
		}
		if r.Path != "direct" && r.RelayCPUSeconds <= 0 {
			t.Errorf("%s: no CPU time measured for the migtun processes", r.Path)
		}
	}
	if n := len(rep.Ratios); n != 2 {
		t.Errorf("got %d ratios, want 2 (tls and plain against direct): %+v", n, rep.Ratios)
	}
	for _, s := range []string{"[3/3] migtun/plain/1: 33.6 MB"} {
		if !strings.Contains(stderr.String(), s) {
			t.Errorf("stderr lacks progress %q:\n%s", s, stderr.String())
		}
	}
	b, err := os.ReadFile(svg)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(b, []byte("<svg ")) || !bytes.Contains(b, []byte("migtun/tls/1")) || !bytes.HasSuffix(b, []byte("</svg>\n")) {
		t.Errorf("the SVG does not look like the chart:\n%.300s", b)
	}

	// The table, for people.
	out, err = exec.Command(migtunBin, "bench", "--transport", "plain", "--streams", "2", "--size", "8MiB", "--baselines", "direct").Output()
	if err != nil {
		t.Fatalf("migtun bench (table): %v\n%s", err, out)
	}
	for _, s := range []string{"path", "MB/s", "CPU s/GB", "direct", "migtun/plain/2", "direct", "targets:"} {
		if !strings.Contains(string(out), s) {
			t.Errorf("table lacks %q:\n%s", s, out)
		}
	}
}

// TestBenchFlags checks that bad flags are refused with the flag named.
func TestBenchFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--transport", "udp"}, "--transport"},
		{[]string{"--streams", "0"}, "--streams"},
		{[]string{"--streams", "x"}, "--streams"},
		{[]string{"--size", "lots"}, "--size"},
		{[]string{"--baselines", "netcat"}, "--baselines"},
		{[]string{"--svg", "/nonexistent/dir/b.svg"}, "--svg"},
	} {
		out, err := exec.Command(migtunBin, append([]string{"bench"}, tc.args...)...).CombinedOutput()
		if err == nil {
			t.Errorf("%v: accepted", tc.args)
			continue
		}
		if !strings.Contains(string(out), tc.want) {
			t.Errorf("%v: error does not name %s:\n%s", tc.args, tc.want, out)
		}
	}
}

// TestRunCountsLoss checks that a path that loses bytes fails its
// measurement instead of reporting a speed: here a relay hop that quits
// early (stunnel-like) is imitated by a path that never forwards.
func TestRunCountsLoss(t *testing.T) {
	cfg := Config{Size: 1 << 20, Stall: 500 * time.Millisecond, Dir: t.TempDir()}
	p := path{name: "black-hole", streams: 1, setup: func(e *env) ([]string, []*proc, error) {
		entry := filepath.Join(e.dir, "hole.sock")
		sk, err := newSink(entry, 1<<62) // swallows everything, forwards nothing
		if err != nil {
			return nil, nil, err
		}
		t.Cleanup(sk.close)
		return []string{entry}, nil, nil
	}}
	e := &env{cfg: &cfg, dir: cfg.Dir, channels: []channel{{benchChannel, filepath.Join(cfg.Dir, "sink.sock")}}}
	r := measure(context.Background(), &cfg, p, e, 1, 1)
	if r.OK() || !strings.Contains(r.Err, "stalled: 0 of 1048576") {
		t.Fatalf("a path that delivers nothing was measured: %+v", r)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{
		"4GiB": 4 << 30, "512MiB": 512 << 20, "512mib": 512 << 20, "1GB": 1e9, "64KiB": 64 << 10,
		"1000": 1000, "1.5GiB": 3 << 29, "2G": 2 << 30, "7B": 7,
	} {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
		if err == nil && want%1024 == 0 {
			if back, _ := ParseSize(FormatSize(got)); back != got {
				t.Errorf("FormatSize(%d) = %q does not parse back", got, FormatSize(got))
			}
		}
	}
	for _, in := range []string{"", "GiB", "-1GiB", "0", "four", "1e30GiB"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) accepted", in)
		}
	}
}

func TestParseStatCPU(t *testing.T) {
	// pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime ...
	line := "42 (a) b) c) S 1 42 42 0 -1 4194304 100 0 0 0 250 50 7 3 20 0 1 0\n"
	got, err := parseStatCPU(line)
	if err != nil || got != 3100*time.Millisecond {
		t.Fatalf("parseStatCPU = %v, %v; want 3.1s", got, err)
	}
	if _, err := parseStatCPU("42 (x) S 1"); err == nil {
		t.Fatal("a short stat line was accepted")
	}
}

// BenchmarkPath pushes a small volume through each path once per
// iteration: "go test -run '^$' -bench . -benchtime 1x ./bench/" keeps the
// paths from rotting. ns/op and MB/s include starting the path's
// processes; path-MB/s and cpu-s/GB are the transfer alone, as
// "migtun bench" reports them.
func BenchmarkPath(b *testing.B) {
	const size = 64 << 20
	type c struct {
		name string
		cfg  Config
	}
	var cases []c
	for _, bl := range []string{Direct, GoTLSRelay, QUICGoNaive} {
		cases = append(cases, c{bl, Config{Baselines: []string{bl}}})
	}
	for _, tr := range Transports {
		for _, n := range []int{1, 4} {
			cases = append(cases, c{fmt.Sprintf("migtun-%s-%d", tr, n), Config{Transports: []string{tr}, Streams: []int{n}}})
		}
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			cfg := tc.cfg
			cfg.Migtun, cfg.Size, cfg.Stall = migtunBin, size, 10*time.Second
			b.SetBytes(size)
			var mbps, cpu float64
			for b.Loop() {
				res, err := Run(context.Background(), cfg)
				if err != nil {
					b.Fatal(err)
				}
				if len(res) != 1 || !res[0].OK() {
					b.Fatalf("not measured: %+v", res)
				}
				mbps += res[0].MBps
				cpu += res[0].CPUPerGB
			}
			b.ReportMetric(mbps/float64(b.N), "path-MB/s")
			b.ReportMetric(cpu/float64(b.N), "cpu-s/GB")
		})
	}
}
