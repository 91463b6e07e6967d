package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/migtun/migtun/tunnel"
)

// Config configures a Server. Zero fields take their defaults.
type Config struct {
	// Listen is the host:port of the one tunnel port. Empty: no port is
	// served (a host that only sends).
	Listen string
	// Tunnel configures the transport (TLS material, transport kind,
	// timeouts). Required.
	Tunnel *tunnel.Config
	// Routes deliver incoming streams of a channel to a local endpoint.
	Routes []Route
	// Forwards turn local connections into streams to a peer.
	Forwards []Forward
	// DialTimeout bounds connecting to a route's local endpoint; default 5s.
	DialTimeout time.Duration
	// Logger receives the server's logs; nil discards.
	Logger *slog.Logger
}

// Server is migtun's sidecar: it serves the tunnel port, delivers incoming
// streams to their routes, and carries the connections of its forwards to
// peers.
type Server struct {
	cfg    Config
	log    *slog.Logger
	routes map[string]Endpoint
	dialer *tunnel.Dialer

	port     *tunnel.Listener
	forwards []*forwarder
	order    ordering

	ctx    context.Context // cancelled when the server stops accepting
	cancel context.CancelFunc

	mu     sync.Mutex
	relays map[*activeRelay]struct{}
	idle   *sync.Cond // signalled when relays shrinks

	wg        sync.WaitGroup // accept loops and relays
	closeOnce sync.Once
}

// activeRelay is one stream being relayed.
type activeRelay struct {
	local  net.Conn
	remote tunnel.Stream
	counts Counts
}

// New checks cfg and returns a Server that has not started yet.
func New(cfg Config) (*Server, error) {
	if cfg.Tunnel == nil {
		return nil, errors.New("proxy: Config.Tunnel is required")
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = tunnel.DefaultDialTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	routes := make(map[string]Endpoint)
	for _, r := range cfg.Routes {
		if _, dup := routes[r.Channel]; dup {
			return nil, fmt.Errorf("proxy: two routes for channel %q", r.Channel)
		}
		routes[r.Channel] = r.Target
	}
	seen := map[string]bool{}
	for _, f := range cfg.Forwards {
		if seen[f.Listen.String()] {
			return nil, fmt.Errorf("proxy: two forwards listen on %s", f.Listen)
		}
		seen[f.Listen.String()] = true
	}
	tc := *cfg.Tunnel
	tc.Logger = cfg.Logger
	cfg.Tunnel = &tc
	dialer, err := tunnel.NewDialer(cfg.Tunnel)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{cfg: cfg, log: cfg.Logger, routes: routes, dialer: dialer, ctx: ctx, cancel: cancel,
		relays: make(map[*activeRelay]struct{})}
	s.idle = sync.NewCond(&s.mu)
	return s, nil
}

// Start opens the tunnel port and every forward's listener. When it returns
// without error the server is ready; on error nothing is left open.
func (s *Server) Start() error {
	if s.cfg.Listen != "" {
		ln, err := tunnel.Listen(s.cfg.Listen, s.cfg.Tunnel)
		if err != nil {
			s.Close()
			return err
		}
		s.port = ln
	}
	for _, f := range s.cfg.Forwards {
		ln, err := f.Listen.listen()
		if err != nil {
			s.Close()
			return err
		}
		s.forwards = append(s.forwards, &forwarder{Forward: f, ln: ln, srv: s})
	}
	if s.port != nil {
		s.wg.Add(1)
		go s.acceptStreams()
	}
	for _, f := range s.forwards {
		s.wg.Add(1)
		go f.acceptLoop()
	}
	return nil
}

// Addr returns the address of the tunnel port, or nil if none is served.
func (s *Server) Addr() net.Addr {
	if s.port == nil {
		return nil
	}
	return s.port.Addr()
}

// Shutdown stops accepting new streams and connections, waits until the
// relays in flight finish or ctx is done, then aborts what is left and
// releases everything (socket files included). It returns ctx's error if
// relays had to be aborted.
func (s *Server) Shutdown(ctx context.Context) error {
	s.stopAccepting()
	done := make(chan struct{})
	go func() { // owned: ends when relays drain or are aborted below
		s.mu.Lock()
		for len(s.relays) > 0 {
			s.idle.Wait()
		}
		s.mu.Unlock()
		close(done)
	}()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
		s.abortRelays()
		<-done
	}
	s.wg.Wait()
	s.dialer.Close()
	return err
}

// Close aborts every relay at once and releases everything.
func (s *Server) Close() error {
	s.stopAccepting()
	s.abortRelays()
	s.wg.Wait()
	return s.dialer.Close()
}

func (s *Server) stopAccepting() {
	s.closeOnce.Do(func() {
		s.cancel()
		if s.port != nil {
			s.port.Close()
		}
		for _, f := range s.forwards {
			f.ln.Close() // removes the socket file
		}
	})
}

