package proxy

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/migtun/migtun/tunnel"
)

// Session errors the control endpoint maps to HTTP statuses.
var (
	// ErrNoSession: no session with that ID (or it has ended).
	ErrNoSession = errors.New("no such session")
	// ErrSessionLimit: MaxSessions sessions are open already.
	ErrSessionLimit = errors.New("session limit reached")
	// ErrBadRequest: the request cannot be served as asked.
	ErrBadRequest = errors.New("bad request")
)

// historySize is how many ended sessions the registry remembers for show.
const historySize = 64

// sessions is the registry of a server's migration sessions.
type sessions struct {
	mu      sync.Mutex
	open    map[tunnel.SessionID]*session
	history []SessionInfo // ended sessions, oldest first
}

func (r *sessions) get(id tunnel.SessionID) *session {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.open[id]
}

// add registers s unless max sessions are open.
func (r *sessions) add(s *session, max int) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.open == nil {
		r.open = make(map[tunnel.SessionID]*session)
	}
	if len(r.open) >= max {
		return fmt.Errorf("%w: %d sessions are open", ErrSessionLimit, len(r.open))
	}
	r.open[s.id] = s
	return nil
}

// release forgets an ended session and keeps its final description.
func (r *sessions) release(s *session) {
	info := s.info()
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.open[s.id]; !ok {
		return
	}
	delete(r.open, s.id)
	r.history = append(r.history, info)
	if len(r.history) > historySize {
		r.history = append(r.history[:0], r.history[len(r.history)-historySize:]...)
	}
}

func (r *sessions) all() []*session {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]*session, 0, len(r.open))
	for _, s := range r.open {
		out = append(out, s)
	}
	return out
}

// Sessions lists the open sessions and the recently ended ones.
func (s *Server) Sessions() []SessionInfo {
	var out []SessionInfo
	s.sessions.mu.Lock()
	out = append(out, s.sessions.history...)
	s.sessions.mu.Unlock()
	for _, sess := range s.sessions.all() {
		out = append(out, sess.info())
	}
	return out
}

// Session describes one session, open or recently ended.
func (s *Server) Session(id string) (SessionInfo, error) {
	sid, err := parseSessionID(id)
	if err != nil {
		return SessionInfo{}, fmt.Errorf("%w: %v", ErrBadRequest, err)
	}
	if sess := s.sessions.get(sid); sess != nil {
		return sess.info(), nil
	}
	s.sessions.mu.Lock()
	defer s.sessions.mu.Unlock()
	for _, h := range s.sessions.history {
		if h.ID == id {
			return h, nil
		}
	}
	return SessionInfo{}, fmt.Errorf("%w: %s", ErrNoSession, id)
}

// PrepareRequest asks for a session with a peer.
type PrepareRequest struct {
	// Peer is the host:port of the peer's migtun.
	Peer string `json:"peer"`
	// Channels are the channels the migration needs, e.g. main and nbd.
	Channels []string `json:"channels"`
	// Listen is "unix" (default: sockets under Config.SocketDir) or "tcp"
	// (127.0.0.1 on an ephemeral port).
	Listen string `json:"listen,omitempty"`
}

