package bench

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"time"

	"github.com/migtun/migtun/internal/linkemu"
)

// readyTimeout bounds the start of each helper process.
const readyTimeout = 30 * time.Second

// serveReady matches the ready line of "migtun serve".
var serveReady = regexp.MustCompile(`ready: listening on (\S+) `)

// relayReady matches the ready line of ServeRelay.
var relayReady = regexp.MustCompile(`relay ready: listening on (\S+)`)

// migtunPath is two "migtun serve" processes: the destination routes each
// channel to its sink, the source forwards a local socket to each, all
// over the one port of the destination.
func migtunPath(transport string, streams int) path {
	return path{
		name: fmt.Sprintf("migtun/%s/%d", transport, streams), transport: transport, streams: streams,
		setup: func(e *env) ([]string, []*proc, error) {
			k, err := e.pki()
			if err != nil {
				return nil, nil, err
			}
			var entries, routes []string
			for _, ch := range e.channels {
				entries = append(entries, filepath.Join(e.dir, ch.name+"-src.sock"))
				routes = append(routes, "--route", ch.name+"=unix:"+ch.sink)
			}
			var extra []string
			if transport == "plain" {
				extra = []string{"--insecure-plaintext"}
			}
			extra = append(extra, e.cfg.ServeArgs...)
			args := func(side linkemu.Side, cert, key string, more ...string) []string {
				a := []string{e.cfg.Migtun, "serve", "--listen", e.host(side) + ":0", "--transport", transport,
					"--cert", cert, "--key", key, "--ca", k.ca, "--log-level", "warn"}
				return e.exec(side, append(append(a, extra...), more...)...)
			}
			dst, err := startProc(e.dir, "migtun-dst", serveReady, args(linkemu.B, k.cert, k.key, routes...)...)
			if err != nil {
				return nil, nil, err
			}
			procs := []*proc{dst}
			addr, err := dst.waitReady(readyTimeout)
			if err != nil {
				return nil, procs, err
			}
			var forwards []string
			for i, ch := range e.channels {
				forwards = append(forwards, "--forward", "unix:"+entries[i]+"="+addr+"/"+ch.name)
			}
			src, err := startProc(e.dir, "migtun-src", serveReady, args(linkemu.A, k.srcCert, k.srcKey, forwards...)...)
			if err != nil {
				return nil, procs, err
			}
			procs = append(procs, src)
			_, err = src.waitReady(readyTimeout)
			return entries, procs, err
		},
	}
}

// baselinePath returns the baseline called name.
func baselinePath(name string) path {
	p := path{name: name, baseline: true, streams: 1}
	switch name {
	case Direct:
		p.setup = func(e *env) ([]string, []*proc, error) {
			var sinks []string
			for _, ch := range e.channels {
				sinks = append(sinks, ch.sink)
			}
			return sinks, nil, nil
		}
	case GoTLSRelay:
		p.setup = perChannel(func(e *env, ch channel, entry string) ([]*proc, error) { return goRelayPath(e, ch, entry, "tls") })
	case QUICGoNaive:
		p.setup = perChannel(func(e *env, ch channel, entry string) ([]*proc, error) { return goRelayPath(e, ch, entry, "quic") })
	case Socat, SocatCubic:
		if _, err := exec.LookPath("socat"); err != nil {
			p.skip = "socat is not installed (apt-get install socat)"
		}
		cubic := name == SocatCubic
		p.setup = perChannel(func(e *env, ch channel, entry string) ([]*proc, error) { return socatPath(e, ch, entry, cubic) })
	case Stunnel:
		if stunnelBinary() == "" {
			p.skip = "stunnel is not installed (apt-get install stunnel4)"
		}
		p.setup = perChannel(stunnelPath)
	}
	return p
}

