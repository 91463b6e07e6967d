package proxy

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"io"
	"mime"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/endpoint"
)

// The local control endpoint: HTTP with JSON, on a UNIX socket and
// optionally on TCP. Package control documents the paths and types and has
// the client.

// maxRequestBody bounds the body of a control request.
const maxRequestBody = 64 << 10

// Handler returns the control endpoint's HTTP handler.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", s.handleHealth)
	mux.Handle("GET /metrics", s.metrics.handler())
	mux.HandleFunc("GET /v1/sessions", s.handleListSessions)
	mux.HandleFunc("POST /v1/sessions", s.handlePrepare)
	mux.HandleFunc("GET /v1/sessions/{id}", s.handleShowSession)
	mux.HandleFunc("POST /v1/sessions/{id}/finish", s.handleFinish)
	mux.HandleFunc("POST /v1/sessions/{id}/abort", s.handleAbort)
	mux.HandleFunc("PUT /v1/sessions/{id}/progress", s.handleProgress)
	mux.HandleFunc("POST /v1/sessions/{id}/{action}", s.handleVMCall)
	mux.HandleFunc("GET /v1/vms", s.handleListVMs)
	mux.HandleFunc("PUT /v1/vms/{name}", s.handlePutVM)
	mux.HandleFunc("DELETE /v1/vms/{name}", s.handleDeleteVM)
	mux.HandleFunc("GET /v1/routes", s.handleListRoutes)
	mux.HandleFunc("PUT /v1/routes/{channel}", s.handleSetRoute)
	mux.HandleFunc("DELETE /v1/routes/{channel}", s.handleDeleteRoute)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, control.Errorf(control.CodeNotFound, "%s %s: no such endpoint (see GET /v1/sessions, POST /v1/sessions, /healthz)", r.Method, r.URL.Path))
	})
	return mux
}

func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

func (s *Server) handleListSessions(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.Sessions())
}

func (s *Server) handlePrepare(w http.ResponseWriter, r *http.Request) {
	var req control.PrepareRequest
	if !readJSON(w, r, &req) {
		return
	}
	info, err := s.Prepare(r.Context(), req)
	reply(w, http.StatusCreated, info, err)
}

func (s *Server) handleShowSession(w http.ResponseWriter, r *http.Request) {
	info, err := s.Session(r.PathValue("id"))
	reply(w, http.StatusOK, info, err)
}

func (s *Server) handleFinish(w http.ResponseWriter, r *http.Request) {
	grace := s.cfg.FinishGrace
	if g := r.URL.Query().Get("grace"); g != "" {
		d, err := time.ParseDuration(g)
		if err != nil || d < 0 {
			writeError(w, control.Errorf(control.CodeBadRequest, "grace %q: want a duration such as 10s", g))
			return
		}
		grace = d
	}
	rep, err := s.Finish(r.Context(), r.PathValue("id"), grace)
	reply(w, http.StatusOK, rep, err)
}

func (s *Server) handleAbort(w http.ResponseWriter, r *http.Request) {
	var body control.AbortRequest
	if r.ContentLength != 0 && !readJSON(w, r, &body) {
		return
	}
	info, err := s.Abort(r.Context(), r.PathValue("id"), body.Reason)
	reply(w, http.StatusOK, info, err)
}