// Prepare creates a session with a peer (the source's side of prepare and
// perform): the peer resolves every channel through its own routes and
// answers with the session's ID and token; then a local listener is opened
// per channel and its URIs returned.
func (s *Server) Prepare(ctx context.Context, req PrepareRequest) (SessionInfo, error) {
	if err := checkPrepare(req); err != nil {
		return SessionInfo{}, err
	}
	if s.ctx.Err() != nil {
		return SessionInfo{}, errors.New("server is shutting down")
	}
	resp, err := s.callPeer(ctx, req.Peer, controlRequest{Op: opPrepare, Channels: req.Channels})
	if err != nil {
		return SessionInfo{}, err
	}
	sess, err := newSession(RoleSource, req.Peer, s.cfg.SessionTTL, s.cfg.MaxSessionStreams)
	if err == nil {
		sess.id, err = parseSessionID(resp.Session)
	}
	if err == nil {
		sess.token, err = parseToken(resp.Token)
	}
	// The channels are complete before the session is registered, so
	// nothing reads them while they change.
	for _, name := range req.Channels {
		if err != nil {
			break
		}
		var c *sessionChannel
		if c, err = s.listenChannel(sess, name, req.Listen); err == nil {
			sess.addChannel(c)
		} else {
			err = fmt.Errorf("opening the local listener of channel %q: %w", name, err)
		}
	}
	if err == nil {
		err = s.sessions.add(sess, s.cfg.MaxSessions)
	}
	if err != nil {
		for _, c := range sess.order {
			c.fwd.ln.Close()
		}
		s.tellPeer(req.Peer, controlRequest{Op: opAbort, Session: resp.Session, Token: resp.Token, Reason: err.Error()})
		return SessionInfo{}, err
	}
	for _, c := range sess.order {
		s.wg.Add(1)
		go c.fwd.acceptLoop()
	}
	s.armExpiry(sess)
	s.log.Info("session prepared", "session", sess.idString(), "peer", req.Peer, "channels", req.Channels)
	return sess.info(), nil
}

func checkPrepare(req PrepareRequest) error {
	if req.Peer == "" {
		return fmt.Errorf("%w: no peer given", ErrBadRequest)
	}
	if len(req.Channels) == 0 {
		return fmt.Errorf("%w: no channel given", ErrBadRequest)
	}
	seen := map[string]bool{}
	for _, c := range req.Channels {
		if !tunnel.ValidChannel(c) {
			return fmt.Errorf("%w: bad channel name %q", ErrBadRequest, c)
		}
		if seen[c] {
			return fmt.Errorf("%w: channel %q given twice", ErrBadRequest, c)
		}
		seen[c] = true
	}
	if req.Listen != "" && req.Listen != "unix" && req.Listen != "tcp" {
		return fmt.Errorf("%w: listen %q: want unix or tcp", ErrBadRequest, req.Listen)
	}
	return nil
}

// listenChannel opens the source's local listener of one session channel.
func (s *Server) listenChannel(sess *session, name, kind string) (*sessionChannel, error) {
	ep := Endpoint{Network: "tcp", Address: "127.0.0.1:0"}
	if kind != "tcp" {
		if err := os.MkdirAll(s.cfg.SocketDir, 0o700); err != nil {
			return nil, fmt.Errorf("socket directory: %w", err)
		}
		ep = Endpoint{Network: "unix", Address: s.sessionSocketPath(sess, name)}
	}
	ln, err := ep.listen()
	if err != nil {
		return nil, err
	}
	c := &sessionChannel{name: name}
	if ep.Network == "unix" {
		c.uri = "unix:" + ep.Address
		c.lvURI = "unix://" + ep.Address
		if name == "libvirt" {
			c.lvURI = "qemu+unix:///system?socket=" + ep.Address
		}
	} else {
		c.uri = "tcp:" + ln.Addr().String()
		c.lvURI = "tcp://" + ln.Addr().String()
		if name == "libvirt" {
			c.lvURI = "qemu+tcp://" + ln.Addr().String() + "/system"
		}
	}
	c.fwd = &forwarder{Forward: Forward{Listen: ep, Peer: sess.peer, Channel: name}, ln: ln, srv: s, sess: sess, ch: c}
	return c, nil
}

// sessionSocketPath names the UNIX socket of a session's channel in this
// host's socket directory.
func (s *Server) sessionSocketPath(sess *session, channel string) string {
	return filepath.Join(s.cfg.SocketDir, sess.idString()[:12]+"-"+channel+".sock")
}

