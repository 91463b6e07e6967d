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
// A route takes only the streams of migration sessions, each carrying its
// session's ID and secret token, unless it is Sessionless: then peers may
// also reach it with plain forwards. A peer can never choose where bytes
// go, and without a session's token it cannot reach a channel sessions use.
//
// The relay between a local connection and a stream is full duplex: the end
// of one direction is passed on as a half close while the other keeps
// flowing, and a failure of either aborts both so that QEMU sees it. Between
// two kernel sockets (the plain transport) bytes move with splice(2).
//
//	srv, err := proxy.New(proxy.Config{
//		Listen: "0.0.0.0:7400",
//		Tunnel: &tunnel.Config{ServerTLS: store.ServerConfig(nil), ClientTLS: clientTLS},
//		Routes: []proxy.Route{{Channel: "main", Target: endpoint.Unix("/run/qemu/in.sock"), Sessionless: true}},
//	})
//	err = srv.Start()
//	defer srv.Shutdown(ctx)
package proxy
