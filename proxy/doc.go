// Package proxy is the migtun sidecar: it serves a host's tunnel port,
// delivers each incoming stream to the local endpoint its channel is routed
// to, and turns connections to local forward listeners into streams to a
// peer.
//
// On the destination host a [Route] maps a channel to a local UNIX socket or
// TCP address; only this host's configuration decides where bytes go, the
// wire only names the channel. On the source host a [Forward] is a local
// listener — the socket QEMU or libvirt connects to instead of the other
// host — whose connections become streams of one channel.
//
// The relay between a local connection and a stream is full duplex: the end
// of one direction is passed on as a half close while the other keeps
// flowing, and a failure of either aborts both so that QEMU sees it. Between
// two kernel sockets (the plain transport) bytes move with splice(2).
//
//	srv, err := proxy.New(proxy.Config{
//		Listen: "0.0.0.0:7400",
//		Tunnel: &tunnel.Config{ServerTLS: store.ServerConfig(nil), ClientTLS: clientTLS},
//		Routes: []proxy.Route{{Channel: "main", Target: proxy.Endpoint{Network: "unix", Address: "/run/qemu/in.sock"}}},
//	})
//	err = srv.Start()
//	defer srv.Shutdown(ctx)
package proxy
