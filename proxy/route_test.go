package proxy_test

import (
	"strings"
	"testing"

	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/internal/leaktest"
	"github.com/migtun/migtun/proxy"
)

// longPath is an absolute path of n bytes.
func longPath(n int) string { return "/" + strings.Repeat("p", n-1) }

// parseCase is one input of a parser table: want is the parsed value, or
// errHas the fragments the error must contain.
type parseCase[T comparable] struct {
	in     string
	want   T
	errHas []string
}

// checkParse runs a parser table.
func checkParse[T comparable](t *testing.T, parse func(string) (T, error), cases []parseCase[T]) {
	t.Helper()
	for _, c := range cases {
		got, err := parse(c.in)
		if c.errHas == nil {
			if err != nil {
				t.Errorf("parse(%q): unexpected error %v", c.in, err)
			} else if got != c.want {
				t.Errorf("parse(%q) = %+v, want %+v", c.in, got, c.want)
			}
			continue
		}
		if err == nil {
			t.Errorf("parse(%q) = %+v, want an error mentioning %q", c.in, got, c.errHas)
			continue
		}
		for _, frag := range c.errHas {
			if !strings.Contains(err.Error(), frag) {
				t.Errorf("parse(%q): error %q does not mention %q", c.in, err, frag)
			}
		}
	}
}

var (
	unixEP = endpoint.Unix
	tcpEP  = endpoint.TCP
)

func TestParseRoute(t *testing.T) {
	leaktest.Check(t)
	checkParse(t, proxy.ParseRoute, []parseCase[proxy.Route]{
		{in: "main=unix:/run/qemu/in.sock", want: proxy.Route{Channel: "main", Target: unixEP("/run/qemu/in.sock")}},
		{in: "nbd-0.x_y=tcp:[::1]:10809", want: proxy.Route{Channel: "nbd-0.x_y", Target: tcpEP("[::1]:10809")}},
		{in: "main=unix:/a=b", want: proxy.Route{Channel: "main", Target: unixEP("/a=b")}},

		{in: "main", errHas: []string{"want CHANNEL="}},
		{in: "=unix:/x", errHas: []string{`bad channel name ""`}},
		{in: "Main=unix:/x", errHas: []string{`bad channel name "Main"`}},
		{in: "a/b=unix:/x", errHas: []string{`bad channel name "a/b"`}},
		{in: strings.Repeat("c", 300) + "=unix:/x", errHas: []string{"bad channel name"}},
		{in: "main=", errHas: []string{"want unix:PATH"}},
		{in: "main=unix:x.sock", errHas: []string{"must be absolute"}},
		{in: "main=tcp:10.0.0.1", errHas: []string{"missing port"}},
		{in: "main=tcp:10.0.0.1:99999", errHas: []string{`bad port "99999"`}},
		{in: "main=unix:" + longPath(200), errHas: []string{"longer than"}},
	})
}

func TestParseForward(t *testing.T) {
	leaktest.Check(t)
	checkParse(t, proxy.ParseForward, []parseCase[proxy.Forward]{
		{in: "unix:/run/fwd.sock=10.0.0.2:7400/main",
			want: proxy.Forward{Listen: unixEP("/run/fwd.sock"), Peer: "10.0.0.2:7400", Channel: "main"}},
		{in: "tcp:127.0.0.1:4444=[::1]:7400/nbd",
			want: proxy.Forward{Listen: tcpEP("127.0.0.1:4444"), Peer: "[::1]:7400", Channel: "nbd"}},
		{in: "unix:/a=b/c.sock=dst.example:7400/libvirt",
			want: proxy.Forward{Listen: unixEP("/a=b/c.sock"), Peer: "dst.example:7400", Channel: "libvirt"}},

		{in: "unix:/run/fwd.sock", errHas: []string{"want unix:PATH=PEERHOST:PORT/CHANNEL"}},
		{in: "unix:/run/fwd.sock=10.0.0.2:7400", errHas: []string{"missing /CHANNEL"}},
		{in: "unix:/run/fwd.sock=10.0.0.2:7400/", errHas: []string{`bad channel name ""`}},
		{in: "unix:/run/fwd.sock=10.0.0.2:7400/Main", errHas: []string{`bad channel name "Main"`}},
		{in: "unix:/run/fwd.sock=10.0.0.2:7400/a/b", errHas: []string{`bad channel name "a/b"`}},
		{in: "unix:/run/fwd.sock=10.0.0.2/main", errHas: []string{`peer "10.0.0.2"`, "missing port"}},
		{in: "unix:/run/fwd.sock=::1:7400/main", errHas: []string{`peer "::1:7400"`, "too many colons"}},
		{in: "unix:/run/fwd.sock=10.0.0.2:x/main", errHas: []string{`bad port "x"`}},
		{in: "unix:/run/fwd.sock=:7400/main", errHas: []string{"missing host"}},
		{in: "unix:/run/fwd.sock=/main", errHas: []string{`peer ""`}},
		{in: "=10.0.0.2:7400/main", errHas: []string{"want unix:PATH or tcp:HOST:PORT"}},
		{in: "unix:fwd.sock=10.0.0.2:7400/main", errHas: []string{"must be absolute"}},
		{in: "tcp:127.0.0.1=10.0.0.2:7400/main", errHas: []string{"missing port"}},
		{in: "unix:" + longPath(108) + "=10.0.0.2:7400/main", errHas: []string{"longer than"}},
		{in: "unix:/run/\x00=10.0.0.2:7400/main", errHas: []string{"NUL"}},
	})
}

// routeString formats r the way ParseRoute reads it.
func routeString(r proxy.Route) string { return r.String() }

var routeSeeds = []string{
	"main=unix:/run/qemu/in.sock", "nbd=tcp:[::1]:10809", "main=unix:/a=b",
	"Main=unix:/x", "a/b=unix:/x", "=", "main=", "main=tcp:h:",
}

var forwardSeeds = []string{
	"unix:/run/fwd.sock=10.0.0.2:7400/main", "tcp:127.0.0.1:4444=[::1]:7400/nbd",
	"unix:/a=b=c:1/d", "unix:/x=h:1/a/b", "unix:/x=h:1/", "unix:/x=h/main", "=/", "/=:",
}

func FuzzParseRoute(f *testing.F) {
	leaktest.Check(f)
	for _, s := range routeSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := proxy.ParseRoute(s)
		if err != nil {
			return
		}
		again, err := proxy.ParseRoute(routeString(r))
		if err != nil || again != r {
			t.Errorf("ParseRoute(%q) = %+v, but %q parses to %+v, %v", s, r, routeString(r), again, err)
		}
	})
}

func FuzzParseForward(f *testing.F) {
	leaktest.Check(f)
	for _, s := range forwardSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		fw, err := proxy.ParseForward(s)
		if err != nil {
			return
		}
		if fw.String() != s {
			t.Errorf("ParseForward(%q).String() = %q", s, fw.String())
		}
		again, err := proxy.ParseForward(fw.String())
		if err != nil || again != fw {
			t.Errorf("ParseForward(%q) = %+v, but its String %q parses to %+v, %v", s, fw, fw.String(), again, err)
		}
	})
}
