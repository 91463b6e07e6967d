package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/migtun/migtun/certs"
	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/migrate"
	"github.com/migtun/migtun/proxy"
	"github.com/migtun/migtun/tunnel"
)

const serveSynopsis = `serve --listen HOST:PORT --transport tls|quic|plain --cert FILE --key FILE --ca FILE
              [--route CHANNEL=unix:PATH|tcp:HOST:PORT|session]...
              [--forward unix:PATH|tcp:HOST:PORT=PEERHOST:PORT/CHANNEL]...
              [--insecure-plaintext] [--control unix:PATH] [--control-listen HOST:PORT]
              [--qmp NAME=unix:PATH]... [--print-config]`

// serveConfig is what serve's flags say, as --print-config shows it.
type serveConfig struct {
	Listen            string            `json:"listen"`
	Transport         string            `json:"transport"`
	Cert              string            `json:"cert"`
	Key               string            `json:"key"`
	CA                string            `json:"ca"`
	Routes            []string          `json:"routes"`
	Forwards          []string          `json:"forwards"`
	VMs               map[string]string `json:"vms"`
	AllowPeers        []string          `json:"allow_peers"`
	InsecurePlaintext bool              `json:"insecure_plaintext"`
	DialTimeout       time.Duration     `json:"dial_timeout"`
	HandshakeTimeout  time.Duration     `json:"handshake_timeout"`
	IdleTimeout       time.Duration     `json:"idle_timeout"`
	DrainTimeout      time.Duration     `json:"drain_timeout"`
	Control           string            `json:"control"`
	ControlListen     string            `json:"control_listen"`
	MetricsListen     string            `json:"metrics_listen"`
	SocketDir         string            `json:"socket_dir"`
	SessionTTL        time.Duration     `json:"session_ttl"`
	MaxSessions       int               `json:"max_sessions"`
	MaxPeerSessions   int               `json:"max_peer_sessions"`
	MaxControl        int               `json:"max_control_requests"`
	MaxPeerControl    int               `json:"max_peer_control_requests"`
	MaxSessionStreams int               `json:"max_session_streams"`
	FinishGrace       time.Duration     `json:"finish_grace"`
	LogFormat         string            `json:"log_format"`
	LogLevel          string            `json:"log_level"`

	routes      []proxy.Route
	forwards    []proxy.Forward
	transport   tunnel.Transport
	printConfig bool
}

func runServe(args []string, stdout, stderr io.Writer) error {
	cfg, err := parseServe(args, stderr)
	if err != nil {
		return err
	}
	if cfg.printConfig {
		return printJSON(stdout, cfg.effective())
	}
	// Every socket and file serve creates is its user's alone, from the
	// moment it exists.
	syscall.Umask(0o077)
	log, err := newLogger(stderr, cfg.LogFormat, cfg.LogLevel)
	if err != nil {
		return err
	}
	store, err := loadCertificates(cfg, log)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	srv, err := newServer(cfg, store, log)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	var watch sync.WaitGroup
	defer watch.Wait()
	defer stop() // ends the watch on every return
	watch.Go(func() { watchCertificates(ctx, store) })
	if err := srv.Start(); err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	controls, err := openEndpoints(srv, cfg, log)
	if err != nil {
		srv.Close()
		return fmt.Errorf("serve: %w", err)
	}
	fmt.Fprintf(stdout, "migtun ready: listening on %s (%s); %d routes; forwards: [%s]; control: [%s]\n",
		srv.Addr(), cfg.transport, len(cfg.routes), strings.Join(cfg.Forwards, " "), strings.Join(controls, " "))
	<-ctx.Done()
	stop()
	drain(srv, cfg.DrainTimeout, log)
	return nil
}

