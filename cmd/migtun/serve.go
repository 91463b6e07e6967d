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
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/migtun/migtun/bench"
	"github.com/migtun/migtun/certs"
	"github.com/migtun/migtun/control"
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
	Listen            string                      `json:"listen"`
	Transport         string                      `json:"transport"`
	Cert              string                      `json:"cert"`
	Key               string                      `json:"key"`
	CA                string                      `json:"ca"`
	Routes            []string                    `json:"routes"`
	Forwards          []string                    `json:"forwards"`
	VMs               map[string]migrate.VMConfig `json:"vms"`
	QMPDir            string                      `json:"qmp_dir,omitempty"`
	QMPDirPeers       []string                    `json:"qmp_dir_peers,omitempty"`
	AllowPeers        []string                    `json:"allow_peers"`
	InsecurePlaintext bool                        `json:"insecure_plaintext"`
	DialTimeout       time.Duration               `json:"dial_timeout"`
	HandshakeTimeout  time.Duration               `json:"handshake_timeout"`
	IdleTimeout       time.Duration               `json:"idle_timeout"`
	TCPCongestion     string                      `json:"tcp_congestion"`
	TCPBuffer         string                      `json:"tcp_buffer"`
	Stripes           int                         `json:"stripes"`
	DrainTimeout      time.Duration               `json:"drain_timeout"`
	Control           string                      `json:"control"`
	ControlListen     string                      `json:"control_listen"`
	ControlTokenFile  string                      `json:"control_token_file"`
	BenchSink         bool                        `json:"bench_sink"`
	BenchSinkMax      int64                       `json:"bench_sink_max_bytes"`
	MetricsListen     string                      `json:"metrics_listen"`
	SocketDir         string                      `json:"socket_dir"`
	SessionTTL        time.Duration               `json:"session_ttl"`
	MaxSessions       int                         `json:"max_sessions"`
	MaxPeerSessions   int                         `json:"max_peer_sessions"`
	MaxControl        int                         `json:"max_control_requests"`
	MaxPeerControl    int                         `json:"max_peer_control_requests"`
	MaxSessionStreams int                         `json:"max_session_streams"`
	FinishGrace       time.Duration               `json:"finish_grace"`
	LogFormat         string                      `json:"log_format"`
	LogLevel          string                      `json:"log_level"`

	routes       []proxy.Route
	forwards     []proxy.Forward
	transport    tunnel.Transport
	socketBuffer int // TCPBuffer in bytes, -1 for the kernel's autotuning
	controlToken string
	printConfig  bool
}

