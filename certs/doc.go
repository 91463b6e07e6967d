// Package certs owns migtun's certificates: it creates a small CA and host
// certificates, loads them, reloads a host's certificate when its files
// change, and builds the mutually-authenticated TLS 1.3 configurations both
// ends of the tunnel use, including the peer-name policy.
//
// Every host is both client and server, so one certificate per host carries
// both the ServerAuth and ClientAuth key usages.
//
// Typical use, once per cluster and once per host:
//
//	certs.InitCA("/etc/migtun")
//	certs.Issue("/etc/migtun", "host-a", []string{"10.0.0.1", "host-a.example"})
//
// and in the running sidecar:
//
//	store, err := certs.Load(certs.Config{
//		CertFile:     "/etc/migtun/host-a.crt",
//		KeyFile:      "/etc/migtun/host-a.key",
//		CAFile:       "/etc/migtun/ca.crt",
//		AllowedPeers: []string{"*.example"},
//	})
//	if err != nil {
//		return err
//	}
//	ln, err := tls.Listen("tcp", ":4443", store.ServerConfig([]string{"migtun/1"}))
//	...
//	conn, err := tls.Dial("tcp", "10.0.0.2:4443", store.ClientConfig("10.0.0.2", []string{"migtun/1"}))
//	...
//	log.Print("peer ", certs.PeerName(conn.ConnectionState()))
//
// Replacing the certificate and key files (for example with rename(2)) takes
// effect on the next full handshake; no restart and no new Store is needed.
// Session tickets issued before a rotation are not resumed afterwards.
package certs