// armExpiry ends the session if it sees no stream within its TTL, and
// later if it stays without a stream for that long: an active session whose
// streams all ended without a finish (a peer died, QEMU gave up) is
// reclaimed too.
func (s *Server) armExpiry(sess *session) {
	sess.mu.Lock()
	defer sess.mu.Unlock()
	sess.timerWG = &s.timers
	sess.idle = s.cfg.SessionTTL
	sess.expire = func() {
		sess.mu.Lock()
		idle := sess.state == StatePrepared || (sess.state == StateActive && len(sess.relays) == 0)
		sess.mu.Unlock()
		if idle {
			s.endSession(sess, StateExpired, fmt.Sprintf("no stream for %v", s.cfg.SessionTTL), sess.role == RoleSource)
		}
	}
	sess.armTimer(time.Until(sess.expires))
}

// FinishReport is the outcome of finishing a session.
type FinishReport struct {
	Session SessionInfo `json:"session"`
	// Peer is the peer's view of the channels.
	Peer []ChannelInfo `json:"peer"`
	// Mismatch lists every difference between the two views; empty when
	// both hosts saw the same streams and bytes.
	Mismatch []string `json:"mismatch"`
	// Aborted counts streams still open after the grace period, aborted.
	Aborted int `json:"aborted_streams"`
}

// Finish ends a source session (finish and confirm): no new streams are
// taken, streams in flight get up to grace to end, the peer reports its
// counts and releases its side, and both views are compared.
func (s *Server) Finish(ctx context.Context, id string, grace time.Duration) (*FinishReport, error) {
	sess, err := s.openSession(id)
	if err != nil {
		return nil, err
	}
	if sess.role != RoleSource {
		return nil, fmt.Errorf("%w: finish is asked of the source host; this host is the session's destination", ErrBadRequest)
	}
	if !sess.setState(StateFinishing, "") {
		return nil, fmt.Errorf("%w: %s", ErrNoSession, id)
	}
	for _, c := range sess.order {
		c.fwd.ln.Close()
	}
	rep := &FinishReport{Aborted: sess.drain(grace)}
	resp, err := s.callPeer(ctx, sess.peer, controlRequest{Op: opFinish, Session: id, Token: hex.EncodeToString(sess.token[:])})
	if err != nil {
		s.endSession(sess, StateAborted, "finish: "+err.Error(), false)
		return nil, err
	}
	rep.Peer = resp.Channels
	local := sess.info().Channels
	rep.Mismatch = compare(local, rep.Peer)
	if rep.Mismatch == nil {
		rep.Mismatch = []string{}
	}
	s.endSession(sess, StateFinished, "", false)
	rep.Session, _ = s.Session(id)
	s.log.Info("session finished", "session", id, "mismatches", len(rep.Mismatch), "aborted_streams", rep.Aborted)
	return rep, nil
}

// Abort ends a session at once on both hosts: every stream is aborted so
// QEMU sees the failure, and everything is released.
func (s *Server) Abort(id, reason string) (SessionInfo, error) {
	sess, err := s.openSession(id)
	if err != nil {
		return SessionInfo{}, err
	}
	if reason == "" {
		reason = "aborted by the operator"
	}
	s.abortSession(sess, reason, true)
	return s.Session(id)
}

func (s *Server) openSession(id string) (*session, error) {
	sid, err := parseSessionID(id)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadRequest, err)
	}
	sess := s.sessions.get(sid)
	if sess == nil {
		return nil, fmt.Errorf("%w: %s", ErrNoSession, id)
	}
	return sess, nil
}

func (s *Server) abortSession(sess *session, reason string, tellPeer bool) {
	s.endSession(sess, StateAborted, reason, tellPeer)
}

// endSession moves the session to its final state, closes its listeners,
// aborts its streams, tells the peer if asked, and releases it.
func (s *Server) endSession(sess *session, st State, reason string, tellPeer bool) {
	if !sess.setState(st, reason) {
		return
	}
	for _, c := range sess.order {
		if c.fwd != nil {
			c.fwd.ln.Close() // removes the socket file
		}
	}
	sess.abortRelays()
	sess.wg.Wait()
	s.vmSessionEnded(sess)
	if tellPeer && sess.role == RoleSource {
		s.tellPeer(sess.peer, controlRequest{Op: opAbort, Session: sess.idString(),
			Token: hex.EncodeToString(sess.token[:]), Reason: reason, Expired: st == StateExpired})
	}
	s.sessions.release(sess)
	s.metrics.sessionEnded(st)
	if st != StateFinished {
		s.log.Warn("session ended", "session", sess.idString(), "state", st, "reason", reason)
	}
}

