package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/migtun/migtun/tunnel"
)

// TestReliabilityBadQUIC is TestReliabilityBadConnections for the quic
// transport's UDP port (--handshake-timeout 2s), while a stream carries
// 64 MiB through it. Strangers send garbage datagrams, handshake without a
// certificate, or stall in the middle of the handshake; a peer holding a
// certificate of the CA opens streams that send garbage, trickle their
// header or stop after its first byte. Every handshake and stream must end
// within the handshake deadline (a stalled handshake must not complete when
// the stranger goes on after it), and the stream's bytes must arrive whole.
func TestReliabilityBadQUIC(t *testing.T) {
	const deadline = 2 * time.Second
	h := newRelForwardHosts(t, "quic", "--handshake-timeout", deadline.String())
	peer := peerTLS(t, h.ca, "src")
	if out, err := migtun(t, "certs", "issue", "--dir", h.ca, "--name", "staller", "--san", "127.0.0.1"); err != nil {
		t.Fatalf("certs issue: %v\n%s", err, out)
	}
	staller := peerTLS(t, h.ca, "staller")
	stranger := peer.Clone()
	stranger.Certificates = nil
	addr := h.dst.Addr
	inFlight := sendInFlight(t, h)

	header, err := (&tunnel.Header{Kind: tunnel.KindData, Channel: "main"}).AppendBinary(nil)
	if err != nil {
		t.Fatal(err)
	}
	kinds := []badAttempt{
		{name: "udp-garbage", run: func(ctx context.Context) (time.Duration, error) {
			c, err := net.Dial("udp", addr)
			if err != nil {
				return 0, err
			}
			defer c.Close()
			for i := range 20 {
				b := make([]byte, 1200)
				rand.Read(b)
				if i%2 == 0 { // a long header of QUIC version 1: parsed as an Initial
					b[0], b[1], b[2], b[3], b[4] = 0xc0, 0, 0, 0, 1
				}
				c.Write(b)
			}
			return 0, nil
		}},
		{name: "no-certificate", run: func(ctx context.Context) (time.Duration, error) {
			start := time.Now()
			conn, err := quic.DialAddr(ctx, addr, stranger, &quic.Config{HandshakeIdleTimeout: 10 * time.Second})
			if err != nil {
				return time.Since(start), nil // refused during the handshake
			}
			defer conn.CloseWithError(0, "")
			// TLS 1.3: the client finishes before the server has checked
			// its certificate; the server's refusal closes the connection.
			select {
			case <-conn.Context().Done():
				return time.Since(start), nil
			case <-ctx.Done():
				return time.Since(start), errors.New("a connection without a client certificate stayed open")
			}
		}},
		{name: "stalled-handshake", unbounded: true, run: func(ctx context.Context) (time.Duration, error) {
			// The client's side of the handshake ends when it sends its
			// certificate, so the dial succeeds; a server that dropped the
			// handshake never answers on the connection.
			stall := staller.Clone()
			stall.Certificates = nil
			stall.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
				time.Sleep(deadline + 2*time.Second) // past the server's deadline, with room for a slow machine
				return &staller.Certificates[0], nil
			}
			start := time.Now()
			conn, err := quic.DialAddr(ctx, addr, stall, &quic.Config{HandshakeIdleTimeout: 5 * time.Second, MaxIdleTimeout: 3 * time.Second})
			if err != nil {
				return time.Since(start), nil
			}
			defer conn.CloseWithError(0, "")
			s, err := conn.OpenStreamSync(ctx)
			if err != nil {
				return time.Since(start), nil
			}
			s.Write(header)
			n, _ := s.Read(make([]byte, 1))
			if n > 0 {
				return time.Since(start), fmt.Errorf("the server answered a stream of a handshake stalled for %v: it kept the handshake past its deadline", deadline+2*time.Second)
			}
			return time.Since(start), nil
		}},
		{name: "stream-garbage", run: peerStream(peer, addr, func(s *quic.Stream) {
			b := make([]byte, 4096)
			rand.Read(b)
			s.Write(b)
		})},
		{name: "stream-slow-header", run: peerStream(peer, addr, func(s *quic.Stream) {
			for i := 0; i < 100; i++ {
				if _, err := s.Write(header[i%len(header) : i%len(header)+1]); err != nil {
					return
				}
				time.Sleep(200 * time.Millisecond)
			}
		})},
		{name: "stream-first-byte-only", run: peerStream(peer, addr, func(s *quic.Stream) { s.Write(header[:1]) })},
	}

	throwBad(t, kinds, 10, deadline)
	if logHas(h.dst.LogPath, `msg="tunnel handshake"`, "peer=staller") {
		t.Error("the destination completed a handshake that stalled past its deadline")
	}
	inFlight()
}

// peerStream returns a badAttempt run that connects with the peer's
// certificate, opens a stream, lets write misuse it, and waits for the
// server to end the stream; the time counts from the stream's first byte.
func peerStream(peer *tls.Config, addr string, write func(*quic.Stream)) func(context.Context) (time.Duration, error) {
	return func(ctx context.Context) (time.Duration, error) {
		conn, err := quic.DialAddr(ctx, addr, peer, &quic.Config{HandshakeIdleTimeout: 10 * time.Second})
		if err != nil {
			return 0, fmt.Errorf("a peer with a valid certificate could not connect: %w", err)
		}
		defer conn.CloseWithError(0, "")
		s, err := conn.OpenStreamSync(ctx)
		if err != nil {
			return 0, err
		}
		start := time.Now()
		go write(s) // ends when the stream does
		s.SetReadDeadline(ctxDeadline(ctx))
		_, err = io.Copy(io.Discard, s)
		took := time.Since(start)
		s.CancelWrite(0)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return took, errors.New("stream still open")
		}
		return took, nil
	}
}

// peerTLS is a client configuration for migtun's port (TLS or QUIC)
// presenting host's certificate from the PKI directory ca and trusting its
// CA.
func peerTLS(t *testing.T, ca, host string) *tls.Config {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(filepath.Join(ca, host+".crt"), filepath.Join(ca, host+".key"))
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(filepath.Join(ca, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	return &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, ServerName: "127.0.0.1",
		MinVersion: tls.VersionTLS13, NextProtos: []string{tunnel.ALPN}}
}