func (s *Server) abortRelays() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for r := range s.relays {
		abortLocal(r.local)
		r.remote.Abort()
	}
}

// track registers a relay; it returns false when the server is stopping.
func (s *Server) track(r *activeRelay) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ctx.Err() != nil {
		return false
	}
	s.relays[r] = struct{}{}
	s.wg.Add(1)
	return true
}

func (s *Server) untrack(r *activeRelay) {
	s.mu.Lock()
	delete(s.relays, r)
	s.idle.Broadcast()
	s.mu.Unlock()
	s.wg.Done()
}

// runRelay relays r and logs how it ended.
func (s *Server) runRelay(r *activeRelay, log *slog.Logger) {
	defer s.untrack(r)
	start := time.Now()
	err := relay(r.local, r.remote, &r.counts)
	attrs := []any{
		slog.Int64("bytes_up", r.counts.Up.Load()), slog.Int64("bytes_down", r.counts.Down.Load()),
		slog.Duration("duration", time.Since(start)),
	}
	if err != nil && !isClosed(err) {
		log.Warn("stream failed", append(attrs, slog.String("err", err.Error()))...)
		return
	}
	log.Info("stream done", attrs...)
}

// acceptStreams takes incoming streams from the tunnel port.
func (s *Server) acceptStreams() {
	defer s.wg.Done()
	for {
		in, err := s.port.Accept(s.ctx)
		if err != nil {
			return
		}
		// The streams of one channel connect to its route one after another
		// in the order they arrived; other channels do not wait for them.
		prev, done := s.order.next(in.Header.Channel)
		s.wg.Add(1)
		go s.deliverInOrder(in, prev, done)
	}
}

func (s *Server) deliverInOrder(in *tunnel.Incoming, prev <-chan struct{}, done chan struct{}) {
	defer s.wg.Done()
	defer s.order.finish(in.Header.Channel, done)
	<-prev
	s.deliver(in)
}

// ordering chains the deliveries of each channel.
type ordering struct {
	mu   sync.Mutex
	tail map[string]chan struct{}
}

var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// next returns the channel to wait on before delivering, and the one to
// close after.
func (o *ordering) next(channel string) (prev <-chan struct{}, done chan struct{}) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.tail == nil {
		o.tail = make(map[string]chan struct{})
	}
	prev = o.tail[channel]
	if prev == nil {
		prev = closedChan
	}
	done = make(chan struct{})
	o.tail[channel] = done
	return prev, done
}

func (o *ordering) finish(channel string, done chan struct{}) {
	o.mu.Lock()
	defer o.mu.Unlock()
	close(done)
	if o.tail[channel] == done {
		delete(o.tail, channel)
	}
}

// deliver connects an incoming stream to its route.
func (s *Server) deliver(in *tunnel.Incoming) {
	h := in.Header
	log := s.log.With(slog.String("channel", h.Channel), slog.Uint64("index", h.Index),
		slog.String("peer", in.Peer), slog.String("transport", string(in.Transport)))
	if h.Kind != tunnel.KindData {
		in.Refuse(&tunnel.RefusedError{Reason: tunnel.ReasonUnknownKind, Detail: h.Kind.String() + " streams are not served here"})
		log.Warn("stream refused", slog.String("reason", "unknown_kind"))
		return
	}
	if h.Session != (tunnel.SessionID{}) {
		in.Refuse(&tunnel.RefusedError{Reason: tunnel.ReasonUnknownSession, Detail: "unknown session"})
		log.Warn("stream refused", slog.String("reason", "unknown_session"))
		return
	}
	target, ok := s.routes[h.Channel]
	if !ok {
		in.Refuse(&tunnel.RefusedError{Reason: tunnel.ReasonNoRoute, Detail: fmt.Sprintf("no route for channel %q", h.Channel)})
		log.Warn("stream refused", slog.String("reason", "no_route"))
		return
	}
	local, err := target.dial(s.ctx, s.cfg.DialTimeout)
	if err != nil {
		in.Refuse(&tunnel.RefusedError{Reason: tunnel.ReasonDialFailed, Detail: fmt.Sprintf("channel %q: %v", h.Channel, err)})
		log.Warn("stream refused", slog.String("reason", "dial_failed"), slog.String("err", err.Error()))
		return
	}
	stream, err := in.Accept()
	if err != nil {
		local.Close()
		log.Warn("stream lost while accepting", slog.String("err", err.Error()))
		return
	}
	r := &activeRelay{local: local, remote: stream}
	if !s.track(r) {
		abortLocal(local)
		stream.Abort()
		return
	}
	log.Info("stream accepted", slog.String("target", target.String()))
	go s.runRelay(r, log)
}