func runServe(args []string, stdout, stderr io.Writer) error {
	cfg, err := parseServe(args, stderr)
	if err != nil {
		return err
	}
	if cfg.printConfig {
		return printJSON(stdout, cfg.effective())
	}
	log, err := newLogger(stderr, cfg.LogFormat, cfg.LogLevel)
	if err != nil {
		return err
	}
	if cfg.ControlTokenFile != "" {
		if cfg.controlToken, err = control.ReadTokenFile(cfg.ControlTokenFile); err != nil {
			return fmt.Errorf("serve: --control-token-file: %w", err)
		}
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
	if cfg.BenchSink {
		ln, err := endpoint.Unix(cfg.benchSinkPath()).Listen()
		if err != nil {
			srv.Close()
			return fmt.Errorf("serve: --bench-sink: %w", err)
		}
		log.Warn("bench sink on: authenticated peers may push data to this host to measure the path", "channel", bench.PeerSinkChannel)
		watch.Go(func() { bench.ServeSink(ctx, ln, bench.SinkLimits{MaxBytes: cfg.BenchSinkMax}) })
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
	c := &serveConfig{VMs: map[string]migrate.VMConfig{}}
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
	c.socketBuffer = -1
	if c.TCPBuffer != "kernel" {
		n, err := bench.ParseSize(c.TCPBuffer)
		if err != nil || n > 1<<30 {
			return nil, fmt.Errorf("serve: --tcp-buffer %q: want a size such as 16MiB, at most 1GiB, or kernel", c.TCPBuffer)
		}
		c.socketBuffer = int(n)
	}
	if c.Stripes < 1 || c.Stripes > tunnel.MaxStripes {
		return nil, fmt.Errorf("serve: --stripes %d: want 1 to %d", c.Stripes, tunnel.MaxStripes)
	}
	if c.Stripes > 1 && tr != tunnel.TLS {
		return nil, fmt.Errorf("serve: --stripes needs --transport tls (striped streams ride on its authenticated records)")
	}
	if _, err := newLogger(io.Discard, c.LogFormat, c.LogLevel); err != nil {
		return nil, err
	}
	if c.Control != "" {
		if _, err := endpoint.ParseUnix(c.Control); err != nil {
			return nil, fmt.Errorf("serve: --control: %w (use --control-listen for TCP)", err)
		}
	}
	if c.ControlListen != "" && c.ControlTokenFile == "" {
		return nil, errors.New("serve: --control-listen needs --control-token-file: without a token any local user could drive migrations")
	}
	if c.drivesVMs() {
		// The VMs' QEMUs listen on sockets named after each session.
		for _, ch := range []string{"main", "nbd"} {
			if !slices.ContainsFunc(c.routes, func(r proxy.Route) bool { return r.Channel == ch }) {
				c.routes = append(c.routes, proxy.Route{Channel: ch, Target: proxy.SessionSocket})
			}
		}
	}
	if c.BenchSink {
		// Authenticated peers may measure the path to this host: a discard
		// sink, bounded per stream, on a channel of its own.
		if c.SocketDir == "" {
			var err error
			if c.SocketDir, err = proxy.DefaultSocketDir(); err != nil {
				return nil, fmt.Errorf("serve: --bench-sink: %w", err)
			}
		}
		c.routes = append(c.routes, proxy.Route{Channel: bench.PeerSinkChannel,
			Target: endpoint.Unix(c.benchSinkPath()), Sessionless: true})
	}
	// A host that takes sessions opens its routes only to them, unless a
	// route says ",sessionless"; a host of static routes alone keeps them
	// open to its peers' forwards.
	if !c.takesSessions() {
		for i := range c.routes {
			c.routes[i].Sessionless = c.routes[i].Target != proxy.SessionSocket
		}
	}
	c.Routes = nil
	for _, r := range c.routes {
		c.Routes = append(c.Routes, r.String())
	}
	return c, nil
}

// drivesVMs reports whether the host drives VMs for its peers: given by
// --qmp or --qmp-dir, or registered at run time on its control endpoint.
func (c *serveConfig) drivesVMs() bool {
	return len(c.VMs) > 0 || c.QMPDir != "" || c.Control != "" || c.ControlListen != ""
}

// benchSinkPath is the socket of the bench sink.
func (c *serveConfig) benchSinkPath() string { return filepath.Join(c.SocketDir, "bench-sink.sock") }

// takesSessions reports whether the host serves migration sessions: it has
// a control endpoint, a VM to drive or a CHANNEL=session route.
func (c *serveConfig) takesSessions() bool {
	return c.drivesVMs() ||
		slices.ContainsFunc(c.routes, func(r proxy.Route) bool { return r.Target == proxy.SessionSocket })
}

// define declares serve's flags, each writing into c.
func (c *serveConfig) define(fs *flag.FlagSet) {
	fs.StringVar(&c.Listen, "listen", "", "host:port of the tunnel port (TCP for tls and plain, UDP for quic)")
	fs.StringVar(&c.Transport, "transport", "tls", "how streams cross to peers: tls, quic or plain")
	fs.StringVar(&c.Cert, "cert", "", "this host's certificate (PEM); replacing it and --key takes effect within about a second, for new connections")
	fs.StringVar(&c.Key, "key", "", "this host's private key (PEM)")
	fs.StringVar(&c.CA, "ca", "", "the CA certificate peers must be signed by (PEM); read once, at start")
	fs.Func("route", "deliver incoming streams of CHANNEL to a local socket: CHANNEL=unix:PATH, CHANNEL=tcp:HOST:PORT, or CHANNEL=session for a socket named after each session in --socket-dir (repeatable). A host that takes sessions (--control, --control-listen, --qmp or a session route) lets only sessions' streams reach its routes; add ,sessionless to a route to let peers' plain forwards reach it too", func(s string) error {
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
	fs.Func("qmp", "a VM this host may drive for its peers' migrations: NAME=unix:PATH of its QMP socket, then ,peer=NAME for each peer (certificate name) that may migrate into it (repeatable); main and nbd default to CHANNEL=session routes", func(s string) error {
		name, vm, err := migrate.ParseVM(s)
		if err == nil {
			if _, dup := c.VMs[name]; dup {
				return fmt.Errorf("VM %q given twice", name)
			}
			c.VMs[name] = vm
		}
		return err
	})
	fs.Func("qmp-dir", "a directory of QMP sockets: each NAME.qmp in it is a VM peers may migrate into, looked up when a peer names it; then ,peer=NAME for each peer that may (DIR[,peer=NAME]...)", func(s string) error {
		parts := strings.Split(s, ",")
		if !filepath.IsAbs(parts[0]) {
			return fmt.Errorf("%q: want an absolute directory", s)
		}
		c.QMPDir = parts[0]
		for _, p := range parts[1:] {
			peer, ok := strings.CutPrefix(p, "peer=")
			if !ok || peer == "" {
				return fmt.Errorf("%q: %q: want peer=NAME", s, p)
			}
			c.QMPDirPeers = append(c.QMPDirPeers, peer)
		}
		return nil
	})
	fs.Var((*listFlag)(&c.AllowPeers), "allow-peer", "accept only peers whose certificate names this (\"*.suffix\" allowed; repeatable; default: any peer with a certificate from the CA)")
	fs.BoolVar(&c.InsecurePlaintext, "insecure-plaintext", false, "allow the plain transport, for a trusted migration network only: anyone on the path can read the guest's RAM and disks, and change them unnoticed (only who opens a stream is authenticated, and control still uses TLS)")
	fs.DurationVar(&c.DialTimeout, "dial-timeout", tunnel.DefaultDialTimeout, "bound on connecting to a peer or to a local route")
	fs.DurationVar(&c.HandshakeTimeout, "handshake-timeout", tunnel.DefaultHandshakeTimeout, "bound on an incoming stream's handshake and header (quic: the handshake's idle timeout; at most twice it in all)")
	fs.DurationVar(&c.IdleTimeout, "idle-timeout", tunnel.DefaultIdleTimeout, "a QUIC peer silent this long is declared dead; TCP connections probe a peer silent this long (keepalive) and give up after three probes")
	fs.StringVar(&c.TCPCongestion, "tcp-congestion", "", "TCP congestion control of the tunnel's connections (tls, plain): bbr, cubic, reno, or \"kernel\" for the host's default (default: bbr when the kernel has it)")
	fs.IntVar(&c.Stripes, "stripes", 1, "stripe every stream this host opens over this many TLS connections to the peer (1 to 16; 1: one connection each): for long paths where one connection is held by its window or a per-flow limit; the peer must know striping (this release)")
	fs.StringVar(&c.TCPBuffer, "tcp-buffer", bench.FormatSize(tunnel.DefaultSocketBuffer), "send and receive buffer of each tunnel TCP connection, e.g. 16MiB (as root beyond net.core.wmem_max), or \"kernel\" for the kernel's autotuning")
	fs.DurationVar(&c.DrainTimeout, "drain-timeout", 30*time.Second, "on SIGTERM, how long streams in flight may go on before they are aborted")
	fs.StringVar(&c.Control, "control", "", "the local control endpoint, a UNIX socket (mode 0600): unix:PATH (default: none)")
	fs.StringVar(&c.ControlListen, "control-listen", "", "also serve the control endpoint on TCP HOST:PORT, for clients that hold the token of --control-token-file (default: off)")
	fs.StringVar(&c.ControlTokenFile, "control-token-file", "", "the bearer token the TCP control endpoint requires, in a file only migtun's user may read (mode 0600)")
	fs.StringVar(&c.MetricsListen, "metrics-listen", "", "also serve Prometheus metrics on http://HOST:PORT/metrics, and /healthz (default: off; the control endpoint serves both too)")
	fs.StringVar(&c.SocketDir, "socket-dir", "", "directory of the sessions' UNIX sockets: the source's listeners, the destination's CHANNEL=session routes; created 0700, refused if others may write it (default: $RUNTIME_DIRECTORY, else /run/migtun as root, else $XDG_RUNTIME_DIR/migtun)")
	fs.DurationVar(&c.SessionTTL, "session-ttl", proxy.DefaultSessionTTL, "a prepared session that sees no stream in this time expires")
	fs.IntVar(&c.MaxSessions, "max-sessions", proxy.DefaultMaxSessions, "sessions open at once, at most")
	fs.IntVar(&c.MaxPeerSessions, "max-peer-sessions", 0, "sessions one peer may hold open here at once, its share of --max-sessions (default: half of --max-sessions)")
	fs.IntVar(&c.MaxControl, "max-control-requests", proxy.DefaultMaxControlRequests, "peers' control requests (prepare, finish, VM operations) served at once, at most; more are refused at once")
	fs.IntVar(&c.MaxPeerControl, "max-peer-control-requests", proxy.DefaultMaxPeerControlRequests, "control requests of one peer served at once, at most")
	fs.IntVar(&c.MaxSessionStreams, "max-session-streams", proxy.DefaultMaxSessionStreams, "streams one session may open, at most")
	fs.DurationVar(&c.FinishGrace, "finish-grace", proxy.DefaultFinishGrace, "how long finish waits for a session's streams to end before aborting them")
	fs.StringVar(&c.LogFormat, "log-format", "text", "log format: text, json, or journal (JSON behind the priority prefix systemd-journald reads)")
	fs.StringVar(&c.LogLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.BoolVar(&c.BenchSink, "bench-sink", false, "let authenticated peers measure the path to this host with migtun bench --peer: a discard sink on the channel "+bench.PeerSinkChannel+", each stream bounded by --bench-sink-max and 10 minutes (default: off)")
	fs.Int64Var(&c.BenchSinkMax, "bench-sink-max", bench.DefaultSinkMaxBytes, "with --bench-sink, the most bytes one stream may send")
	fs.BoolVar(&c.printConfig, "print-config", false, "print the effective settings as JSON and exit, opening nothing")
}

// effective returns the settings with the defaults a server fills in.
func (c *serveConfig) effective() any {
	e := *c
	if e.SocketDir == "" {
		e.SocketDir, _ = proxy.DefaultSocketDir()
	}
	if e.MaxPeerSessions <= 0 {
		e.MaxPeerSessions = max(1, e.MaxSessions/2)
	}
	e.MaxPeerSessions = min(e.MaxPeerSessions, e.MaxSessions)
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
	if c.drivesVMs() {
		ctl := migrate.NewController(c.VMs, log)
		if c.QMPDir != "" {
			ctl.SetDir(c.QMPDir, c.QMPDirPeers)
		}
		vms = ctl
	}
	if c.QMPDir != "" && len(c.QMPDirPeers) == 0 && len(c.AllowPeers) == 0 {
		log.Warn("any peer with a certificate of the CA may migrate into the VMs of --qmp-dir; bind them with ,peer=NAME or limit the peers with --allow-peer", "dir", c.QMPDir)
	}
	for name, vm := range c.VMs {
		if len(vm.Peers) == 0 && len(c.AllowPeers) == 0 {
			log.Warn("any peer with a certificate of the CA may migrate into this VM, take its disks and feed it a migration stream; bind it with ,peer=NAME or limit the peers with --allow-peer",
				"vm", name)
		}
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
			Congestion:       c.TCPCongestion,
			SocketBuffer:     c.socketBuffer,
			Stripes:          c.Stripes,
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
		if err := checkControlDir(filepath.Dir(ep.Address)); err != nil {
			return nil, fmt.Errorf("--control: %w", err)
		}
		if _, err := srv.ListenControl(ep, proxy.ControlAuth{}); err != nil {
			return nil, fmt.Errorf("--control: %w", err)
		}
		controls = append(controls, ep.String())
	}
	if c.ControlListen != "" {
		addr, err := srv.ListenControl(endpoint.TCP(c.ControlListen), proxy.ControlAuth{Token: c.controlToken})
		if err != nil {
			return nil, fmt.Errorf("--control-listen: %w", err)
		}
		if ta, ok := addr.(*net.TCPAddr); ok && !ta.IP.IsLoopback() {
			log.Warn("the control endpoint listens beyond loopback; its token is all that protects it, and it crosses the network in clear", "addr", addr.String())
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
	w := tunnel.BufferWarning(c.socketBuffer)
	if c.transport == tunnel.QUIC {
		w = tunnel.QUICBufferWarning()
	}
	if w != "" {
		log.Warn(w)
	}
	return controls, nil
}

// checkControlDir creates the control socket's directory 0700 if it is
// missing, and refuses one that others may enter or write: the socket's
// own mode is not the only thing between a local user and the endpoint.
func checkControlDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	switch {
	case fi.Mode()&os.ModeSymlink != 0:
		return fmt.Errorf("the control socket's directory %s is a symlink; give the directory itself", dir)
	case fi.Mode().Perm()&0o077 != 0:
		return fmt.Errorf("the control socket's directory %s has mode %04o: others may enter it; put the socket in a directory only migtun's user can enter (such as the socket directory)", dir, fi.Mode().Perm())
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("the control socket's directory %s is owned by uid %d, not by migtun's user (uid %d)", dir, st.Uid, os.Geteuid())
	}
	return nil
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
