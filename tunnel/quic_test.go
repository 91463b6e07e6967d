package tunnel

import (
	"testing"
)

// BenchmarkQUICStream moves bytes one way over a loopback quic stream: the
// dialer's stream writes 1 MiB chunks, the listener's reads them. Both ends
// and both QUIC connections run in this process, so a CPU profile
// (-cpuprofile) shows quic-go's send and receive paths side by side.
func BenchmarkQUICStream(b *testing.B) {
	p := newPair(b, QUIC)
	near, far := bulkPair(b, p)
	benchOneWay(b, near, far)
}
