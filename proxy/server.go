package proxy

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/migtun/migtun/control"
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
	// SocketDir holds the UNIX sockets of sessions: the source's
	// listeners, the destination's CHANNEL=session routes. It is created
	// 0700; an existing one must be a directory (not a symlink) owned by
	// this process's user and writable by no one else. Default:
	// DefaultSocketDir().
	SocketDir string
	// SessionTTL is how long a prepared session waits for its first stream
	// before it expires; default 2 minutes.
	SessionTTL time.Duration
	// MaxSessions bounds the sessions open at once; default 64.
	MaxSessions int
	// MaxPeerSessions bounds the destination sessions one peer may hold
	// open at once, its share of MaxSessions, so that one peer cannot take
	// them all; default half of MaxSessions.
	MaxPeerSessions int
	// MaxControlRequests bounds the peers' control requests served at
	// once, and MaxPeerControlRequests those of one peer; defaults 256
	// and 32. Past a bound a request is refused at once (reason limit).
	MaxControlRequests     int
	MaxPeerControlRequests int
	// MaxSessionStreams bounds the streams one session may open over its
	// life (multifd opens 1 + channels on main); default 512.
	MaxSessionStreams int
	// FinishGrace is how long finish waits for a session's streams to end
	// by themselves before aborting them; default 10s.
	FinishGrace time.Duration
	// Logger receives the server's logs; nil discards.
	Logger *slog.Logger
	// VMs serves the peers' VM operations on this host's registered VMs
	// (serve --qmp); nil: none.
	VMs VMHandler
	// Certificate, when set, returns the certificate this host presents
	// and what keeps the certificate files in place from being presented
	// (nil if nothing), for the metrics: its expiry, and whether a reload
	// failed.
	Certificate func() (*x509.Certificate, error)
}

// Defaults of the session settings.
const (
	DefaultSessionTTL  = 2 * time.Minute
	DefaultMaxSessions = 64
	// DefaultMaxSessionStreams leaves room for QEMU's largest multifd
	// setting plus NBD and libvirt.
	DefaultMaxSessionStreams = 512
	DefaultFinishGrace       = 10 * time.Second
)

// Server is migtun's sidecar: it serves the tunnel port, delivers incoming
// streams to their routes, and carries the connections of its forwards to
// peers.
type Server struct {
	cfg    Config
	log    *slog.Logger
	dialer *tunnel.Dialer

	routesMu sync.RWMutex
	routes   map[string]Route

	sessions  sessions
	inflight  inflight // peers' control requests being served
	warnLimit rateLimit
	metrics   *metrics

	port       *tunnel.Listener
	forwards   []*forwarder
	order      ordering
	connecting atomic.Int64 // incoming streams waiting for their turn or their local connect

	ctx    context.Context // cancelled when the server stops accepting
	cancel context.CancelFunc

	mu     sync.Mutex
	relays map[*activeRelay]struct{}
	idle   *sync.Cond // signalled when relays shrinks

	wg        sync.WaitGroup // every goroutine the server starts
	closeOnce sync.Once
}

// activeRelay is one stream being relayed.
type activeRelay struct {
	local  net.Conn
	remote tunnel.Stream
	counts Counts
	// channel and role say what the relay carries, seen from this host.
	channel string
	role    control.Role
	// sess and ch are set for the streams of a migration session.
	sess *session
	ch   *sessionChannel
}

// abort ends both connections at once.
func (r *activeRelay) abort() {
	abortLocal(r.local)
	r.remote.Abort()
}

// directions returns the bytes moved from source to destination and back,
// seen from a host of the given role.
func (r *activeRelay) directions(role control.Role) (forward, ret int64) {
	if role == control.RoleSource {
		return r.counts.Up.Load(), r.counts.Down.Load()
	}
	return r.counts.Down.Load(), r.counts.Up.Load()
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
	if cfg.SocketDir == "" {
		dir, err := DefaultSocketDir()
		if err != nil {
			return nil, err
		}
		cfg.SocketDir = dir
	}
	if cfg.SessionTTL <= 0 {
		cfg.SessionTTL = DefaultSessionTTL
	}
	if cfg.MaxSessions <= 0 {
		cfg.MaxSessions = DefaultMaxSessions
	}
	if cfg.MaxSessionStreams <= 0 {
		cfg.MaxSessionStreams = DefaultMaxSessionStreams
	}
	if cfg.FinishGrace <= 0 {
		cfg.FinishGrace = DefaultFinishGrace
	}
	if cfg.MaxPeerSessions <= 0 {
		cfg.MaxPeerSessions = max(1, cfg.MaxSessions/2)
	}
	cfg.MaxPeerSessions = min(cfg.MaxPeerSessions, cfg.MaxSessions)
	if cfg.MaxControlRequests <= 0 {
		cfg.MaxControlRequests = DefaultMaxControlRequests
	}
	if cfg.MaxPeerControlRequests <= 0 {
		cfg.MaxPeerControlRequests = DefaultMaxPeerControlRequests
	}
	routes := make(map[string]Route)
	for _, r := range cfg.Routes {
		if _, dup := routes[r.Channel]; dup {
			return nil, fmt.Errorf("proxy: two routes for channel %q", r.Channel)
		}
		routes[r.Channel] = r
	}
	seen := map[string]bool{}
	for _, f := range cfg.Forwards {
		if seen[f.Listen.String()] {
			return nil, fmt.Errorf("proxy: two forwards listen on %s", f.Listen)
		}
		seen[f.Listen.String()] = true
	}
	s := &Server{}
	s.metrics = newMetrics(s)
	tc := *cfg.Tunnel
	tc.Logger = cfg.Logger
	userRefused, userHandshake := tc.OnRefused, tc.OnHandshake
	tc.OnRefused = func(r tunnel.Reason) {
		s.metrics.refused(r)
		if userRefused != nil {
			userRefused(r)
		}
	}
	tc.OnHandshake = func(t tunnel.Transport, dir string, took time.Duration) {
		s.metrics.onHandshake(t, dir, took)
		if userHandshake != nil {
			userHandshake(t, dir, took)
		}
	}
	cfg.Tunnel = &tc
	dialer, err := tunnel.NewDialer(cfg.Tunnel)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.cfg, s.log, s.routes, s.dialer, s.ctx, s.cancel = cfg, cfg.Logger, routes, dialer, ctx, cancel
	s.relays = make(map[*activeRelay]struct{})
	s.idle = sync.NewCond(&s.mu)
	return s, nil
}

