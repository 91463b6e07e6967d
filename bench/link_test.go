package bench

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestBenchAcrossLink runs "migtun bench --link" with every migtun
// transport and every baseline across a small lossy link, and checks that
// each path moved exactly the bytes sent across it, and that the report
// describes the link.
func TestBenchAcrossLink(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("bench --link needs root (required when CI=true)")
		}
		t.Skip("bench --link needs root")
	}
	const size = 8 << 20
	cmd := exec.Command(migtunBin, "bench", "--link", "rtt=4ms,loss=0.2%,rate=200mbit", "--transport", "tls,quic,plain",
		"--streams", "1", "--size", "8MiB", "--baselines", strings.Join(AllBaselines, ","), "--json")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("migtun bench --link: %v\nstdout:\n%s\nstderr:\n%s", err, out, stderr.String())
	}
	var rep Report
	if err := json.Unmarshal(out, &rep); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, out)
	}
	if rep.Link == nil || rep.Link.RTTms != 4 || rep.Link.RateMbit != 200 || rep.Link.Packets == 0 || rep.Link.Dropped == 0 {
		t.Errorf("the report does not describe the lossy link crossed: %+v", rep.Link)
	}
	for _, r := range rep.Results {
		switch {
		case r.Path == Direct:
			if r.Skipped == "" {
				t.Errorf("direct was measured across a link: %+v", r)
			}
		case r.Skipped != "":
			t.Logf("%s skipped: %s", r.Path, r.Skipped)
		case !r.OK() || r.Partial:
			t.Errorf("%s: not measured across the link: %s", r.Path, r.Err)
		case r.Sent != size || r.Bytes != size:
			t.Errorf("%s: sent %d, sink counted %d, want %d both", r.Path, r.Sent, r.Bytes, size)
		}
	}
	if len(rep.Results) != len(AllBaselines)+3 {
		t.Errorf("got %d results, want %d", len(rep.Results), len(AllBaselines)+3)
	}
}

// TestLinkSVG: the chart of a run across a link names the link, draws its
// rate, marks a path cut short, and is well-formed XML.
func TestLinkSVG(t *testing.T) {
	rep := NewReport(64<<20, []Result{
		{Path: "migtun/tls/1", Transport: "tls", Streams: 1, Sent: 1e8, Bytes: 1e8, Seconds: 2, MBps: 50, CPUPerGB: 1.5, RelayCPUPerGB: 1},
		{Path: SocatCubic, Baseline: true, Streams: 1, Bytes: 1e6, Seconds: 60, MBps: 1.6, Partial: true},
	})
	rep.SetLink(LinkInfo{Profile: "wan", Description: "wan: rtt 40ms, loss 0.1%, 400 Mbit/s", RTTms: 40, RateMbit: 400})
	var b bytes.Buffer
	if err := WriteSVG(&b, rep); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"across the emulated link wan: rtt 40ms", "link rate", "1.60 †", ">50<"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("the chart lacks %q", want)
		}
	}
	d := xml.NewDecoder(&b)
	for {
		if _, err := d.Token(); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("not well-formed: %v", err)
		}
	}
}
