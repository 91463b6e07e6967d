// Package tunnel is migtun's peer transport: one listening port per host that
// carries every stream of a migration to the peer, over TLS 1.3 on TCP, over
// QUIC, or over plain TCP on a trusted network.
//
// Every stream opens with a small binary [Header] naming what it is for (a
// channel, a migration session, a stream index). The receiving side reads the
// header under a deadline, checks it, and hands it to its owner as an
// [Incoming]; the owner decides, connects whatever it needs locally, and then
// calls [Incoming.Accept] or [Incoming.Refuse]. The opening side waits for
// that answer, so a stream is never used before the far end is ready, and
// streams opened one after another are also accepted in that order.
//
// Typical use on the receiving host:
//
//	ln, err := tunnel.Listen("0.0.0.0:7400", cfg)
//	for {
//		in, err := ln.Accept(ctx)
//		if err != nil { break }
//		go handle(in) // look up in.Header.Channel, dial, in.Accept()
//	}
//
// and on the sending host:
//
//	d := tunnel.NewDialer(cfg)
//	s, err := d.Open(ctx, "peer.example:7400", tunnel.Header{Kind: tunnel.KindData, Channel: "main"})
//
// Data streams over TLS leave crypto/tls after the accept reply and carry
// their bytes in large AES-GCM records of their own on the TCP connection
// (the bulk record layer, negotiated with [ALPNBulk]); such a stream's
// ReadFrom and WriteTo move one whole record per system call.
//
// The package knows nothing of QEMU; see docs/protocol.md for the wire format.
package tunnel
