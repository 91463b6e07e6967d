package proxy

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/migtun/migtun/internal/testpki"
	"github.com/migtun/migtun/tunnel"
)

// apiTargets are the control endpoint's paths, with %s where the fuzzer's
// path segment goes.
var apiTargets = []string{
	"/v1/sessions/%s", "/v1/sessions/%s/finish", "/v1/sessions/%s/abort", "/v1/sessions/%s/progress",
	"/v1/routes/%s", "/v1/routes", "/v1/sessions", "/healthz", "/metrics", "/v1/sessions/%s/vm-prepare", "/v1/sessions/%s/vm-recover", "/%s",
}

// FuzzControlAPI sends fuzzed requests to the local control endpoint of a
// server that has no peer: each must be answered, an error with a status
// of 4xx and a JSON body saying what is wrong (but 405, which ServeMux
// answers in plain text; and ServeMux's 3xx redirects to cleaned paths).
// Requests that reach POST /v1/sessions are left out: it dials the peer
// the body names.
func FuzzControlAPI(f *testing.F) {
	ca := testpki.NewCA(f)
	h := ca.NewHost(f, "host")
	s, err := New(Config{Listen: "127.0.0.1:0", Tunnel: &tunnel.Config{ServerTLS: h.Server, ClientTLS: h.Client},
		SocketDir: filepath.Join(f.TempDir(), "s")})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { s.Close() })
	mux := s.Handler().(*http.ServeMux)
	methods := []string{"GET", "POST", "PUT", "DELETE"}
	f.Add(uint8(2), uint8(4), "main", []byte(`{"target":"unix:/run/in.sock"}`))
	f.Add(uint8(2), uint8(4), "nbd", []byte(`{"target":"tcp:127.0.0.1:10809"}`))
	f.Add(uint8(2), uint8(4), "main", []byte(`{"target":"session"}`))
	f.Add(uint8(3), uint8(4), "main", []byte(nil))
	f.Add(uint8(2), uint8(3), "0123456789abcdef0123456789abcdef", []byte(`{"ram_remaining":1,"disks":[{"node":"d","done":1,"total":2}]}`))
	f.Add(uint8(1), uint8(2), "0123456789abcdef0123456789abcdef", []byte(`{"reason":"x"}`))
	f.Add(uint8(1), uint8(1), "0123456789abcdef0123456789abcdef", []byte(`{}`))
	f.Add(uint8(0), uint8(0), "nope", []byte(nil))
	// Both reach POST /v1/sessions, which the fuzzer must leave out.
	f.Add(uint8(1), uint8(6), "", []byte(`{"peer":"127.0.0.1:1","channels":["main"]}`))
	f.Add(uint8(1), uint8(11), "v1/sessions", []byte(`{"peer":"127.0.0.1:1","channels":["main"]}`))
	f.Add(uint8(1), uint8(9), "0123456789abcdef0123456789abcdef", []byte(`{"vm":"vm1"}`))
	f.Add(uint8(2), uint8(4), "main", []byte(`{"target":"unix:/x","surprise":1}`))
	f.Add(uint8(2), uint8(4), "main", bytes.Repeat([]byte("["), 100000))
	f.Fuzz(func(t *testing.T, m, p uint8, segment string, body []byte) {
		method, target := methods[int(m)%len(methods)], apiTargets[int(p)%len(apiTargets)]
		path := strings.Replace(target, "%s", segment, 1)
		req, err := http.NewRequest(method, "http://migtun"+path, bytes.NewReader(body))
		if err != nil || req.URL.Path != path {
			return // not a request a client can send as meant
		}
		if _, pattern := mux.Handler(req); pattern == "POST /v1/sessions" {
			return
		}
		defer func() { // each input starts without routes
			for _, r := range s.Routes() {
				s.DeleteRoute(r.Channel)
			}
		}()
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, req)
		if rec.Code >= 500 {
			t.Fatalf("%s %s %q: status %d: %s", method, path, body, rec.Code, rec.Body)
		}
		if rec.Code >= 400 && rec.Code != http.StatusMethodNotAllowed {
			var e struct {
				Error string `json:"error"`
			}
			if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || e.Error == "" {
				t.Fatalf("%s %s %q: status %d with body %q, want a JSON error", method, path, body, rec.Code, rec.Body)
			}
		}
	})
}
