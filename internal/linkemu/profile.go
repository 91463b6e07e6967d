package linkemu

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Profiles are the named links ParseProfile knows, both ways alike.
var Profiles = map[string]Config{
	"metro": named("metro", Symmetric(2*time.Millisecond, 0.0001, 1e9)),
	"wan":   named("wan", Symmetric(40*time.Millisecond, 0.001, 400e6)),
	"lossy": named("lossy", Symmetric(40*time.Millisecond, 0.01, 200e6)),
	"fat":   named("fat", Symmetric(100*time.Millisecond, 0, 1e9)),
}

func named(n string, c Config) Config { c.Name = n; return c }

// ProfileNames lists the names of Profiles, sorted.
func ProfileNames() []string {
	var n []string
	for k := range Profiles {
		n = append(n, k)
	}
	slices.Sort(n)
	return n
}

// ParseProfile reads a link: a profile name (metro, wan, lossy, fat), a
// list of settings (rtt=40ms,loss=0.1%,rate=400mbit), or a name followed
// by settings that change it (wan,loss=0.5%). Settings apply both ways:
// rtt (the round trip, half of it each way), loss (a percentage or a
// fraction), rate (bits per second: 400mbit, 1gbit, 1e9), queue (bytes the
// rate limit may hold: 2MB, 512KiB), reorder (a percentage), reorder-delay,
// mtu and seed.
func ParseProfile(s string) (Config, error) {
	var c Config
	items := strings.Split(strings.TrimSpace(s), ",")
	if p, ok := Profiles[items[0]]; ok {
		c = p
		items = items[1:]
	} else if !strings.Contains(items[0], "=") {
		return c, fmt.Errorf("link %q: want a profile (%s) or settings such as rtt=40ms,loss=0.1%%,rate=400mbit",
			s, strings.Join(ProfileNames(), ", "))
	} else {
		c.Name = s
	}
	if len(items) > 0 && c.Name != s {
		c.Name = s
	}
	for _, it := range items {
		k, v, ok := strings.Cut(strings.TrimSpace(it), "=")
		if !ok {
			return c, fmt.Errorf("link %q: %q: want key=value", s, it)
		}
		var err error
		both := func(f func(d *Direction)) { f(&c.AtoB); f(&c.BtoA) }
		switch k {
		case "rtt":
			var d time.Duration
			if d, err = time.ParseDuration(v); err == nil {
				both(func(x *Direction) { x.Delay = d / 2 })
			}
		case "loss", "reorder":
			var p float64
			if p, err = parseFraction(v); err == nil {
				if k == "loss" {
					both(func(x *Direction) { x.Loss = p })
				} else {
					both(func(x *Direction) { x.Reorder = p })
				}
			}
		case "reorder-delay":
			var d time.Duration
			if d, err = time.ParseDuration(v); err == nil {
				both(func(x *Direction) { x.ReorderDelay = d })
			}
		case "rate":
			var r float64
			if r, err = parseRate(v); err == nil {
				both(func(x *Direction) { x.Rate = r })
			}
		case "queue":
			var q int64
			if q, err = parseBytes(v); err == nil {
				both(func(x *Direction) { x.Queue = int(q) })
			}
		case "mtu":
			c.MTU, err = strconv.Atoi(v)
		case "seed":
			c.Seed, err = strconv.ParseUint(v, 10, 64)
		default:
			return c, fmt.Errorf("link %q: unknown setting %q (want rtt, loss, rate, queue, reorder, reorder-delay, mtu, seed)", s, k)
		}
		if err != nil {
			return c, fmt.Errorf("link %q: %s: %v", s, k, err)
		}
	}
	return c, c.Validate()
}

func parseFraction(v string) (float64, error) {
	pct := strings.HasSuffix(v, "%")
	f, err := strconv.ParseFloat(strings.TrimSuffix(v, "%"), 64)
	if err != nil {
		return 0, err
	}
	if pct {
		f /= 100
	}
	if f < 0 || f > 1 {
		return 0, fmt.Errorf("%s: want 0 to 100%%", v)
	}
	return f, nil
}

// parseRate reads bits per second: 400mbit, 1gbit, 200Mbit/s, 5e8.
func parseRate(v string) (float64, error) {
	t := strings.TrimSuffix(strings.ToLower(v), "/s")
	t = strings.TrimSuffix(t, "bit")
	t = strings.TrimSuffix(t, "bps")
	mult := 1.0
	switch {
	case strings.HasSuffix(t, "k"):
		mult = 1e3
	case strings.HasSuffix(t, "m"):
		mult = 1e6
	case strings.HasSuffix(t, "g"):
		mult = 1e9
	}
	if mult != 1 {
		t = t[:len(t)-1]
	}
	f, err := strconv.ParseFloat(t, 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("%q: want bits per second such as 400mbit or 1gbit", v)
	}
	return f * mult, nil
}

// parseBytes reads 2MB, 512KiB, 1500 (bytes).
func parseBytes(v string) (int64, error) {
	units := []struct {
		s string
		m int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"B", 1}}
	m := int64(1)
	for _, u := range units {
		if strings.HasSuffix(v, u.s) {
			m, v = u.m, strings.TrimSuffix(v, u.s)
			break
		}
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("%q: want bytes such as 2MB or 512KiB", v)
	}
	return int64(f * float64(m)), nil
}