// Start opens the tunnel port and every forward's listener. When it returns
// without error the server is ready; on error nothing is left open.
func (s *Server) Start() error {
	if err := s.ensureSocketDir(); err != nil {
		return err
	}
	if s.cfg.Listen != "" {
		ln, err := tunnel.Listen(s.cfg.Listen, s.cfg.Tunnel)
		if err != nil {
			s.Close()
			return err
		}
		s.port = ln
	}
	for _, f := range s.cfg.Forwards {
		ln, err := f.Listen.Listen()
		if err != nil {
			s.Close()
			return err
		}
		s.forwards = append(s.forwards, &forwarder{Forward: f, ln: ln, srv: s})
	}
	if s.port != nil {
		s.wg.Go(s.acceptStreams)
	}
	s.wg.Go(s.sampleLoop)
	for _, f := range s.forwards {
		s.wg.Go(f.acceptLoop)
	}
	return nil
}

// MetricsHandler serves the server's metrics in the Prometheus exposition
// format.
func (s *Server) MetricsHandler() http.Handler { return s.metrics.handler() }

// Addr returns the address of the tunnel port, or nil if none is served.
func (s *Server) Addr() net.Addr {
	if s.port == nil {
		return nil
	}
	return s.port.Addr()
}

// Shutdown stops accepting new streams and connections, waits until the
// relays in flight finish or ctx is done, then aborts what is left, ends
// every session (telling peers concurrently, each notice bounded by
// peerNoticeTimeout) and releases everything, socket files included. It
// returns ctx's error if relays had to be aborted.
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
	s.endAllSessions(context.WithoutCancel(ctx))
	s.wg.Wait()
	s.dialer.Close()
	return err
}

// Close aborts every relay at once and releases everything.
func (s *Server) Close() error {
	s.stopAccepting()
	s.abortRelays()
	s.endAllSessions(context.Background())
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

// track registers a relay, and with its session if it has one; it fails
// when the server is stopping or the session takes no more streams.
func (s *Server) track(r *activeRelay) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ctx.Err() != nil {
		return &tunnel.RefusedError{Reason: tunnel.ReasonShuttingDown}
	}
	if r.sess != nil {
		if err := r.sess.addRelay(r); err != nil {
			return err
		}
	}
	s.relays[r] = struct{}{}
	return nil
}

func (s *Server) untrack(r *activeRelay) {
	if r.sess != nil {
		r.sess.removeRelay(r)
	}
	s.mu.Lock()
	delete(s.relays, r)
	s.idle.Broadcast()
	s.mu.Unlock()
}

// startRelay runs r on a goroutine of the server's.
func (s *Server) startRelay(r *activeRelay, log *slog.Logger) {
	s.wg.Go(func() { s.runRelay(r, log) })
}

// runRelay relays r and logs how it ended.
func (s *Server) runRelay(r *activeRelay, log *slog.Logger) {
	defer s.untrack(r)
	start := time.Now()
	err := relay(r.local, r.remote, &r.counts)
	s.metrics.streamEnded(r, err)
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

// route returns the static or registered route of a channel.
func (s *Server) route(channel string) (Route, bool) {
	s.routesMu.RLock()
	defer s.routesMu.RUnlock()
	r, ok := s.routes[channel]
	return r, ok
}

// SetRoute registers (or replaces) the route of a channel on this host.
func (s *Server) SetRoute(r Route) {
	s.routesMu.Lock()
	defer s.routesMu.Unlock()
	s.routes[r.Channel] = r
}

// DeleteRoute removes the route of a channel; it reports whether there was one.
func (s *Server) DeleteRoute(channel string) bool {
	s.routesMu.Lock()
	defer s.routesMu.Unlock()
	_, ok := s.routes[channel]
	delete(s.routes, channel)
	return ok
}

// Routes lists this host's routes.
func (s *Server) Routes() []Route {
	s.routesMu.RLock()
	defer s.routesMu.RUnlock()
	out := make([]Route, 0, len(s.routes))
	for _, r := range s.routes {
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b Route) int { return strings.Compare(a.Channel, b.Channel) })
	return out
}
