package proxy

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"time"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/tunnel"
)

// forwarder serves one Forward: it accepts local connections and turns each
// into a stream of the forward's channel to the peer.
type forwarder struct {
	Forward
	ln  net.Listener
	srv *Server
	// sess and ch are set for a session's listener.
	sess *session
	ch   *sessionChannel
}

// acceptLoop accepts local connections one at a time and opens each one's
// stream before accepting the next. The peer acknowledges a stream only
// after connecting it locally, so the destination connects the streams of
// this forward in the order they were accepted here: QEMU takes the first
// connection of a migration as its main channel, and multifd breaks if the
// order changes on the way.
func (f *forwarder) acceptLoop() {
	s := f.srv
	log := s.log.With(slog.String("forward", f.Listen.String()), slog.String("peer", f.Peer),
		slog.String("channel", f.Channel))
	var index uint64
	var backoff time.Duration
	for {
		c, err := f.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || s.ctx.Err() != nil {
				return
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			log.Error("accept failed", slog.String("err", err.Error()))
			select {
			case <-time.After(backoff):
			case <-s.ctx.Done():
				return
			}
			continue
		}
		backoff = 0
		h := tunnel.Header{Kind: tunnel.KindData, Channel: f.Channel, Index: index}
		index++
		l := log.With(slog.Uint64("index", h.Index))
		if f.sess != nil {
			h.Session, h.Token = f.sess.id, f.sess.token
			l = l.With(slog.String("session", f.sess.idString()))
			if err := f.sess.reserveStream(); err != nil {
				abortLocal(c)
				l.Error("stream not opened", "err", err.Error())
				continue
			}
		}
		ctx, cancel := s.ctx, context.CancelFunc(func() {})
		if f.sess != nil {
			ctx, cancel = f.sess.within(s.ctx)
		}
		stream, err := s.dialer.Open(ctx, f.Peer, h)
		cancel()
		if err != nil {
			// Closing the local connection at once tells QEMU the channel
			// failed; the error names the reason the peer gave.
			abortLocal(c)
			s.metrics.streams.WithLabelValues(f.Channel, "refused").Inc()
			l.Error("stream not opened", "err", err.Error())
			continue
		}
		r := &activeRelay{local: c, remote: stream, channel: f.Channel, role: control.RoleSource, sess: f.sess, ch: f.ch}
		if err := s.track(r); err != nil {
			r.abort()
			l.Warn("stream aborted", "err", err.Error())
			continue
		}
		l.Info("stream opened")
		s.startRelay(r, l)
	}
}
