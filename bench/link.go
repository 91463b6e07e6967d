package bench

import (
	"context"
	"fmt"
	"time"

	"github.com/migtun/migtun/internal/linkemu"
)

// LinkInfo describes the emulated link a run crossed and what its
// self-check measured before the first path.
type LinkInfo struct {
	// Profile is the link as given (wan, rtt=40ms,loss=1%,rate=200mbit).
	Profile string `json:"profile"`
	// Description is the link in words, defaults filled in.
	Description string  `json:"description"`
	RTTms       float64 `json:"rtt_ms"`
	LossPct     float64 `json:"loss_percent"`
	// RateMbit is the link rate in 10^6 bits per second, 0 if unlimited.
	RateMbit float64 `json:"rate_mbit_s"`
	QueueKB  float64 `json:"queue_kb"`
	MTU      int     `json:"mtu"`
	// CheckRTTms and CheckMbit are what the self-check measured: the
	// quickest TCP handshake, and one TCP stream (bbr, large buffers).
	CheckRTTms float64 `json:"check_rtt_ms"`
	CheckMbit  float64 `json:"check_mbit_s"`
	// Problems lists where the link did not behave as configured.
	Problems []string `json:"problems,omitempty"`
	// Packets, Dropped and Late count, over the whole run, the packets
	// the relay carried both ways, those it dropped (loss and full
	// queue) and those it wrote more than 1ms after their time (the
	// relay short of CPU: the link was slower than configured then).
	Packets int64 `json:"relay_packets"`
	Dropped int64 `json:"relay_dropped"`
	Late    int64 `json:"relay_late"`
}

// AddStats records the relay's counters of l, at the end of a run.
func (li *LinkInfo) AddStats(l *linkemu.Link) {
	a, b := l.Stats()
	li.Packets, li.Dropped, li.Late = a.Packets+b.Packets, a.Lost+a.Overflow+b.Lost+b.Overflow, a.Late+b.Late
}

// String renders the link and its self-check on two lines.
func (li LinkInfo) String() string {
	s := fmt.Sprintf("link %s (queue %.0f KB, MTU %d, loss both ways)\nlink self-check: handshake rtt %.2f ms, one TCP stream (bbr) %.0f Mbit/s",
		li.Description, li.QueueKB, li.MTU, li.CheckRTTms, li.CheckMbit)
	for _, p := range li.Problems {
		s += "\n  link problem: " + p
	}
	if li.Packets > 0 {
		s += fmt.Sprintf("\nrelay over the run: %d packets, %d dropped (loss, full queue), %.2f%% written >1ms late",
			li.Packets, li.Dropped, 100*float64(li.Late)/float64(li.Packets))
	}
	return s
}

// StartLink starts the emulated link cfg for a run (Config.Link) and checks
// it; the caller closes the link when the run is over.
func StartLink(ctx context.Context, profile string, cfg linkemu.Config) (*linkemu.Link, LinkInfo, error) {
	l, err := linkemu.Start(ctx, cfg)
	if err != nil {
		return nil, LinkInfo{}, err
	}
	c := l.Config()
	li := LinkInfo{Profile: profile, Description: c.String(), RTTms: ms(c.RTT()), LossPct: 100 * c.AtoB.Loss,
		RateMbit: c.AtoB.Rate / 1e6, QueueKB: float64(c.AtoB.Queue) / 1e3, MTU: c.MTU}
	r, err := l.Check(ctx, 0)
	if err != nil {
		l.Close()
		return nil, li, err
	}
	li.CheckRTTms, li.CheckMbit, li.Problems = ms(r.RTT), r.Rate/1e6, r.Problems
	return l, li, nil
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

// LinkSize is the default volume of a run across link: ten seconds at its
// rate, 1 GiB when the rate is unlimited.
func LinkSize(cfg linkemu.Config) int64 {
	if cfg.AtoB.Rate <= 0 {
		return 1 << 30
	}
	return int64(cfg.AtoB.Rate/8*10) &^ (1<<20 - 1)
}

// linkPath is the name of the pseudo-path "the link at its full rate" that
// link targets compare with.
const linkPath = "link"

// linkTargets are the ratios asked of a run across the named profiles:
// one stream through tls holds most of the link and beats socat.
var linkTargets = map[string][]targetSpec{
	"wan": {
		{"tls/1 vs link rate", "migtun/tls/1", linkPath, 0.8, false},
		{"tls/1 vs socat-cubic", "migtun/tls/1", SocatCubic, 2, false},
	},
	"lossy": {
		{"tls/1 vs link rate", "migtun/tls/1", linkPath, 0.6, false},
		{"tls/1 vs socat-cubic", "migtun/tls/1", SocatCubic, 5, false},
	},
	"fat": {
		{"tls/1 vs link rate", "migtun/tls/1", linkPath, 0.7, false},
		{"tls/1 vs socat", "migtun/tls/1", Socat, 3, false},
	},
}

// qemuLinkTargets: a migration with multifd takes at most 1.5 times what
// its bytes need at the link rate.
var qemuLinkTargets = map[string][]targetSpec{
	"wan": {{"qemu tls/4 vs link rate", "migtun/tls/4", linkPath, 1 / 1.5, false}},
	"fat": {{"qemu tls/4 vs link rate", "migtun/tls/4", linkPath, 1 / 1.5, false}},
}

// SetLink records that r's run crossed the link li: the ratios gain the
// link at its rate as a reference, and the targets become the link's.
func (r *Report) SetLink(li LinkInfo) {
	r.Link = &li
	specs := linkTargets[li.Profile]
	if r.Mode == ModeQEMU {
		specs = qemuLinkTargets[li.Profile]
	}
	results := r.Results
	if li.RateMbit > 0 {
		results = append(append([]Result(nil), r.Results...),
			Result{Path: linkPath, Baseline: true, Streams: 1, Seconds: 1, MBps: li.RateMbit / 8})
		for _, p := range r.Results {
			if p.OK() {
				r.Ratios = append(r.Ratios, Ratio{Path: p.Path, Baseline: linkPath, Throughput: p.MBps / (li.RateMbit / 8)})
			}
		}
	}
	r.Targets = targets(results, specs)
}
