package bench

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"

	"github.com/quic-go/quic-go"
)

// relayALPN names the protocol of the naive relays.
const relayALPN = "migtun-bench-naive"

// RelayConfig configures one hop of a naive baseline relay.
type RelayConfig struct {
	// Mode is tls-client, tls-server, quic-client or quic-server. A client
	// hop accepts plain local connections and carries each one over TLS
	// (or as a stream of one QUIC connection) to Connect; a server hop
	// accepts TLS connections (or QUIC streams) and carries each to a
	// plain local connection.
	Mode string
	// Listen and Connect are unix:PATH, tcp:HOST:PORT or udp:HOST:PORT
	// (udp for the QUIC side).
	Listen, Connect string
	// Cert and Key are the server hop's certificate; CA verifies it on
	// the client hop.
	Cert, Key, CA string
}

// ServeRelay runs one hop of the naive relays, the way many Go programs
// relay: io.Copy in both directions over crypto/tls (or quic-go) with
// default settings. It prints "relay ready: listening on ADDR" on stdout
// when it accepts, and returns when ctx ends.
func ServeRelay(ctx context.Context, cfg RelayConfig, stdout io.Writer) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	switch cfg.Mode {
	case "tls-client", "quic-client":
		roots := x509.NewCertPool()
		pem, err := os.ReadFile(cfg.CA)
		if err != nil {
			return err
		}
		if !roots.AppendCertsFromPEM(pem) {
			return fmt.Errorf("--ca %s: no certificate", cfg.CA)
		}
		host, _, _ := strings.Cut(strings.TrimPrefix(strings.TrimPrefix(cfg.Connect, "tcp:"), "udp:"), ":")
		tc := &tls.Config{RootCAs: roots, ServerName: host, NextProtos: []string{relayALPN}}
		ln, err := listen(cfg.Listen)
		if err != nil {
			return err
		}
		context.AfterFunc(ctx, func() { ln.Close() })
		var open func() (io.ReadWriter, func(), func(), error) // stream, closeWrite, close
		if cfg.Mode == "tls-client" {
			addr := strings.TrimPrefix(cfg.Connect, "tcp:")
			open = func() (io.ReadWriter, func(), func(), error) {
				c, err := (&tls.Dialer{Config: tc}).DialContext(ctx, "tcp", addr)
				if err != nil {
					return nil, nil, nil, err
				}
				t := c.(*tls.Conn)
				return t, func() { t.CloseWrite() }, func() { t.Close() }, nil
			}
		} else {
			qc, err := quic.DialAddr(ctx, strings.TrimPrefix(cfg.Connect, "udp:"), tc, nil)
			if err != nil {
				return err
			}
			defer qc.CloseWithError(0, "")
			open = func() (io.ReadWriter, func(), func(), error) {
				s, err := qc.OpenStreamSync(ctx)
				if err != nil {
					return nil, nil, nil, err
				}
				return s, func() { s.Close() }, func() { s.CancelRead(0); s.Close() }, nil
			}
		}
		fmt.Fprintf(stdout, "relay ready: listening on %s\n", cfg.Listen)
		for {
			c, err := ln.Accept()
			if err != nil {
				return acceptErr(ctx, err)
			}
			s, cw, cl, err := open()
			if err != nil {
				c.Close()
				return err
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				naiveCopy(c, s, cw, cl)
			}()
		}
	case "tls-server":
		cert, err := tls.LoadX509KeyPair(cfg.Cert, cfg.Key)
		if err != nil {
			return err
		}
		tc := &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{relayALPN}}
		ln, err := tls.Listen("tcp", strings.TrimPrefix(cfg.Listen, "tcp:"), tc)
		if err != nil {
			return err
		}
		context.AfterFunc(ctx, func() { ln.Close() })
		fmt.Fprintf(stdout, "relay ready: listening on tcp:%s\n", ln.Addr())
		for {
			c, err := ln.Accept()
			if err != nil {
				return acceptErr(ctx, err)
			}
			t := c.(*tls.Conn)
			wg.Add(1)
			go func() {
				defer wg.Done()
				serveDial(ctx, cfg.Connect, t, func() { t.CloseWrite() }, func() { t.Close() })
			}()
		}
	case "quic-server":
		cert, err := tls.LoadX509KeyPair(cfg.Cert, cfg.Key)
		if err != nil {
			return err
		}
		tc := &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{relayALPN}}
		ln, err := quic.ListenAddr(strings.TrimPrefix(cfg.Listen, "udp:"), tc, nil)
		if err != nil {
			return err
		}
		defer ln.Close()
		fmt.Fprintf(stdout, "relay ready: listening on udp:%s\n", ln.Addr())
		for {
			qc, err := ln.Accept(ctx)
			if err != nil {
				return acceptErr(ctx, err)
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer qc.CloseWithError(0, "")
				for {
					s, err := qc.AcceptStream(ctx)
					if err != nil {
						return
					}
					wg.Add(1)
					go func() {
						defer wg.Done()
						serveDial(ctx, cfg.Connect, s, func() { s.Close() }, func() { s.CancelRead(0); s.Close() })
					}()
				}
			}()
		}
	}
	return fmt.Errorf("--internal-relay %q: want tls-client, tls-server, quic-client or quic-server", cfg.Mode)
}

// acceptErr turns the error that ended an accept loop into ServeRelay's.
func acceptErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// serveDial connects a server hop's stream to its local endpoint.
func serveDial(ctx context.Context, endpoint string, s io.ReadWriter, closeWrite, closeAll func()) {
	netw, addr, _ := strings.Cut(endpoint, ":")
	c, err := (&net.Dialer{}).DialContext(ctx, netw, addr)
	if err != nil {
		closeAll()
		return
	}
	naiveCopy(c, s, closeWrite, closeAll)
}

// naiveCopy is the common relay: io.Copy each way, passing EOF on as a
// half close, then close both.
func naiveCopy(c net.Conn, s io.ReadWriter, closeWrite, closeAll func()) {
	done := make(chan struct{}, 2)
	go func() {
		io.Copy(s, c)
		closeWrite()
		done <- struct{}{}
	}()
	go func() {
		io.Copy(c, s)
		if cw, ok := c.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
		done <- struct{}{}
	}()
	<-done
	<-done
	c.Close()
	closeAll()
}

// listen opens a unix:PATH or tcp:HOST:PORT listener.
func listen(endpoint string) (net.Listener, error) {
	netw, addr, ok := strings.Cut(endpoint, ":")
	if !ok || (netw != "unix" && netw != "tcp") {
		return nil, errors.New("--listen " + endpoint + ": want unix:PATH or tcp:HOST:PORT")
	}
	return net.Listen(netw, addr)
}