// parseServe reads serve's flags into a checked serveConfig.
func parseServe(args []string, stderr io.Writer) (*serveConfig, error) {
	c := &serveConfig{VMs: map[string]string{}}
	fs := newFlagSet("serve", serveSynopsis, stderr)
	c.define(fs)
	if err := parse(fs, args); err != nil {
		return nil, err
	}
	if err := required("serve", map[string]string{"listen": c.Listen, "cert": c.Cert, "key": c.Key, "ca": c.CA},
		"listen", "cert", "key", "ca"); err != nil {
		return nil, err
	}
	tr, err := tunnel.ParseTransport(c.Transport)
	if err != nil {
		return nil, fmt.Errorf("serve: --transport: %w", err)
	}
	c.transport = tr
	if tr == tunnel.Plain && !c.InsecurePlaintext {
		return nil, errors.New("serve: --transport plain sends migration bytes unencrypted; add --insecure-plaintext to say that is intended")
	}
	if _, err := newLogger(io.Discard, c.LogFormat, c.LogLevel); err != nil {
		return nil, err
	}
	if c.Control != "" {
		if _, err := endpoint.ParseUnix(c.Control); err != nil {
			return nil, fmt.Errorf("serve: --control: %w (use --control-listen for TCP)", err)
		}
	}
	if len(c.VMs) > 0 {
		// The VMs' QEMUs listen on sockets named after each session.
		for _, ch := range []string{"main", "nbd"} {
			if !slices.ContainsFunc(c.routes, func(r proxy.Route) bool { return r.Channel == ch }) {
				c.routes = append(c.routes, proxy.Route{Channel: ch, Target: proxy.SessionSocket})
			}
		}
	}
	c.Routes = nil
	for _, r := range c.routes {
		c.Routes = append(c.Routes, r.String())
	}
	return c, nil
}

