package endpoint_test

import (
	"strings"
	"testing"

	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/internal/leaktest"
)

// longPath is an absolute path of n bytes.
func longPath(n int) string { return "/" + strings.Repeat("p", n-1) }

func TestParse(t *testing.T) {
	leaktest.Check(t)
	cases := []struct {
		in     string
		want   endpoint.Endpoint
		errHas []string
	}{
		{in: "unix:/run/migtun/main.sock", want: endpoint.Unix("/run/migtun/main.sock")},
		{in: "unix:/a=b:c", want: endpoint.Unix("/a=b:c")},
		{in: "unix:" + longPath(107), want: endpoint.Unix(longPath(107))},
		{in: "tcp:127.0.0.1:4444", want: endpoint.TCP("127.0.0.1:4444")},
		{in: "tcp:[::1]:7400", want: endpoint.TCP("[::1]:7400")},
		{in: "tcp:localhost:65535", want: endpoint.TCP("localhost:65535")},

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
	}
	for _, c := range cases {
		got, err := endpoint.Parse(c.in)
		if c.errHas == nil {
			if err != nil || got != c.want {
				t.Errorf("Parse(%q) = %+v, %v; want %+v", c.in, got, err, c.want)
			}
			continue
		}
		if err == nil {
			t.Errorf("Parse(%q) = %+v, want an error mentioning %q", c.in, got, c.errHas)
			continue
		}
		for _, frag := range c.errHas {
			if !strings.Contains(err.Error(), frag) {
				t.Errorf("Parse(%q): error %q does not mention %q", c.in, err, frag)
			}
		}
	}
}

func TestParseUnix(t *testing.T) {
	if _, err := endpoint.ParseUnix("tcp:127.0.0.1:1"); err == nil || !strings.Contains(err.Error(), "want unix:PATH") {
		t.Errorf("ParseUnix(tcp:…) = %v, want an error asking for unix:PATH", err)
	}
	if ep, err := endpoint.ParseUnix("unix:/run/x.qmp"); err != nil || ep != endpoint.Unix("/run/x.qmp") {
		t.Errorf("ParseUnix(unix:/run/x.qmp) = %+v, %v", ep, err)
	}
}

func FuzzParse(f *testing.F) {
	leaktest.Check(f)
	for _, s := range []string{
		"unix:/run/migtun/main.sock", "tcp:127.0.0.1:4444", "tcp:[::1]:7400", "tcp:[fe80::1%eth0]:1",
		"unix:rel", "tcp:host", "tcp:host:99999", "tcp::1", "unix:/\x00", "unix:" + longPath(108), "x", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		e, err := endpoint.Parse(s)
		if err != nil {
			return
		}
		if e.String() != s {
			t.Errorf("Parse(%q).String() = %q", s, e.String())
		}
		again, err := endpoint.Parse(e.String())
		if err != nil || again != e {
			t.Errorf("Parse(%q) = %+v, but its String %q parses to %+v, %v", s, e, e.String(), again, err)
		}
	})
}