func (s *Server) handleProgress(w http.ResponseWriter, r *http.Request) {
	var p control.MigrationProgress
	if !readJSON(w, r, &p) {
		return
	}
	sess, err := s.openSession(r.PathValue("id"))
	if err != nil {
		writeError(w, err)
		return
	}
	sess.mu.Lock()
	sess.progress = &p
	sess.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) handleListRoutes(w http.ResponseWriter, r *http.Request) {
	out := []control.RouteInfo{}
	for _, rt := range s.Routes() {
		out = append(out, control.RouteInfo{Channel: rt.Channel, Target: strings.TrimPrefix(rt.String(), rt.Channel+"=")})
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleSetRoute(w http.ResponseWriter, r *http.Request) {
	var body control.RouteInfo
	if !readJSON(w, r, &body) {
		return
	}
	rt, err := ParseRoute(r.PathValue("channel") + "=" + body.Target)
	if err != nil {
		writeError(w, control.Errorf(control.CodeBadRequest, "%v", err))
		return
	}
	s.SetRoute(rt)
	s.log.Info("route registered", "route", rt.String())
	writeJSON(w, http.StatusOK, control.RouteInfo{Channel: rt.Channel, Target: strings.TrimPrefix(rt.String(), rt.Channel+"=")})
}

func (s *Server) handleDeleteRoute(w http.ResponseWriter, r *http.Request) {
	if !s.DeleteRoute(r.PathValue("channel")) {
		writeError(w, control.Errorf(control.CodeNotFound, "no route for channel %q", r.PathValue("channel")))
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// reply writes v with status, or err.
func reply(w http.ResponseWriter, status int, v any, err error) {
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, status, v)
}

func readJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(io.LimitReader(r.Body, maxRequestBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeError(w, control.Errorf(control.CodeBadRequest, "request body: %v", err))
		return false
	}
	return true
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// writeError answers with err's code, its HTTP status, and its text.
func writeError(w http.ResponseWriter, err error) {
	e := control.Error{Code: control.CodeOf(err), Message: err.Error()}
	var ce *control.Error
	if errors.As(err, &ce) {
		e.Peer = ce.Peer
	}
	writeJSON(w, e.Code.Status(), e)
}

// maxRequestTime bounds one request to the control endpoint.
const maxRequestTime = 10 * time.Minute

// ControlAuth says who may use a control endpoint.
type ControlAuth struct {
	// Token, when set, must come as "Authorization: Bearer TOKEN". The TCP
	// endpoint requires one: anyone on the host can connect to it.
	Token string
	// Hosts, when set, are the only Host headers taken (besides "migtun",
	// the client's own), so that a web page cannot reach the endpoint
	// through a name it controls (DNS rebinding).
	Hosts []string
}

// ServeControl serves the control endpoint on ln until the server stops.
func (s *Server) ServeControl(ln net.Listener, auth ControlAuth) {
	s.serveHTTP(ln, guard(s.Handler(), auth))
}

// ListenControl opens the control endpoint at ep (a UNIX socket path or a
// TCP address) and serves it. The UNIX socket's mode is what the process
// umask leaves: migtun serve runs under 077. A TCP endpoint needs a token.
func (s *Server) ListenControl(ep endpoint.Endpoint, auth ControlAuth) (net.Addr, error) {
	if ep.Network == "tcp" && auth.Token == "" {
		return nil, errors.New("a TCP control endpoint needs a token: anyone on the host could use it")
	}
	ln, err := ep.Listen()
	if err != nil {
		return nil, err
	}
	if ep.Network == "unix" {
		// Already closed to others by the umask; read and write suffice.
		if err := os.Chmod(ep.Address, 0o600); err != nil {
			ln.Close()
			return nil, err
		}
	}
	if ta, ok := ln.Addr().(*net.TCPAddr); ok && len(auth.Hosts) == 0 {
		port := strconv.Itoa(ta.Port)
		auth.Hosts = []string{"localhost:" + port, "localhost"}
	}
	s.ServeControl(ln, auth)
	return ln.Addr(), nil
}

// hostAllowed reports whether a request's Host header names this endpoint:
// "migtun" (the client's own), one of hosts, or an IP address literal. DNS
// rebinding needs a name the attacker controls, so an address is safe.
func hostAllowed(host string, hosts []string) bool {
	if strings.EqualFold(host, "migtun") || slices.ContainsFunc(hosts, func(h string) bool { return strings.EqualFold(h, host) }) {
		return true
	}
	name := host
	if h, _, err := net.SplitHostPort(host); err == nil {
		name = h
	}
	return net.ParseIP(strings.Trim(name, "[]")) != nil
}

// guard checks each request's token, Host and body type before h sees it,
// and bounds its time.
func guard(h http.Handler, auth ControlAuth) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if auth.Token != "" {
			got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			// Digests of equal length: the comparison says nothing of the
			// token's length either.
			gotSum, wantSum := sha256.Sum256([]byte(got)), sha256.Sum256([]byte(auth.Token))
			if !ok || subtle.ConstantTimeCompare(gotSum[:], wantSum[:]) != 1 {
				w.Header().Set("WWW-Authenticate", `Bearer realm="migtun"`)
				writeError(w, control.Errorf(control.CodeUnauthorized, "the control endpoint wants its token: Authorization: Bearer TOKEN (migtun's --control-token-file)"))
				return
			}
		}
		if len(auth.Hosts) > 0 && !hostAllowed(r.Host, auth.Hosts) {
			writeError(w, control.Errorf(control.CodeBadRequest, "Host %q is not this control endpoint's", r.Host))
			return
		}
		if r.ContentLength != 0 && r.Method != http.MethodGet {
			if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt != "application/json" {
				writeError(w, control.Errorf(control.CodeUnsupported, "request bodies are JSON: send Content-Type: application/json"))
				return
			}
		}
		ctx, cancel := context.WithTimeout(r.Context(), maxRequestTime)
		defer cancel()
		h.ServeHTTP(w, r.WithContext(ctx))
	})
}

// ListenMetrics serves /metrics and /healthz alone on a TCP address until
// the server stops.
func (s *Server) ListenMetrics(addr string) (net.Addr, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", s.metrics.handler())
	mux.HandleFunc("GET /healthz", s.handleHealth)
	s.serveHTTP(ln, mux)
	return ln.Addr(), nil
}

// serveHTTP serves h on ln until the server stops.
func (s *Server) serveHTTP(ln net.Listener, h http.Handler) {
	hs := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second,
		IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 64 << 10,
		BaseContext: func(net.Listener) context.Context { return s.ctx }}
	// The handlers' requests end with the server's context (BaseContext);
	// they are counted so that stopping waits for them too.
	var handlers sync.WaitGroup
	inner := hs.Handler
	hs.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		handlers.Add(1)
		defer handlers.Done()
		inner.ServeHTTP(w, r)
	})
	s.wg.Go(func() {
		hs.Serve(ln) // ends when Shutdown closes ln
	})
	s.wg.Go(func() {
		<-s.ctx.Done()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if hs.Shutdown(ctx) != nil {
			hs.Close()
		}
		handlers.Wait()
	})
}
