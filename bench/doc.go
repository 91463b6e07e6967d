// Package bench is the throughput benchmark engine behind "migtun bench"
// and the Go benchmarks of the data plane.
//
// A benchmark run measures a list of paths, one after the other. A path is
// whatever carries bytes from a local UNIX socket to another local UNIX
// socket: nothing at all (direct, the ceiling), two real "migtun serve"
// processes talking tls, quic or plain over loopback, or a baseline relay
// (a naive Go TLS relay, a naive quic-go relay, socat, stunnel), each made
// of two helper processes so that every path has the same shape as a
// migration between two hosts:
//
//	sender → unix:SRC → [hop 1] → loopback → [hop 2] → unix:SINK → sink
//
// The sender and the sink run inside the calling process (the load
// generator). The sender opens N connections to SRC and splits the volume
// over them, writing a pre-generated random (incompressible) buffer again
// and again; the sink counts and discards. For each path Run reports the
// bytes sent and counted at the sink, the wall time, the throughput and the
// CPU time per GB: of the path's processes (utime+stime from /proc/PID/stat
// of each hop process and its descendants, plus the children it has
// reaped), and of the whole path including the in-process load generator
// (getrusage RUSAGE_SELF). Both are sampled when the first byte is sent and
// when the sink has counted the last, so process start-up and certificate
// generation are not charged to the path.
//
// Typical use, from cmd/migtun:
//
//	res, err := bench.Run(ctx, bench.Config{Migtun: exe, Size: 4 << 30,
//		Transports: []string{"tls", "quic", "plain"}, Streams: []int{1, 4},
//		Baselines: bench.AllBaselines})
//	bench.WriteTable(os.Stdout, res)
//
// Across an emulated link (Config.Link, "migtun bench --link wan"), the
// first hop of every path runs in namespace A of an internal/linkemu link
// and the second in B, so the hops talk over a link with the profile's
// round trip, loss and rate while the load generator stays outside:
//
//	sender → unix:SRC → [hop 1 in A] → emulated link → [hop 2 in B] → unix:SINK → sink
//
// The relay of the link runs in the calling process too, so its CPU is in
// the CPU column of the load generator. socat runs twice there: with the
// host's default congestion control, and with cubic on both its TCP sockets
// (socat-cubic), what most distributions default to.
//
// The helper processes of the go-tls-relay and quic-go-naive baselines are
// the migtun binary itself ("migtun bench --internal-relay …"), which calls
// ServeRelay.
package bench
