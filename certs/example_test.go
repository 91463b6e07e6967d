package certs_test

import (
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"path/filepath"

	"github.com/migtun/migtun/certs"
)

// Example creates a CA and two hosts, then runs a mutually-authenticated
// TLS 1.3 handshake between them.
func Example() {
	dir, err := os.MkdirTemp("", "migtun-certs")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	if err := certs.InitCA(dir); err != nil {
		log.Fatal(err)
	}
	load := func(name string, sans ...string) *certs.Store {
		if err := certs.Issue(dir, name, sans); err != nil {
			log.Fatal(err)
		}
		s, err := certs.Load(certs.Config{
			CertFile:     filepath.Join(dir, name+".crt"),
			KeyFile:      filepath.Join(dir, name+".key"),
			CAFile:       filepath.Join(dir, "ca.crt"),
			AllowedPeers: []string{"*.example"},
		})
		if err != nil {
			log.Fatal(err)
		}
		return s
	}
	hostA := load("host-a", "a.example")
	hostB := load("host-b", "b.example", "10.0.0.2")

	alpn := []string{"migtun/1"}
	c1, c2 := net.Pipe()
	serverPeer := make(chan string, 1)
	go func() {
		srv := tls.Server(c2, hostB.ServerConfig(alpn))
		defer srv.Close()
		if err := srv.Handshake(); err != nil {
			serverPeer <- err.Error()
			return
		}
		serverPeer <- certs.PeerName(srv.ConnectionState())
		srv.Write([]byte("ok"))
		io.Copy(io.Discard, srv)
	}()

	cli := tls.Client(c1, hostA.ClientConfig("10.0.0.2:4443", alpn))
	buf := make([]byte, 2)
	if _, err := io.ReadFull(cli, buf); err != nil {
		log.Fatal(err)
	}
	cli.Close()
	fmt.Println("client sees", certs.PeerName(cli.ConnectionState()))
	fmt.Println("server sees", <-serverPeer)
	// Output:
	// client sees host-b
	// server sees host-a
}
