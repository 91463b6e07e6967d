package proxy

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/tunnel"
)

// The destination's side of the peer control protocol. Each control
// stream is served on its own goroutine, owned by the server, so a request
// that waits (a VM operation on a hung QEMU, a finish draining its streams)
// holds up only its own session. How many may be in flight is bounded per
// peer and in all; past a bound the stream is refused at once with the
// limit reason, and counted.

// Defaults of the control request bounds.
const (
	DefaultMaxControlRequests     = 256
	DefaultMaxPeerControlRequests = 32
)

// inflight counts the control requests being served, in all and per peer.
type inflight struct {
	mu     sync.Mutex
	total  int
	byPeer map[string]int
}

// acquire takes a slot for a request of peer, or reports which bound
// ("peer" or "all") refuses it.
func (f *inflight) acquire(peer string, max, perPeer int) (scope string, ok bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.byPeer == nil {
		f.byPeer = make(map[string]int)
	}
	switch {
	case f.byPeer[peer] >= perPeer:
		return "peer", false
	case f.total >= max:
		return "all", false
	}
	f.total++
	f.byPeer[peer]++
	return "", true
}

func (f *inflight) release(peer string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.total--
	if f.byPeer[peer]--; f.byPeer[peer] == 0 {
		delete(f.byPeer, peer)
	}
}

func (f *inflight) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.total
}

// startControl serves a control stream on a goroutine of its own, or
// refuses it when too many of the peer's or of all peers' are in flight.
func (s *Server) startControl(in *tunnel.Incoming) {
	scope, ok := s.inflight.acquire(in.Peer, s.cfg.MaxControlRequests, s.cfg.MaxPeerControlRequests)
	if !ok {
		err := &tunnel.RefusedError{Reason: tunnel.ReasonLimit, Detail: "too many control requests in flight"}
		// Counted before the peer can see the refusal.
		s.metrics.refused(err.Reason)
		s.metrics.controlBusy.WithLabelValues(scope).Inc()
		in.Refuse(err)
		s.warn("control request refused", "peer", in.Peer, "reason", err.Reason.String(), "scope", scope)
		return
	}
	s.wg.Go(func() {
		defer s.inflight.release(in.Peer)
		s.serveControl(in)
	})
}

// serveControl answers one control stream from a peer.
func (s *Server) serveControl(in *tunnel.Incoming) {
	st, err := in.Accept()
	if err != nil {
		return
	}
	defer st.Close()
	st.SetDeadline(time.Now().Add(controlTimeout))
	log := s.log.With("peer", in.Peer)
	var req controlRequest
	var resp controlResponse
	if err := readMessage(st, &req); err != nil {
		s.metrics.refused(tunnel.ReasonMalformed)
		log.Warn("control request refused", "err", err.Error())
		resp = controlResponse{Error: err.Error(), Code: control.CodeBadRequest}
	} else {
		// The request is bounded by handleTimeout and ends when the
		// server stops.
		ctx, cancel := context.WithTimeout(s.ctx, handleTimeout)
		resp = s.handlePeer(ctx, in.Peer, req)
		cancel()
		if resp.Error != "" {
			log.Warn("control request failed", "op", req.Op, "session", req.Session, "code", resp.Code, "err", resp.Error)
		}
	}
	if err := writeMessage(st, resp); err == nil {
		st.CloseWrite()
	}
}

