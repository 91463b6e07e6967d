package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"
)

// The local control endpoint: HTTP with JSON, on a UNIX socket (mode 0600)
// and optionally on TCP. Paths are versioned:
//
//	GET    /healthz                      {"status":"ok"}
//	GET    /metrics                      Prometheus exposition
//	GET    /v1/sessions                  [SessionInfo…]
//	POST   /v1/sessions                  PrepareRequest → SessionInfo
//	GET    /v1/sessions/{id}             SessionInfo
//	POST   /v1/sessions/{id}/finish      ?grace=10s → FinishReport
//	POST   /v1/sessions/{id}/abort       {"reason":…} → SessionInfo
//	PUT    /v1/sessions/{id}/progress    MigrationProgress (from migtun migrate, for metrics)
//	GET    /v1/routes                    [{"channel":…,"target":…}…]
//	PUT    /v1/routes/{channel}          {"target":"unix:/path"}
//	DELETE /v1/routes/{channel}
//
// Errors are {"error": "…"} with a 4xx or 5xx status.

// maxRequestBody bounds the body of a control request.
const maxRequestBody = 64 << 10

// Handler returns the control endpoint's HTTP handler.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.Handle("GET /metrics", s.metrics.handler())
	mux.HandleFunc("GET /v1/sessions", func(w http.ResponseWriter, r *http.Request) {
		list := s.Sessions()
		if list == nil {
			list = []SessionInfo{}
		}
		writeJSON(w, http.StatusOK, list)
	})
	mux.HandleFunc("POST /v1/sessions", func(w http.ResponseWriter, r *http.Request) {
		var req PrepareRequest
		if !readJSON(w, r, &req) {
			return
		}
		info, err := s.Prepare(r.Context(), req)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusCreated, info)
	})
	mux.HandleFunc("GET /v1/sessions/{id}", func(w http.ResponseWriter, r *http.Request) {
		info, err := s.Session(r.PathValue("id"))
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, info)
	})
	mux.HandleFunc("POST /v1/sessions/{id}/finish", func(w http.ResponseWriter, r *http.Request) {
		grace := s.cfg.FinishGrace
		if g := r.URL.Query().Get("grace"); g != "" {
			d, err := time.ParseDuration(g)
			if err != nil || d < 0 {
				writeError(w, fmt.Errorf("%w: grace %q: want a duration such as 10s", ErrBadRequest, g))
				return
			}
			grace = d
		}
		rep, err := s.Finish(r.Context(), r.PathValue("id"), grace)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, rep)
	})
	mux.HandleFunc("POST /v1/sessions/{id}/abort", func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			Reason string `json:"reason"`
		}
		if r.ContentLength != 0 && !readJSON(w, r, &body) {
			return
		}
		info, err := s.Abort(r.PathValue("id"), body.Reason)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, info)
	})
	mux.HandleFunc("GET /v1/routes", func(w http.ResponseWriter, r *http.Request) {
		type route struct {
			Channel string `json:"channel"`
			Target  string `json:"target"`
		}
		out := []route{}
		for _, rt := range s.Routes() {
			out = append(out, route{rt.Channel, rt.Target.String()})
		}
		writeJSON(w, http.StatusOK, out)
	})
	mux.HandleFunc("PUT /v1/routes/{channel}", func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			Target string `json:"target"`
		}
		if !readJSON(w, r, &body) {
			return
		}
		rt, err := ParseRoute(r.PathValue("channel") + "=" + body.Target)
		if err != nil {
			writeError(w, fmt.Errorf("%w: %v", ErrBadRequest, err))
			return
		}
		s.SetRoute(rt)
		s.log.Info("route registered", "channel", rt.Channel, "target", rt.Target.String())
		writeJSON(w, http.StatusOK, map[string]string{"channel": rt.Channel, "target": rt.Target.String()})
	})
	mux.HandleFunc("DELETE /v1/routes/{channel}", func(w http.ResponseWriter, r *http.Request) {
		if !s.DeleteRoute(r.PathValue("channel")) {
			writeError(w, fmt.Errorf("%w: no route for channel %q", errNotFound, r.PathValue("channel")))
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("PUT /v1/sessions/{id}/progress", func(w http.ResponseWriter, r *http.Request) {
		var p MigrationProgress
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
	})
	s.vmHandlers(mux)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, fmt.Errorf("%w: %s %s (see GET /v1/sessions, POST /v1/sessions, /healthz)", errNotFound, r.Method, r.URL.Path))
	})
	return mux
}

var errNotFound = errors.New("not found")

func readJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(io.LimitReader(r.Body, maxRequestBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeError(w, fmt.Errorf("%w: request body: %v", ErrBadRequest, err))
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

func writeError(w http.ResponseWriter, err error) {
	status := http.StatusBadGateway // the peer failed or refused
	switch {
	case errors.Is(err, ErrBadRequest):
		status = http.StatusBadRequest
	case errors.Is(err, ErrNoSession), errors.Is(err, errNotFound):
		status = http.StatusNotFound
	case errors.Is(err, ErrSessionLimit):
		status = http.StatusTooManyRequests
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		status = http.StatusGatewayTimeout
	}
	writeJSON(w, status, map[string]string{"error": err.Error()})
}

// ServeControl serves the control endpoint on ln until the server stops.
// For a UNIX socket the file is made readable and writable by its owner
// only before anything is served.
func (s *Server) ServeControl(ln net.Listener) error {
	if ul, ok := ln.(*net.UnixListener); ok {
		if err := os.Chmod(ul.Addr().String(), 0o600); err != nil {
			ln.Close()
			return fmt.Errorf("control socket: %w", err)
		}
	}
	s.serveHTTP(ln, s.Handler())
	return nil
}

// ListenControl opens the control endpoint at ep (a UNIX socket path or a
// TCP address) and serves it.
func (s *Server) ListenControl(ep Endpoint) (net.Addr, error) {
	ln, err := ep.listen()
	if err != nil {
		return nil, err
	}
	if err := s.ServeControl(ln); err != nil {
		return nil, err
	}
	return ln.Addr(), nil
}

// ListenMetrics serves /metrics alone on a TCP address until the server
// stops.
func (s *Server) ListenMetrics(addr string) (net.Addr, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", s.metrics.handler())
	s.serveHTTP(ln, mux)
	return ln.Addr(), nil
}

// serveHTTP serves h on ln until the server stops.
func (s *Server) serveHTTP(ln net.Listener, h http.Handler) {
	hs := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second,
		BaseContext: func(net.Listener) context.Context { return s.ctx }}
	s.wg.Add(2)
	go func() {
		defer s.wg.Done()
		hs.Serve(ln) // ends when Shutdown closes ln
	}()
	go func() {
		defer s.wg.Done()
		<-s.ctx.Done()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		hs.Shutdown(ctx)
	}()
}
