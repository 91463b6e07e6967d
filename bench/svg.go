package bench

import (
	"fmt"
	"html"
	"io"
	"math"
	"strings"
)

// WriteSVG writes a self-contained SVG bar chart of r: throughput and CPU
// time per GB of each measured path, side by side.
func WriteSVG(w io.Writer, r Report) error {
	var rows []Result
	for _, p := range r.Results {
		if p.OK() {
			rows = append(rows, p)
		}
	}
	const (
		label  = 150 // width of the path names
		panel  = 330 // width of each panel's bars
		gap    = 90
		rowH   = 24
		top    = 64
		bottom = 56
	)
	width := label + panel + gap + panel + 70
	height := top + rowH*len(rows) + bottom
	maxMB, maxCPU := 1.0, 0.1
	for _, p := range rows {
		maxMB = math.Max(maxMB, p.MBps)
		maxCPU = math.Max(maxCPU, p.CPUPerGB)
	}
	linkMB := 0.0 // the link rate in MB/s, drawn as a line
	if r.Link != nil {
		linkMB = r.Link.RateMbit / 8
		maxMB = math.Max(maxMB, linkMB)
	}
	maxMB, maxCPU = niceCeil(maxMB), niceCeil(maxCPU)

	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n",
		width, height, width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	m := r.Machine
	title := "migtun bench: %s per path"
	if r.Mode == ModeQEMU {
		title = "migtun bench --qemu: a QEMU migration of %s of guest RAM per path"
	}
	fmt.Fprintf(&b, `<text x="10" y="20" font-size="15" font-weight="bold">`+title+`</text>`+"\n", esc(FormatSize(r.Size)))
	machine := fmt.Sprintf("%d CPUs, %s, Linux %s, %s", m.CPUs, m.CPUModel, m.Kernel, m.GoVersion)
	if r.Link != nil {
		machine = "across the emulated link " + r.Link.Description + "; " + machine
	}
	fmt.Fprintf(&b, `<text x="10" y="38" fill="#555">%s</text>`+"\n", esc(machine))
	x1 := label
	x2 := label + panel + gap
	fmt.Fprintf(&b, `<text x="%d" y="%d" font-weight="bold">throughput, MB/s (higher is better)</text>`+"\n", x1, top-8)
	fmt.Fprintf(&b, `<text x="%d" y="%d" font-weight="bold">CPU seconds per GB, all processes (lower is better)</text>`+"\n", x2, top-8)
	axis(&b, x1, top, panel, len(rows)*rowH, maxMB, "%.0f")
	axis(&b, x2, top, panel, len(rows)*rowH, maxCPU, "%.1f")
	if linkMB > 0 {
		lx := float64(x1) + float64(panel)*linkMB/maxMB
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#d62728" stroke-dasharray="4 3"/>`+"\n", lx, top-4, lx, top+len(rows)*rowH)
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle" fill="#d62728">link rate</text>`+"\n", lx, top+len(rows)*rowH+28)
	}
	for i, p := range rows {
		y := top + i*rowH
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="end">%s</text>`+"\n", label-8, y+16, esc(p.Path))
		c := color(p)
		wMB := float64(panel) * p.MBps / maxMB
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"><title>%s: %.0f MB/s</title></rect>`+"\n",
			x1, y+4, wMB, rowH-8, c, esc(p.Path), p.MBps)
		mark := ""
		if p.Partial {
			mark = " †" // cut short: the rate until then
		}
		fmt.Fprintf(&b, `<text x="%.1f" y="%d">%s%s</text>`+"\n", float64(x1)+wMB+4, y+16, mbps(p.MBps), mark)
		// CPU: the hops' share dark, the load generator's share light.
		wRelay := float64(panel) * p.RelayCPUPerGB / maxCPU
		wAll := float64(panel) * p.CPUPerGB / maxCPU
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"><title>%s: %.2f CPU s/GB, %.2f in the hops</title></rect>`+"\n",
			x2, y+4, wRelay, rowH-8, c, esc(p.Path), p.CPUPerGB, p.RelayCPUPerGB)
		fmt.Fprintf(&b, `<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s" fill-opacity="0.35"/>`+"\n",
			float64(x2)+wRelay, y+4, math.Max(0, wAll-wRelay), rowH-8, c)
		fmt.Fprintf(&b, `<text x="%.1f" y="%d">%.2f</text>`+"\n", float64(x2)+wAll+4, y+16, p.CPUPerGB)
	}
	ly := top + len(rows)*rowH + 36
	legend := []struct{ c, s string }{{"#9e9e9e", "baseline"}, {"#1f77b4", "migtun tls"}, {"#2ca02c", "migtun quic"}, {"#ff7f0e", "migtun plain"}}
	x := 10
	for _, l := range legend {
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="12" height="12" fill="%s"/><text x="%d" y="%d">%s</text>`+"\n", x, ly-10, l.c, x+16, ly, l.s)
		x += 30 + 8*len(l.s)
	}
	note := "CPU bars: solid = the two hops, light = in-process sender and sink"
	if r.Link != nil {
		note = "† cut short by --limit; CPU includes the link's relay"
	}
	fmt.Fprintf(&b, `<text x="%d" y="%d" fill="#555">%s</text>`+"\n", x+10, ly, esc(note))
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// axis draws a panel's frame and four grid lines labelled with format.
func axis(b *strings.Builder, x, y, w, h int, max float64, format string) {
	for i := 0; i <= 4; i++ {
		gx := float64(x) + float64(w)*float64(i)/4
		fmt.Fprintf(b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>`+"\n", gx, y, gx, y+h)
		fmt.Fprintf(b, `<text x="%.1f" y="%d" text-anchor="middle" fill="#555">`+format+`</text>`+"\n", gx, y+h+14, max*float64(i)/4)
	}
	fmt.Fprintf(b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#333"/>`+"\n", x, y, x, y+h)
}

// niceCeil rounds v up to 1, 2, 2.5 or 5 times a power of ten.
func niceCeil(v float64) float64 {
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if v <= m*p {
			return m * p
		}
	}
	return 10 * p
}

func color(p Result) string {
	switch {
	case p.Baseline:
		return "#9e9e9e"
	case p.Transport == "tls":
		return "#1f77b4"
	case p.Transport == "quic":
		return "#2ca02c"
	}
	return "#ff7f0e"
}

func esc(s string) string { return html.EscapeString(s) }