// handlePeer serves a control request from a peer: this host is the
// destination of the session.
func (s *Server) handlePeer(ctx context.Context, peer string, req controlRequest) controlResponse {
	if req.Op == opPrepare {
		return s.preparePeer(peer, req)
	}
	if req.Op != opFinish && req.Op != opAbort && !strings.HasPrefix(req.Op, vmOpPrefix) {
		return failed(control.Errorf(control.CodeBadRequest, "unknown control operation %q", req.Op))
	}
	sess, err := s.peerSession(peer, req)
	if err != nil {
		return failed(err)
	}
	switch {
	case strings.HasPrefix(req.Op, vmOpPrefix):
		return s.handleVM(ctx, sess, req)
	case req.Op == opAbort && req.Expired:
		s.endSession(ctx, sess, control.StateExpired, "expired on the source: "+req.Reason, false)
		return controlResponse{}
	case req.Op == opAbort:
		s.endSession(ctx, sess, control.StateAborted, "aborted by the source: "+req.Reason, false)
		return controlResponse{}
	}
	if err := sess.startFinish(); err != nil {
		return failed(err)
	}
	aborted := sess.drain(ctx, s.cfg.FinishGrace)
	info := sess.info()
	s.endSession(ctx, sess, control.StateFinished, "", false)
	s.log.Info("session finished", "session", req.Session, "peer", peer, "aborted_streams", aborted)
	return controlResponse{Channels: info.Channels}
}

// peerSession returns the destination session a peer's request names, if
// the token matches and the session is the peer's. Every failure has the
// same answer, so a peer learns nothing of sessions it holds no token of.
func (s *Server) peerSession(peer string, req controlRequest) (*session, error) {
	unknown := control.Errorf(control.CodeNotFound, "unknown session %s", req.Session)
	sid, err := parseSessionID(req.Session)
	if err != nil {
		return nil, unknown
	}
	sess := s.sessions.get(sid)
	tok, terr := parseToken(req.Token)
	if sess == nil || terr != nil || !sess.checkToken(tok) || sess.peer != peer || sess.role != control.RoleDestination {
		return nil, unknown
	}
	return sess, nil
}

// preparePeer creates a destination session for a peer's prepare request.
func (s *Server) preparePeer(peer string, req controlRequest) controlResponse {
	if s.ctx.Err() != nil {
		return failed(control.Errorf(control.CodeShuttingDown, "migtun is shutting down"))
	}
	if err := checkPrepare(control.PrepareRequest{Peer: peer, Channels: req.Channels}); err != nil {
		return failed(err)
	}
	sess, err := newSession(control.RoleDestination, peer, s.cfg.SessionTTL, s.cfg.MaxSessionStreams)
	if err != nil {
		return failed(err)
	}
	for _, name := range req.Channels {
		rt, ok := s.route(name)
		if !ok {
			return failed(control.Errorf(control.CodeNotFound, "no route for channel %q on this host", name))
		}
		target, own := rt.Target, rt.Target == SessionSocket
		if own {
			target = endpoint.Unix(s.sessionSocketPath(sess, name))
		}
		sess.addChannel(&sessionChannel{name: name, target: target, own: own})
	}
	if err := s.sessions.add(sess, s.cfg.MaxSessions, s.cfg.MaxPeerSessions); err != nil {
		return failed(err)
	}
	s.watch(sess)
	s.log.Info("session prepared for peer", "session", sess.idString(), "peer", peer, "channels", req.Channels)
	return controlResponse{Session: sess.idString(), Token: sess.tokenString(), TTL: s.cfg.SessionTTL.String()}
}

// warn logs a warning about a peer's traffic at most once a second per
// message and reason, counting the ones it leaves out.
func (s *Server) warn(msg string, args ...any) {
	key := msg
	for i := 0; i+1 < len(args); i += 2 {
		if args[i] == "reason" {
			key += "/" + fmt.Sprint(args[i+1]) // one allowance per reason
		}
	}
	if n, ok := s.warnLimit.allow(key); ok {
		if n > 0 {
			args = append(args, "suppressed", n)
		}
		s.log.Warn(msg, args...)
	}
}

// rateLimit lets one event per key through each interval.
type rateLimit struct {
	mu    sync.Mutex
	last  map[string]time.Time
	quiet map[string]int
}

// allow reports whether an event of key may be logged now, and how many
// were left out since the last one that was.
func (r *rateLimit) allow(key string) (int, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.last == nil {
		r.last, r.quiet = make(map[string]time.Time), make(map[string]int)
	}
	now := time.Now()
	if now.Sub(r.last[key]) < time.Second {
		r.quiet[key]++
		return 0, false
	}
	n := r.quiet[key]
	r.last[key], r.quiet[key] = now, 0
	return n, true
}
