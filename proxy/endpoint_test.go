package proxy_test

import (
	"strings"
	"testing"

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

func unixEP(p string) proxy.Endpoint { return proxy.Endpoint{Network: "unix", Address: p} }
func tcpEP(a string) proxy.Endpoint  { return proxy.Endpoint{Network: "tcp", Address: a} }

func TestParseEndpoint(t *testing.T) {
	leaktest.Check(t)
	checkParse(t, proxy.ParseEndpoint, []parseCase[proxy.Endpoint]{
		{in: "unix:/run/migtun/main.sock", want: unixEP("/run/migtun/main.sock")},
		{in: "unix:/a=b:c", want: unixEP("/a=b:c")},
		{in: "unix:" + longPath(107), want: unixEP(longPath(107))},
		{in: "tcp:127.0.0.1:4444", want: tcpEP("127.0.0.1:4444")},
		{in: "tcp:[::1]:7400", want: tcpEP("[::1]:7400")},
		{in: "tcp:localhost:65535", want: tcpEP("localhost:65535")},

		{in: "unix:run/main.sock", errHas: []string{"run/main.sock", "must be absolute"}},
		{in: "unix:", errHas: []string{"must be absolute"}},
		{in: "unix:" + longPath(108), errHas: []string{"longer than", "107"}},
		{in: "unix:/run/a\x00b", errHas: []string{"NUL"}},
		{in: "tcp:127.0.0.1", errHas: []string{"127.0.0.1", "missing port"}},
		{in: "tcp:[::1]", errHas: []string{"missing port"}},
		{in: "tcp:127.0.0.1:http", errHas: []string{`bad port "http"`}},
		{in: "tcp:127.0.0.1:65536", errHas: []string{`bad port "65536"`}},
		{in: "tcp:127.0.0.1:-1", errHas: []string{`bad port "-1"`}},
		{in: "tcp:127.0.0.1:", errHas: []string{`bad port ""`}},
		{in: "tcp::7400", errHas: []string{"missing host"}},
		{in: "tcp:a/b:1", errHas: []string{`bad host "a/b"`}},
		{in: "udp:127.0.0.1:1", errHas: []string{`unknown network "udp"`}},
		{in: "/run/main.sock", errHas: []string{"want unix:PATH or tcp:HOST:PORT"}},
		{in: "", errHas: []string{"want unix:PATH"}},
	})
}

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
func routeString(r proxy.Route) string { return r.Channel + "=" + r.Target.String() }

var endpointSeeds = []string{
	"unix:/run/migtun/main.sock", "tcp:127.0.0.1:4444", "tcp:[::1]:7400", "tcp:[fe80::1%eth0]:1",
	"unix:rel", "tcp:host", "tcp:host:99999", "tcp::1", "unix:/\x00", "unix:" + longPath(108), "x", "",
}

var routeSeeds = []string{
	"main=unix:/run/qemu/in.sock", "nbd=tcp:[::1]:10809", "main=unix:/a=b",
	"Main=unix:/x", "a/b=unix:/x", "=", "main=", "main=tcp:h:",
}

var forwardSeeds = []string{
	"unix:/run/fwd.sock=10.0.0.2:7400/main", "tcp:127.0.0.1:4444=[::1]:7400/nbd",
	"unix:/a=b=c:1/d", "unix:/x=h:1/a/b", "unix:/x=h:1/", "unix:/x=h/main", "=/", "/=:",
}

func FuzzParseEndpoint(f *testing.F) {
	leaktest.Check(f)
	for _, s := range endpointSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		e, err := proxy.ParseEndpoint(s)
		if err != nil {
			return
		}
		if e.String() != s {
			t.Errorf("ParseEndpoint(%q).String() = %q", s, e.String())
		}
		again, err := proxy.ParseEndpoint(e.String())
		if err != nil || again != e {
			t.Errorf("ParseEndpoint(%q) = %+v, but its String %q parses to %+v, %v", s, e, e.String(), again, err)
		}
	})
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
