package tunnel

import (
	"encoding/binary"
	"testing"
)

// FuzzTLSRecordBound reads an arbitrary byte stream through recordBound
// with arbitrary read sizes (and a socket that returns arbitrarily short
// reads): no read may cross the end of a TLS record header or body, every
// read must make progress, and the bound must know when it stands at the
// end of a record. The ends are computed independently from the stream.
func FuzzTLSRecordBound(f *testing.F) {
	f.Add([]byte{0x16, 3, 3, 0, 2, 'h', 'i', 0x17, 3, 3, 0, 0, 0x17, 3, 3, 0, 1, 'x', 'b', 'u', 'l', 'k'}, []byte{200, 3, 1})
	f.Add([]byte{0x16, 3, 1, 0xff, 0xff, 1, 2, 3}, []byte{0})
	f.Add([]byte{}, []byte{})
	f.Fuzz(func(t *testing.T, stream, sizes []byte) {
		// The record ends, and the header ends, of stream.
		ends := map[int]bool{}
		recEnds := map[int]bool{0: true}
		for o := 0; o+5 <= len(stream); {
			n := int(binary.BigEndian.Uint16(stream[o+3:]))
			ends[o+5] = true
			o += 5 + n
			ends[o] = true
			recEnds[o] = true
		}
		var rb recordBound
		pos := 0
		for i := 0; pos < len(stream); i++ {
			want, short := 1<<16, 0
			if len(sizes) > 0 {
				want = 1 + int(sizes[i%len(sizes)])*37
				short = int(sizes[(i+1)%len(sizes)]) % 4
			}
			b := rb.limit(make([]byte, want))
			if len(b) == 0 {
				t.Fatalf("at %d: limit allows no progress", pos)
			}
			n := min(len(b), len(stream)-pos)
			if short > 0 && n > short {
				n -= short // the socket returned less than asked
			}
			copy(b, stream[pos:pos+n])
			rb.advance(b[:n])
			for e := pos + 1; e < pos+n; e++ {
				if ends[e] {
					t.Fatalf("read of [%d, %d) crosses the record boundary at %d", pos, pos+n, e)
				}
			}
			pos += n
			if rb.atBoundary() != recEnds[pos] {
				t.Fatalf("at %d: atBoundary %v, want %v", pos, rb.atBoundary(), recEnds[pos])
			}
		}
	})
}
