package proxy

import (
	"context"
	"fmt"
	"log/slog"
	"sync"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/tunnel"
)

// acceptStreams takes incoming streams from the tunnel port. Control
// streams are served concurrently (see startControl). A data stream is
// admitted first — its session, token and peer checked and its place in
// the session's stream quota taken, or it is refused at once — and then
// connected to its route after the earlier streams of its (session,
// channel), in the order they arrived, which is what QEMU needs of
// multifd; nothing else waits for them.
func (s *Server) acceptStreams() {
	for {
		in, err := s.port.Accept(s.ctx)
		if err != nil {
			return
		}
		if in.Header.Kind == tunnel.KindControl {
			s.startControl(in)
			continue
		}
		d, ok := s.admit(in)
		if !ok {
			continue
		}
		key := orderKey{session: in.Header.Session, channel: in.Header.Channel}
		prev, done := s.order.next(key)
		s.connecting.Add(1)
		s.wg.Go(func() {
			defer s.connecting.Add(-1)
			defer s.order.finish(key, done)
			<-prev
			s.connect(d)
		})
	}
}

// delivery is an admitted incoming stream, on its way to its target.
type delivery struct {
	in     *tunnel.Incoming
	relay  *activeRelay
	target endpoint.Endpoint
	log    *slog.Logger
}

// refuse refuses an incoming stream, counted before the peer can see it,
// and logs it (rate-limited).
func (s *Server) refuse(in *tunnel.Incoming, err *tunnel.RefusedError) {
	s.metrics.refused(err.Reason)
	in.Refuse(err)
	s.warn("stream refused", "channel", in.Header.Channel, "peer", in.Peer, "reason", err.Reason.String(), "err", err.Detail)
}

// admit checks an incoming data stream against this host's sessions and
// routes, and refuses it if it may not go on.
func (s *Server) admit(in *tunnel.Incoming) (*delivery, bool) {
	h := in.Header
	refuse := func(err *tunnel.RefusedError) (*delivery, bool) {
		s.refuse(in, err)
		return nil, false
	}
	if h.Kind != tunnel.KindData {
		return refuse(&tunnel.RefusedError{Reason: tunnel.ReasonUnknownKind, Detail: h.Kind.String() + " streams are not served here"})
	}
	d := &delivery{in: in, relay: &activeRelay{channel: h.Channel, role: control.RoleDestination},
		log: s.log.With(slog.String("channel", h.Channel), slog.Uint64("index", h.Index),
			slog.String("peer", in.Peer), slog.String("transport", string(in.Transport)))}
	if h.Session == (tunnel.SessionID{}) {
		rt, ok := s.route(h.Channel)
		switch {
		case !ok:
			return refuse(&tunnel.RefusedError{Reason: tunnel.ReasonNoRoute, Detail: fmt.Sprintf("no route for channel %q", h.Channel)})
		case !rt.Sessionless:
			// Only a session's token opens this channel: a peer without
			// one must not reach the target beside the session's streams.
			return refuse(&tunnel.RefusedError{Reason: tunnel.ReasonUnauthorized, Detail: fmt.Sprintf("channel %q takes streams only within a session", h.Channel)})
		}
		d.target = rt.Target
		return d, true
	}
	sess := s.sessions.get(h.Session)
	// The same answer for every failure, so a peer learns nothing about
	// sessions it does not hold the token of.
	if sess == nil || sess.role != control.RoleDestination || !sess.checkToken(h.Token) || sess.peer != in.Peer {
		return refuse(&tunnel.RefusedError{Reason: tunnel.ReasonUnknownSession, Detail: "unknown session or wrong token"})
	}
	ch := sess.byName[h.Channel]
	if ch == nil {
		return refuse(&tunnel.RefusedError{Reason: tunnel.ReasonNoRoute, Detail: fmt.Sprintf("channel %q is not part of the session", h.Channel)})
	}
	// Counted here, before it waits for its turn: the session's quota
	// bounds what one peer can queue.
	if err := sess.reserveStream(); err != nil {
		return refuse(&tunnel.RefusedError{Reason: tunnel.ReasonOf(err), Detail: err.Error()})
	}
	d.relay.sess, d.relay.ch, d.target = sess, ch, ch.target
	d.log = d.log.With(slog.String("session", sess.idString()))
	return d, true
}

// connect connects an admitted stream to its target and relays it.
func (s *Server) connect(d *delivery) {
	r, log := d.relay, d.log
	ctx, cancel := s.ctx, context.CancelFunc(func() {})
	if r.sess != nil {
		ctx, cancel = r.sess.within(s.ctx) // the session's end cancels the connect
	}
	local, err := d.target.Dial(ctx, s.cfg.DialTimeout)
	cancel()
	if err != nil {
		// The peer learns that the local connect failed, not where to.
		log.Warn("route target unreachable", slog.String("target", targetString(d.target)), slog.String("err", err.Error()))
		s.refuse(d.in, &tunnel.RefusedError{Reason: tunnel.ReasonDialFailed, Detail: fmt.Sprintf("channel %q: the destination could not connect its local endpoint", r.channel)})
		return
	}
	stream, err := d.in.Accept()
	if err != nil {
		local.Close()
		log.Warn("stream lost while accepting", slog.String("err", err.Error()))
		return
	}
	r.local, r.remote = local, stream
	if err := s.track(r); err != nil {
		// The session ended or the server is stopping since the checks.
		r.abort()
		log.Warn("stream aborted", slog.String("err", err.Error()))
		return
	}
	log.Info("stream accepted", slog.String("target", targetString(d.target)))
	s.startRelay(r, log)
}

// orderKey names the streams whose deliveries are ordered among
// themselves: one channel of one session (the zero session for streams
// outside sessions).
type orderKey struct {
	session tunnel.SessionID
	channel string
}

// ordering chains the deliveries of each (session, channel).
type ordering struct {
	mu   sync.Mutex
	tail map[orderKey]chan struct{}
}

var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// next returns the channel to wait on before delivering, and the one to
// close after.
func (o *ordering) next(key orderKey) (prev <-chan struct{}, done chan struct{}) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.tail == nil {
		o.tail = make(map[orderKey]chan struct{})
	}
	prev = o.tail[key]
	if prev == nil {
		prev = closedChan
	}
	done = make(chan struct{})
	o.tail[key] = done
	return prev, done
}

func (o *ordering) finish(key orderKey, done chan struct{}) {
	o.mu.Lock()
	defer o.mu.Unlock()
	close(done)
	if o.tail[key] == done {
		delete(o.tail, key)
	}
}
