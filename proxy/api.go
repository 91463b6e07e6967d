package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
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
		out = append(out, control.RouteInfo{Channel: rt.Channel, Target: targetString(rt.Target)})
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
	s.log.Info("route registered", "channel", rt.Channel, "target", targetString(rt.Target))
	writeJSON(w, http.StatusOK, control.RouteInfo{Channel: rt.Channel, Target: targetString(rt.Target)})
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

// ServeControl serves the control endpoint on ln until the server stops.
func (s *Server) ServeControl(ln net.Listener) {
	s.serveHTTP(ln, s.Handler())
}

// ListenControl opens the control endpoint at ep (a UNIX socket path or a
// TCP address) and serves it. The UNIX socket's mode is what the process
// umask leaves: migtun serve runs under 077.
func (s *Server) ListenControl(ep endpoint.Endpoint) (net.Addr, error) {
	ln, err := ep.Listen()
	if err != nil {
		return nil, err
	}
	s.ServeControl(ln)
	return ln.Addr(), nil
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
	s.wg.Go(func() {
		hs.Serve(ln) // ends when Shutdown closes ln
	})
	s.wg.Go(func() {
		<-s.ctx.Done()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		hs.Shutdown(ctx)
	})
}