// goRelayPath is two "migtun bench --internal-relay" hops: unix (entry) →
// client hop → tls or quic over loopback → server hop → unix (ch.sink).
func goRelayPath(e *env, ch channel, entry, proto string) ([]*proc, error) {
	k, err := e.pki()
	if err != nil {
		return nil, err
	}
	netw := "tcp"
	if proto == "quic" {
		netw = "udp"
	}
	common := []string{"--cert", k.cert, "--key", k.key, "--ca", k.ca}
	server, err := startProc(e.dir, ch.name+"-"+proto+"-server", relayReady, e.exec(linkemu.B, append([]string{e.cfg.Migtun, "bench", "--internal-relay", proto + "-server",
		"--listen", netw + ":" + e.host(linkemu.B) + ":0", "--connect", "unix:" + ch.sink}, common...)...)...)
	if err != nil {
		return nil, err
	}
	procs := []*proc{server}
	addr, err := server.waitReady(readyTimeout)
	if err != nil {
		return procs, err
	}
	client, err := startProc(e.dir, ch.name+"-"+proto+"-client", relayReady, e.exec(linkemu.A, append([]string{e.cfg.Migtun, "bench", "--internal-relay", proto + "-client",
		"--listen", "unix:" + entry, "--connect", addr}, common...)...)...)
	if err != nil {
		return procs, err
	}
	procs = append(procs, client)
	_, err = client.waitReady(readyTimeout)
	return procs, err
}

// socatPath is two socat hops with 1 MiB buffers: unix (entry) → tcp →
// unix (ch.sink); with cubic, both TCP sockets use cubic (TCP_CONGESTION)
// whatever the host's default.
func socatPath(e *env, ch channel, entry string, cubic bool) ([]*proc, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	opt := ""
	if cubic {
		opt = ",setsockopt-string=6:13:cubic" // IPPROTO_TCP, TCP_CONGESTION
	}
	host := e.host(linkemu.B)
	server, err := startProc(e.dir, ch.name+"-socat-server", nil, e.exec(linkemu.B, "socat", "-b", "1048576",
		fmt.Sprintf("TCP-LISTEN:%d,bind=%s,reuseaddr,fork%s", port, host, opt), "UNIX-CONNECT:"+ch.sink)...)
	if err != nil {
		return nil, err
	}
	procs := []*proc{server}
	if err := server.waitFor(readyTimeout, "listening TCP port", func() bool { return server.tcpListening(port) }); err != nil {
		return procs, err
	}
	client, err := startProc(e.dir, ch.name+"-socat-client", nil, e.exec(linkemu.A, "socat", "-b", "1048576",
		"UNIX-LISTEN:"+entry+",fork", fmt.Sprintf("TCP:%s:%d%s", host, port, opt))...)
	if err != nil {
		return procs, err
	}
	procs = append(procs, client)
	err = client.waitFor(readyTimeout, "listening socket", func() bool { return exists(entry) })
	return procs, err
}

// stunnelBinary returns the stunnel command installed, or "".
func stunnelBinary() string {
	for _, b := range []string{"stunnel", "stunnel4"} {
		if p, err := exec.LookPath(b); err == nil {
			return p
		}
	}
	return ""
}

// stunnelPath is an stunnel client hop and an stunnel server hop (TLS with
// OpenSSL, stunnel's defaults): unix (entry) → TLS over tcp → unix
// (ch.sink).
func stunnelPath(e *env, ch channel, entry string) ([]*proc, error) {
	k, err := e.pki()
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	host := e.host(linkemu.B)
	serverConf := fmt.Sprintf("foreground = yes\npid =\n[bench]\naccept = %s:%d\nconnect = %s\ncert = %s\nkey = %s\n",
		host, port, ch.sink, k.cert, k.key)
	clientConf := fmt.Sprintf("foreground = yes\npid =\n[bench]\nclient = yes\naccept = %s\nconnect = %s:%d\nCAfile = %s\nverifyChain = yes\n",
		entry, host, port, k.ca)
	write := func(name, conf string) (string, error) {
		f := filepath.Join(e.dir, name)
		return f, os.WriteFile(f, []byte(conf), 0o600)
	}
	sconf, err := write(ch.name+"-stunnel-server.conf", serverConf)
	if err != nil {
		return nil, err
	}
	cconf, err := write(ch.name+"-stunnel-client.conf", clientConf)
	if err != nil {
		return nil, err
	}
	bin := stunnelBinary()
	server, err := startProc(e.dir, ch.name+"-stunnel-server", nil, e.exec(linkemu.B, bin, sconf)...)
	if err != nil {
		return nil, err
	}
	procs := []*proc{server}
	if err := server.waitFor(readyTimeout, "listening TCP port "+strconv.Itoa(port), func() bool { return server.tcpListening(port) }); err != nil {
		return procs, err
	}
	client, err := startProc(e.dir, ch.name+"-stunnel-client", nil, e.exec(linkemu.A, bin, cconf)...)
	if err != nil {
		return procs, err
	}
	procs = append(procs, client)
	err = client.waitFor(readyTimeout, "listening socket", func() bool { return exists(entry) })
	return procs, err
}