// define declares serve's flags, each writing into c.
func (c *serveConfig) define(fs *flag.FlagSet) {
	fs.StringVar(&c.Listen, "listen", "", "host:port of the tunnel port (TCP for tls and plain, UDP for quic)")
	fs.StringVar(&c.Transport, "transport", "tls", "how streams cross to peers: tls, quic or plain")
	fs.StringVar(&c.Cert, "cert", "", "this host's certificate (PEM); replacing it and --key takes effect within about a second, for new connections")
	fs.StringVar(&c.Key, "key", "", "this host's private key (PEM)")
	fs.StringVar(&c.CA, "ca", "", "the CA certificate peers must be signed by (PEM); read once, at start")
	fs.Func("route", "deliver incoming streams of CHANNEL to a local socket: CHANNEL=unix:PATH, CHANNEL=tcp:HOST:PORT, or CHANNEL=session for a socket named after each session in --socket-dir (repeatable)", func(s string) error {
		r, err := proxy.ParseRoute(s)
		c.routes = append(c.routes, r)
		return err
	})
	fs.Func("forward", "listen locally and carry each connection to a peer's channel: unix:PATH=PEERHOST:PORT/CHANNEL or tcp:HOST:PORT=PEERHOST:PORT/CHANNEL (repeatable)", func(s string) error {
		f, err := proxy.ParseForward(s)
		c.forwards = append(c.forwards, f)
		c.Forwards = append(c.Forwards, f.String())
		return err
	})
	fs.Func("qmp", "a VM this host may drive for its peers' migrations: NAME=unix:PATH of its QMP socket (repeatable); main and nbd default to CHANNEL=session routes", func(s string) error {
		name, path, err := migrate.ParseVM(s)
		if err == nil {
			if _, dup := c.VMs[name]; dup {
				return fmt.Errorf("VM %q given twice", name)
			}
			c.VMs[name] = path
		}
		return err
	})
	fs.Var((*listFlag)(&c.AllowPeers), "allow-peer", "accept only peers whose certificate names this (\"*.suffix\" allowed; repeatable; default: any peer with a certificate from the CA)")
	fs.BoolVar(&c.InsecurePlaintext, "insecure-plaintext", false, "allow the plain transport: stream bytes cross the network unencrypted (peers are still authenticated)")
	fs.DurationVar(&c.DialTimeout, "dial-timeout", tunnel.DefaultDialTimeout, "bound on connecting to a peer or to a local route")
	fs.DurationVar(&c.HandshakeTimeout, "handshake-timeout", tunnel.DefaultHandshakeTimeout, "bound on an incoming stream's handshake and header (quic: the handshake's idle timeout; at most twice it in all)")
	fs.DurationVar(&c.IdleTimeout, "idle-timeout", tunnel.DefaultIdleTimeout, "a QUIC peer silent this long is declared dead; TCP connections probe a peer silent this long (keepalive) and give up after three probes")
	fs.DurationVar(&c.DrainTimeout, "drain-timeout", 30*time.Second, "on SIGTERM, how long streams in flight may go on before they are aborted")
	fs.StringVar(&c.Control, "control", "", "the local control endpoint, a UNIX socket (mode 0600): unix:PATH (default: none)")
	fs.StringVar(&c.ControlListen, "control-listen", "", "also serve the control endpoint on TCP HOST:PORT; it has no authentication, keep it on loopback (default: off)")
	fs.StringVar(&c.MetricsListen, "metrics-listen", "", "also serve Prometheus metrics on http://HOST:PORT/metrics, and /healthz (default: off; the control endpoint serves both too)")
	fs.StringVar(&c.SocketDir, "socket-dir", "", "directory of the sessions' UNIX sockets: the source's listeners, the destination's CHANNEL=session routes; created 0700, refused if others may write it (default: $RUNTIME_DIRECTORY, else /run/migtun as root, else $XDG_RUNTIME_DIR/migtun)")
	fs.DurationVar(&c.SessionTTL, "session-ttl", proxy.DefaultSessionTTL, "a prepared session that sees no stream in this time expires")
	fs.IntVar(&c.MaxSessions, "max-sessions", proxy.DefaultMaxSessions, "sessions open at once, at most")
	fs.IntVar(&c.MaxPeerSessions, "max-peer-sessions", 0, "sessions one peer may hold open here at once, its share of --max-sessions (default: --max-sessions)")
	fs.IntVar(&c.MaxControl, "max-control-requests", proxy.DefaultMaxControlRequests, "peers' control requests (prepare, finish, VM operations) served at once, at most; more are refused at once")
	fs.IntVar(&c.MaxPeerControl, "max-peer-control-requests", proxy.DefaultMaxPeerControlRequests, "control requests of one peer served at once, at most")
	fs.IntVar(&c.MaxSessionStreams, "max-session-streams", proxy.DefaultMaxSessionStreams, "streams one session may open, at most")
	fs.DurationVar(&c.FinishGrace, "finish-grace", proxy.DefaultFinishGrace, "how long finish waits for a session's streams to end before aborting them")
	fs.StringVar(&c.LogFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&c.LogLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.BoolVar(&c.printConfig, "print-config", false, "print the effective settings as JSON and exit, opening nothing")
}

// effective returns the settings with the defaults a server fills in.
func (c *serveConfig) effective() any {
	e := *c
	if e.SocketDir == "" {
		e.SocketDir, _ = proxy.DefaultSocketDir()
	}
	if e.MaxPeerSessions <= 0 || e.MaxPeerSessions > e.MaxSessions {
		e.MaxPeerSessions = e.MaxSessions
	}
	// Durations print as "30s", not nanoseconds.
	b, _ := json.Marshal(e)
	var m map[string]any
	json.Unmarshal(b, &m)
	for k, d := range map[string]time.Duration{"dial_timeout": e.DialTimeout, "handshake_timeout": e.HandshakeTimeout,
		"idle_timeout": e.IdleTimeout, "drain_timeout": e.DrainTimeout, "session_ttl": e.SessionTTL, "finish_grace": e.FinishGrace} {
		m[k] = d.String()
	}
	return m
}

// loadCertificates loads this host's certificate, key and CA, logging
// each reload.
func loadCertificates(c *serveConfig, log *slog.Logger) (*certs.Store, error) {
	store, err := certs.Load(certs.Config{CertFile: c.Cert, KeyFile: c.Key, CAFile: c.CA, AllowedPeers: c.AllowPeers,
		OnReload: func(leaf *x509.Certificate, err error) {
			if err != nil {
				log.Warn("certificate not reloaded: new connections still present the previous one", "err", err.Error())
				return
			}
			log.Info("certificate reloaded: new connections present it", certAttrs(leaf)...)
		}})
	if err != nil {
		return nil, err
	}
	log.Info("certificate loaded", certAttrs(store.Leaf())...)
	if err := store.Verify(); err != nil {
		log.Warn("peers will refuse this host's certificate", "err", err.Error())
	}
	return store, nil
}

// watchCertificates picks up replaced certificate files about once a
// second, even while no handshake looks at them, until ctx ends.
func watchCertificates(ctx context.Context, store *certs.Store) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			store.Refresh()
		}
	}
}