// tellPeer sends a control request whose answer does not matter, bounded
// in time; a failure is logged.
func (s *Server) tellPeer(addr string, req controlRequest) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := s.callPeer(ctx, addr, req); err != nil {
		s.log.Warn("could not tell the peer", "op", req.Op, "session", req.Session, "err", err.Error())
	}
}

// handlePeer serves a control request from a peer: this host is the
// destination of the session.
func (r *sessions) handlePeer(s *Server, peer string, req controlRequest) controlResponse {
	switch req.Op {
	case opPrepare:
		return s.preparePeer(peer, req)
	case opFinish, opAbort, opVMPrepare, opVMFinish, opVMRecover, opVMAbort:
		sid, err := parseSessionID(req.Session)
		if err != nil {
			return controlResponse{Error: err.Error()}
		}
		sess := r.get(sid)
		tok, terr := parseToken(req.Token)
		if sess == nil || terr != nil || !sess.checkToken(tok) || sess.peer != peer || sess.role != RoleDestination {
			return controlResponse{Error: "unknown session " + req.Session}
		}
		switch req.Op {
		case opVMPrepare, opVMFinish, opVMRecover, opVMAbort:
			return s.handleVM(sess, req)
		}
		if req.Op == opAbort && req.Expired {
			s.endSession(sess, StateExpired, "expired on the source: "+req.Reason, false)
			return controlResponse{}
		}
		if req.Op == opAbort {
			s.abortSession(sess, "aborted by the source: "+req.Reason, false)
			return controlResponse{}
		}
		if !sess.setState(StateFinishing, "") {
			return controlResponse{Error: "session already ended"}
		}
		aborted := sess.drain(s.cfg.FinishGrace)
		info := sess.info()
		s.endSession(sess, StateFinished, "", false)
		s.log.Info("session finished", "session", req.Session, "peer", peer, "aborted_streams", aborted)
		return controlResponse{Channels: info.Channels}
	}
	return controlResponse{Error: fmt.Sprintf("unknown control operation %q", req.Op)}
}

// preparePeer creates a destination session for a peer's prepare request.
func (s *Server) preparePeer(peer string, req controlRequest) controlResponse {
	if s.ctx.Err() != nil {
		return controlResponse{Error: "shutting down"}
	}
	if err := checkPrepare(PrepareRequest{Peer: peer, Channels: req.Channels}); err != nil {
		return controlResponse{Error: err.Error()}
	}
	sess, err := newSession(RoleDestination, peer, s.cfg.SessionTTL, s.cfg.MaxSessionStreams)
	if err != nil {
		return controlResponse{Error: err.Error()}
	}
	for _, name := range req.Channels {
		target, ok := s.route(name)
		if !ok {
			return controlResponse{Error: fmt.Sprintf("no route for channel %q on this host", name)}
		}
		if target == SessionSocket {
			target = Endpoint{Network: "unix", Address: s.sessionSocketPath(sess, name)}
		}
		sess.addChannel(&sessionChannel{name: name, target: target})
	}
	if err := s.sessions.add(sess, s.cfg.MaxSessions); err != nil {
		return controlResponse{Error: err.Error()}
	}
	s.armExpiry(sess)
	s.log.Info("session prepared for peer", "session", sess.idString(), "peer", peer, "channels", req.Channels)
	return controlResponse{Session: sess.idString(), Token: hex.EncodeToString(sess.token[:]), TTL: s.cfg.SessionTTL.String()}
}

// sampleLoop updates the rates of every session once a second.
func (s *Server) sampleLoop() {
	defer s.wg.Done()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	last := time.Now()
	for {
		select {
		case <-s.ctx.Done():
			return
		case now := <-t.C:
			for _, sess := range s.sessions.all() {
				sess.sample(now.Sub(last))
			}
			last = now
		}
	}
}
