package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
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

	"github.com/migtun/migtun/bench"
	"github.com/migtun/migtun/certs"
	"github.com/migtun/migtun/migrate"
	"github.com/migtun/migtun/proxy"
	"github.com/migtun/migtun/tunnel"
)

const serveSynopsis = `serve --listen HOST:PORT --transport tls|quic|plain --cert FILE --key FILE --ca FILE
              [--route CHANNEL=unix:PATH|tcp:HOST:PORT]...
              [--forward unix:PATH|tcp:HOST:PORT=PEERHOST:PORT/CHANNEL]...
              [--insecure-plaintext] [--control unix:PATH] [--control-listen HOST:PORT]
              [--qmp NAME=unix:PATH]...`

func runServe(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("serve", serveSynopsis, stderr)
	listen := fs.String("listen", "", "host:port of the tunnel port (TCP for tls and plain, UDP for quic)")
	transport := fs.String("transport", "tls", "how streams cross to peers: tls, quic or plain")
	certFile := fs.String("cert", "", "this host's certificate (PEM); replacing it and --key takes effect within about a second, for new connections")
	keyFile := fs.String("key", "", "this host's private key (PEM)")
	caFile := fs.String("ca", "", "the CA certificate peers must be signed by (PEM); read once, at start")
	var routes []proxy.Route
	fs.Func("route", "deliver incoming streams of CHANNEL to a local socket: CHANNEL=unix:PATH, CHANNEL=tcp:HOST:PORT, or CHANNEL=session for a socket named after each session in --socket-dir (repeatable)", func(s string) error {
		r, err := proxy.ParseRoute(s)
		routes = append(routes, r)
		return err
	})
	var forwards []proxy.Forward
	fs.Func("forward", "listen locally and carry each connection to a peer's channel: unix:PATH=PEERHOST:PORT/CHANNEL or tcp:HOST:PORT=PEERHOST:PORT/CHANNEL (repeatable)", func(s string) error {
		f, err := proxy.ParseForward(s)
		forwards = append(forwards, f)
		return err
	})
	vms := map[string]string{}
	fs.Func("qmp", "a VM this host may drive for its peers' migrations: NAME=unix:PATH of its QMP socket (repeatable); main and nbd default to CHANNEL=session routes", func(s string) error {
		name, path, err := migrate.ParseVM(s)
		if err == nil {
			if _, dup := vms[name]; dup {
				return fmt.Errorf("VM %q given twice", name)
			}
			vms[name] = path
		}
		return err
	})
	var allowPeers listFlag
	fs.Var(&allowPeers, "allow-peer", "accept only peers whose certificate names this (\"*.suffix\" allowed; repeatable; default: any peer with a certificate from the CA)")
	plaintext := fs.Bool("insecure-plaintext", false, "allow the plain transport: stream bytes cross the network unencrypted (peers are still authenticated)")
	dialTimeout := fs.Duration("dial-timeout", tunnel.DefaultDialTimeout, "bound on connecting to a peer or to a local route")
	handshakeTimeout := fs.Duration("handshake-timeout", tunnel.DefaultHandshakeTimeout, "bound on an incoming stream's handshake and header (quic: the handshake's idle timeout; at most twice it in all)")
	tcpCongestion := fs.String("tcp-congestion", "", "TCP congestion control of the tunnel's connections (tls, plain): bbr, cubic, reno, or \"kernel\" for the host's default (default: bbr when the kernel has it)")
	tcpBuffer := fs.String("tcp-buffer", bench.FormatSize(tunnel.DefaultSocketBuffer), "send and receive buffer of each tunnel TCP connection, e.g. 16MiB (as root beyond net.core.wmem_max), or \"kernel\" for the kernel's autotuning")
	idleTimeout := fs.Duration("idle-timeout", tunnel.DefaultIdleTimeout, "a QUIC peer silent this long is declared dead; TCP connections probe a peer silent this long (keepalive) and give up after three probes")
	drainTimeout := fs.Duration("drain-timeout", 30*time.Second, "on SIGTERM, how long streams in flight may go on before they are aborted")
	control := fs.String("control", "", "the local control endpoint, a UNIX socket (mode 0600): unix:PATH (default: none)")
	controlListen := fs.String("control-listen", "", "also serve the control endpoint on TCP HOST:PORT; it has no authentication, keep it on loopback (default: off)")
	metricsListen := fs.String("metrics-listen", "", "also serve Prometheus metrics on http://HOST:PORT/metrics (default: off; the control endpoint serves /metrics too)")
	socketDir := fs.String("socket-dir", "", "directory of the sessions' UNIX sockets: the source's listeners, the destination's CHANNEL=session routes (default $TMPDIR/migtun)")
	sessionTTL := fs.Duration("session-ttl", proxy.DefaultSessionTTL, "a prepared session that sees no stream in this time expires")
	maxSessions := fs.Int("max-sessions", proxy.DefaultMaxSessions, "sessions open at once, at most")
	maxSessionStreams := fs.Int("max-session-streams", proxy.DefaultMaxSessionStreams, "streams one session may open, at most")
	finishGrace := fs.Duration("finish-grace", proxy.DefaultFinishGrace, "how long finish waits for a session's streams to end before aborting them")
	logFormat := fs.String("log-format", "text", "log format: text or json")
	logLevel := fs.String("log-level", "info", "log level: debug, info, warn or error")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required("serve", map[string]string{"listen": *listen, "cert": *certFile, "key": *keyFile, "ca": *caFile},
		"listen", "cert", "key", "ca"); err != nil {
		return err
	}
	tr, err := tunnel.ParseTransport(*transport)
	if err != nil {
		return fmt.Errorf("serve: --transport: %w", err)
	}
	if tr == tunnel.Plain && !*plaintext {
		return errors.New("serve: --transport plain sends migration bytes unencrypted; add --insecure-plaintext to say that is intended")
	}
	sockBuf := -1
	if *tcpBuffer != "kernel" {
		n, err := bench.ParseSize(*tcpBuffer)
		if err != nil || n > 1<<30 {
			return fmt.Errorf("serve: --tcp-buffer %q: want a size such as 16MiB, at most 1GiB, or kernel", *tcpBuffer)
		}
		sockBuf = int(n)
	}
	log, err := newLogger(stderr, *logFormat, *logLevel)
	if err != nil {
		return err
	}
	store, err := certs.Load(certs.Config{CertFile: *certFile, KeyFile: *keyFile, CAFile: *caFile, AllowedPeers: allowPeers,
		OnReload: func(leaf *x509.Certificate, err error) {
			if err != nil {
				log.Warn("certificate not reloaded: new connections still present the previous one", "err", err.Error())
				return
			}
			log.Info("certificate reloaded: new connections present it", certAttrs(leaf)...)
		}})
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	log.Info("certificate loaded", certAttrs(store.Leaf())...)
	if err := store.Verify(); err != nil {
		log.Warn("peers will refuse this host's certificate", "err", err.Error())
	}
	var vmc proxy.VMController
	if len(vms) > 0 {
		vmc = migrate.NewController(vms, log)
		// The VMs' QEMUs listen on sockets named after each session.
		for _, ch := range []string{"main", "nbd"} {
			if !slices.ContainsFunc(routes, func(r proxy.Route) bool { return r.Channel == ch }) {
				routes = append(routes, proxy.Route{Channel: ch, Target: proxy.SessionSocket})
			}
		}
	}
	alpn := []string{tunnel.ALPN}
	srv, err := proxy.New(proxy.Config{
		Listen: *listen,
		Tunnel: &tunnel.Config{
			Transport:        tr,
			ServerTLS:        store.ServerConfig(alpn),
			ClientTLS:        func(host string) *tls.Config { return store.ClientConfig(host, alpn) },
			AllowPlaintext:   *plaintext,
			HandshakeTimeout: *handshakeTimeout,
			DialTimeout:      *dialTimeout,
			IdleTimeout:      *idleTimeout,
			Congestion:       *tcpCongestion,
			SocketBuffer:     sockBuf,
		},
		Routes:            routes,
		Forwards:          forwards,
		DialTimeout:       *dialTimeout,
		SocketDir:         *socketDir,
		SessionTTL:        *sessionTTL,
		MaxSessions:       *maxSessions,
		MaxSessionStreams: *maxSessionStreams,
		FinishGrace:       *finishGrace,
		Logger:            log,
		VMs:               vmc,
		Certificate:       func() (*x509.Certificate, error) { return store.Leaf(), store.Err() },
	})
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// Replaced certificate files are picked up within about a second, and
	// logged, even while no handshake looks at them.
	var watch sync.WaitGroup
	watch.Go(func() {
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
	})
	defer watch.Wait()
	defer stop() // ends the watch on every return
	if err := srv.Start(); err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	var controls []string
	if *control != "" {
		ep, err := proxy.ParseEndpoint(*control)
		if err == nil && ep.Network != "unix" {
			err = errors.New("want unix:PATH (use --control-listen for TCP)")
		}
		if err == nil {
			_, err = srv.ListenControl(ep)
		}
		if err != nil {
			srv.Close()
			return fmt.Errorf("serve: --control: %w", err)
		}
		controls = append(controls, ep.String())
	}
	if *controlListen != "" {
		addr, err := srv.ListenControl(proxy.Endpoint{Network: "tcp", Address: *controlListen})
		if err != nil {
			srv.Close()
			return fmt.Errorf("serve: --control-listen: %w", err)
		}
		if ta, ok := addr.(*net.TCPAddr); ok && !ta.IP.IsLoopback() {
			log.Warn("the control endpoint listens beyond loopback without authentication", "addr", addr.String())
		}
		controls = append(controls, "tcp:"+addr.String())
	}
	if *metricsListen != "" {
		addr, err := srv.ListenMetrics(*metricsListen)
		if err != nil {
			srv.Close()
			return fmt.Errorf("serve: --metrics-listen: %w", err)
		}
		log.Info("serving metrics", "addr", "http://"+addr.String()+"/metrics")
	}
	if *plaintext {
		log.Warn("plaintext allowed: migration bytes of plain streams cross the network unencrypted")
	}
	var fwd []string
	for _, f := range forwards {
		fwd = append(fwd, f.String())
	}
	fmt.Fprintf(stdout, "migtun ready: listening on %s (%s); %d routes; forwards: [%s]; control: [%s]\n",
		srv.Addr(), tr, len(routes), strings.Join(fwd, " "), strings.Join(controls, " "))
	<-ctx.Done()
	stop()
	log.Info("stopping: draining streams in flight", slog.Duration("drain_timeout", *drainTimeout))
	dctx, cancel := context.WithTimeout(context.Background(), *drainTimeout)
	defer cancel()
	if err := srv.Shutdown(dctx); err != nil {
		log.Warn("streams aborted at the drain timeout")
	}
	log.Info("stopped")
	return nil
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