// newServer turns the settings into a proxy.Server.
func newServer(c *serveConfig, store *certs.Store, log *slog.Logger) (*proxy.Server, error) {
	var vms proxy.VMHandler
	if len(c.VMs) > 0 {
		vms = migrate.NewController(c.VMs, log)
	}
	alpn := []string{tunnel.ALPN}
	return proxy.New(proxy.Config{
		Listen: c.Listen,
		Tunnel: &tunnel.Config{
			Transport:        c.transport,
			ServerTLS:        store.ServerConfig(alpn),
			ClientTLS:        func(host string) *tls.Config { return store.ClientConfig(host, alpn) },
			AllowPlaintext:   c.InsecurePlaintext,
			HandshakeTimeout: c.HandshakeTimeout,
			DialTimeout:      c.DialTimeout,
			IdleTimeout:      c.IdleTimeout,
		},
		Routes:                 c.routes,
		Forwards:               c.forwards,
		DialTimeout:            c.DialTimeout,
		SocketDir:              c.SocketDir,
		SessionTTL:             c.SessionTTL,
		MaxSessions:            c.MaxSessions,
		MaxPeerSessions:        c.MaxPeerSessions,
		MaxControlRequests:     c.MaxControl,
		MaxPeerControlRequests: c.MaxPeerControl,
		MaxSessionStreams:      c.MaxSessionStreams,
		FinishGrace:            c.FinishGrace,
		Logger:                 log,
		VMs:                    vms,
		Certificate:            func() (*x509.Certificate, error) { return store.Leaf(), store.Err() },
	})
}

// openEndpoints opens the control and metrics endpoints the flags ask for
// and returns the control endpoints' addresses.
func openEndpoints(srv *proxy.Server, c *serveConfig, log *slog.Logger) ([]string, error) {
	var controls []string
	if c.Control != "" {
		ep, _ := endpoint.ParseUnix(c.Control) // checked by parseServe
		if _, err := srv.ListenControl(ep); err != nil {
			return nil, fmt.Errorf("--control: %w", err)
		}
		controls = append(controls, ep.String())
	}
	if c.ControlListen != "" {
		addr, err := srv.ListenControl(endpoint.TCP(c.ControlListen))
		if err != nil {
			return nil, fmt.Errorf("--control-listen: %w", err)
		}
		if ta, ok := addr.(*net.TCPAddr); ok && !ta.IP.IsLoopback() {
			log.Warn("the control endpoint listens beyond loopback without authentication", "addr", addr.String())
		}
		controls = append(controls, "tcp:"+addr.String())
	}
	if c.MetricsListen != "" {
		addr, err := srv.ListenMetrics(c.MetricsListen)
		if err != nil {
			return nil, fmt.Errorf("--metrics-listen: %w", err)
		}
		log.Info("serving metrics", "addr", "http://"+addr.String()+"/metrics")
	}
	if c.InsecurePlaintext {
		log.Warn("plaintext allowed: migration bytes of plain streams cross the network unencrypted")
	}
	return controls, nil
}

// drain stops srv, letting streams in flight go on for up to timeout.
func drain(srv *proxy.Server, timeout time.Duration, log *slog.Logger) {
	log.Info("stopping: draining streams in flight", slog.Duration("drain_timeout", timeout))
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		log.Warn("streams aborted at the drain timeout")
	}
	log.Info("stopped")
}

// certAttrs describes a certificate in log lines.
func certAttrs(c *x509.Certificate) []any {
	if c == nil {
		return nil
	}
	return []any{"subject", c.Subject.CommonName, "serial", c.SerialNumber.Text(16),
		"not_after", c.NotAfter.UTC().Format(time.RFC3339)}
}

func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}
