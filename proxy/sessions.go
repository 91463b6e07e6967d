package proxy

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/tunnel"
)

// historySize is how many ended sessions the registry remembers for show.
const historySize = 64

// sessions is the registry of a server's migration sessions.
type sessions struct {
	mu      sync.Mutex
	open    map[tunnel.SessionID]*session
	history []control.SessionInfo // ended sessions, oldest first
	closed  bool                  // the server is stopping: no more sessions
}

func (r *sessions) get(id tunnel.SessionID) *session {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.open[id]
}

// add registers s unless max sessions are open, or perPeer of them belong
// to s's peer (0: no share), or its ID is taken.
func (r *sessions) add(s *session, max, perPeer int) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.open == nil {
		r.open = make(map[tunnel.SessionID]*session)
	}
	if r.closed {
		return control.Errorf(control.CodeShuttingDown, "migtun is shutting down")
	}
	if len(r.open) >= max {
		return control.Errorf(control.CodeLimit, "session limit reached: %d sessions are open", len(r.open))
	}
	if perPeer > 0 {
		n := 0
		for _, o := range r.open {
			if o.peer == s.peer && o.role == s.role {
				n++
			}
		}
		if n >= perPeer {
			return control.Errorf(control.CodeLimit, "session limit reached: peer %s holds %d sessions, its share", s.peer, n)
		}
	}
	if _, dup := r.open[s.id]; dup {
		return control.Errorf(control.CodeBadRequest, "session %s exists already", s.idString())
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

// close refuses new sessions from now on and returns the open ones.
func (r *sessions) close() []*session {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	return r.all()
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
func (s *Server) Sessions() []control.SessionInfo {
	out := []control.SessionInfo{}
	s.sessions.mu.Lock()
	out = append(out, s.sessions.history...)
	s.sessions.mu.Unlock()
	for _, sess := range s.sessions.all() {
		out = append(out, sess.info())
	}
	return out
}

// Session describes one session, open or recently ended.
func (s *Server) Session(id string) (control.SessionInfo, error) {
	sid, err := parseSessionID(id)
	if err != nil {
		return control.SessionInfo{}, err
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
	return control.SessionInfo{}, control.Errorf(control.CodeNotFound, "no such session: %s", id)
}

// Prepare creates a session with a peer (the source's side of prepare and
// perform): the peer resolves every channel through its own routes and
// answers with the session's ID and token; then a local listener is opened
// per channel and its URIs returned.
func (s *Server) Prepare(ctx context.Context, req control.PrepareRequest) (control.SessionInfo, error) {
	if err := checkPrepare(req); err != nil {
		return control.SessionInfo{}, err
	}
	if s.ctx.Err() != nil {
		return control.SessionInfo{}, control.Errorf(control.CodeShuttingDown, "migtun is shutting down")
	}
	resp, err := s.callPeer(ctx, req.Peer, controlRequest{Op: opPrepare, Channels: req.Channels})
	if err != nil {
		return control.SessionInfo{}, err
	}
	sess, err := s.sourceSession(req, resp)
	if err != nil {
		s.tellPeer(context.Background(), req.Peer, controlRequest{Op: opAbort, Session: resp.Session, Token: resp.Token, Reason: err.Error()})
		return control.SessionInfo{}, err
	}
	for _, c := range sess.order {
		s.wg.Go(c.fwd.acceptLoop)
	}
	s.watch(sess)
	s.log.Info("session prepared", "session", sess.idString(), "peer", req.Peer, "channels", req.Channels)
	return sess.info(), nil
}

// sourceSession builds and registers the source's side of a session the
// peer prepared: its ID and token, and a local listener per channel.
func (s *Server) sourceSession(req control.PrepareRequest, resp *controlResponse) (*session, error) {
	sess, err := newSession(control.RoleSource, req.Peer, s.cfg.SessionTTL, s.cfg.MaxSessionStreams)
	if err != nil {
		return nil, err
	}
	if sess.id, err = parseSessionID(resp.Session); err != nil {
		return nil, err
	}
	if sess.token, err = parseToken(resp.Token); err != nil {
		return nil, err
	}
	// The channels are complete before the session is registered, so
	// nothing reads them while they change.
	for _, name := range req.Channels {
		c, err := s.listenChannel(sess, name)
		if err != nil {
			sess.closeListeners()
			return nil, fmt.Errorf("opening the local listener of channel %q: %w", name, err)
		}
		sess.addChannel(c)
	}
	if err := s.sessions.add(sess, s.cfg.MaxSessions, 0); err != nil {
		sess.closeListeners()
		return nil, err
	}
	return sess, nil
}

func checkPrepare(req control.PrepareRequest) error {
	if req.Peer == "" {
		return control.Errorf(control.CodeBadRequest, "no peer given")
	}
	if len(req.Channels) == 0 {
		return control.Errorf(control.CodeBadRequest, "no channel given")
	}
	seen := map[string]bool{}
	for _, c := range req.Channels {
		if !tunnel.ValidChannel(c) {
			return control.Errorf(control.CodeBadRequest, "bad channel name %q", c)
		}
		if seen[c] {
			return control.Errorf(control.CodeBadRequest, "channel %q given twice", c)
		}
		seen[c] = true
	}
	switch req.Listen {
	case "", "unix":
	case "tcp":
		return control.Errorf(control.CodeBadRequest, `listen "tcp" is not offered: any local user could connect to a loopback port before QEMU and feed the session; use unix (the default), whose sockets only migtun's user can reach`)
	default:
		return control.Errorf(control.CodeBadRequest, "listen %q: want unix", req.Listen)
	}
	return nil
}

// listenChannel opens the source's local listener of one session channel:
// a UNIX socket in the socket directory.
func (s *Server) listenChannel(sess *session, name string) (*sessionChannel, error) {
	ep := endpoint.Unix(s.sessionSocketPath(sess, name))
	ln, err := ep.Listen()
	if err != nil {
		return nil, err
	}
	c := &sessionChannel{name: name, uri: ep.String(), lvURI: "unix://" + ep.Address}
	if name == "libvirt" {
		c.lvURI = "qemu+unix:///system?socket=" + ep.Address
	}
	c.fwd = &forwarder{Forward: Forward{Listen: ep, Peer: sess.peer, Channel: name}, ln: ln, srv: s, sess: sess, ch: c}
	return c, nil
}

// sessionSocketPath names the UNIX socket of a session's channel in this
// host's socket directory.
func (s *Server) sessionSocketPath(sess *session, channel string) string {
	return filepath.Join(s.cfg.SocketDir, sess.idString()[:12]+"-"+channel+".sock")
}

// watch runs the session's expiry watch, owned by the server.
func (s *Server) watch(sess *session) {
	s.wg.Go(func() {
		sess.watchExpiry(func(reason string) {
			s.endSession(context.Background(), sess, control.StateExpired, reason, sess.role == control.RoleSource)
		})
	})
}

// Finish ends a source session (finish and confirm): no new streams are
// taken, streams in flight get up to grace to end, the peer reports its
// counts and releases its side, and both views are compared.
func (s *Server) Finish(ctx context.Context, id string, grace time.Duration) (*control.FinishReport, error) {
	sess, err := s.openSession(id)
	if err != nil {
		return nil, err
	}
	if sess.role != control.RoleSource {
		return nil, control.Errorf(control.CodeBadRequest, "finish is asked of the source host; this host is the session's destination")
	}
	if err := sess.startFinish(); err != nil {
		return nil, err
	}
	sess.closeListeners()
	rep := &control.FinishReport{Aborted: sess.drain(ctx, grace)}
	resp, err := s.callPeer(ctx, sess.peer, controlRequest{Op: opFinish, Session: id, Token: sess.tokenString()})
	if err != nil {
		s.endSession(ctx, sess, control.StateAborted, "finish: "+err.Error(), false)
		return nil, err
	}
	rep.Peer = resp.Channels
	rep.Mismatch = compare(sess.info().Channels, rep.Peer)
	if rep.Mismatch == nil {
		rep.Mismatch = []string{}
	}
	s.endSession(ctx, sess, control.StateFinished, "", false)
	rep.Session, _ = s.Session(id)
	s.log.Info("session finished", "session", id, "mismatches", len(rep.Mismatch), "aborted_streams", rep.Aborted)
	return rep, nil
}

// Abort ends a session at once on both hosts: every stream is aborted so
// QEMU sees the failure, and everything is released. Telling the peer is
// bounded by ctx.
func (s *Server) Abort(ctx context.Context, id, reason string) (control.SessionInfo, error) {
	sess, err := s.openSession(id)
	if err != nil {
		return control.SessionInfo{}, err
	}
	if reason == "" {
		reason = "aborted by the operator"
	}
	s.endSession(ctx, sess, control.StateAborted, reason, true)
	return s.Session(id)
}

func (s *Server) openSession(id string) (*session, error) {
	sid, err := parseSessionID(id)
	if err != nil {
		return nil, err
	}
	sess := s.sessions.get(sid)
	if sess == nil {
		return nil, control.Errorf(control.CodeNotFound, "no such session: %s", id)
	}
	return sess, nil
}

// endSession ends the session in state st (see session.end), releases what
// a destination's VM held, tells the peer if asked (bounded by ctx and
// peerNoticeTimeout), and forgets the session.
func (s *Server) endSession(ctx context.Context, sess *session, st control.State, reason string, tellPeer bool) {
	if !sess.end(st, reason) {
		return
	}
	s.vmSessionEnded(sess)
	if tellPeer && sess.role == control.RoleSource {
		s.tellPeer(ctx, sess.peer, controlRequest{Op: opAbort, Session: sess.idString(),
			Token: sess.tokenString(), Reason: reason, Expired: st == control.StateExpired})
	}
	s.sessions.release(sess)
	s.metrics.sessionEnded(st)
	if st != control.StateFinished {
		s.log.Warn("session ended", "session", sess.idString(), "state", st, "reason", reason)
	}
}

// endAllSessions ends every open session at once, telling peers
// concurrently, each bounded by ctx and peerNoticeTimeout; it returns when
// all have ended.
func (s *Server) endAllSessions(ctx context.Context) {
	var wg sync.WaitGroup
	for _, sess := range s.sessions.close() {
		wg.Go(func() { s.endSession(ctx, sess, control.StateAborted, "migtun is stopping", true) })
	}
	wg.Wait()
}

// sampleLoop updates the rates of every session once a second.
func (s *Server) sampleLoop() {
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
