package tunnel

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"sync"
	"time"
)

// Plain streams are authenticated without encrypting them. Before its first
// plain stream to a peer, the dialer opens one TLS connection to the peer's
// port (mutual TLS, as for any stream) and sends a KindPlainKey header. The
// receiver answers with a fresh key ID; both sides then derive the same
// 32-byte key from the TLS session with ExportKeyingMaterial, so the key
// itself never crosses the network. Every plain stream header carries the
// key ID, a counter that is never reused, and an HMAC-SHA256 of the header
// under the key. The receiver checks the MAC and refuses a counter it has
// seen (a sliding window, as in IPsec), so a recorded header cannot be
// replayed; its accept reply carries a MAC too, proving it holds the key.

const (
	plainKeyLabel   = "EXPORTER-migtun-plain-key"
	plainKeyTTL     = time.Hour
	maxPlainKeys    = 4096
	replayWindow    = 1024
	keyIDOffset     = 64
	keyIDLen        = 8
	keyCounterStart = keyIDOffset + keyIDLen
)

// plainKeyID names a key agreed with one peer.
type plainKeyID [keyIDLen]byte

// exportPlainKey derives the key for id from an established TLS connection.
func exportPlainKey(cs tls.ConnectionState, id plainKeyID) ([32]byte, error) {
	var k [32]byte
	b, err := cs.ExportKeyingMaterial(plainKeyLabel, id[:], len(k))
	if err != nil {
		return k, err
	}
	copy(k[:], b)
	return k, nil
}

// headerMAC computes the MAC of a plain header: HMAC-SHA256 over every byte
// of the header but the MAC field itself.
func headerMAC(key [32]byte, wire []byte) [32]byte {
	m := hmac.New(sha256.New, key[:])
	m.Write(wire[:macOffset])
	m.Write(wire[fixedHeaderLen:])
	var out [32]byte
	m.Sum(out[:0])
	return out
}

// acceptMAC is the receiver's proof that it holds the key.
func acceptMAC(key [32]byte, reqMAC [32]byte) []byte {
	m := hmac.New(sha256.New, key[:])
	m.Write([]byte("migtun accept"))
	m.Write(reqMAC[:])
	return m.Sum(nil)
}

// serverKey is a key this host issued to a peer.
type serverKey struct {
	key     [32]byte
	peer    string
	lastUse time.Time
	// replay window: highest counter seen and a bitmap of the replayWindow
	// counters below it.
	highest uint64
	seen    [replayWindow / 64]uint64
	any     bool
}

// fresh reports whether counter has not been seen and records it.
func (k *serverKey) fresh(counter uint64) bool {
	if !k.any || counter > k.highest {
		shift := counter - k.highest
		if !k.any || shift >= replayWindow {
			k.seen = [replayWindow / 64]uint64{}
		} else {
			k.shiftWindow(shift)
		}
		k.highest, k.any = counter, true
		k.seen[0] |= 1
		return true
	}
	back := k.highest - counter
	if back >= replayWindow {
		return false
	}
	word, bit := back/64, back%64
	if k.seen[word]&(1<<bit) != 0 {
		return false
	}
	k.seen[word] |= 1 << bit
	return true
}

// shiftWindow moves the bitmap by n (< replayWindow) positions: bit i of the
// window means counter highest-i.
func (k *serverKey) shiftWindow(n uint64) {
	var out [replayWindow / 64]uint64
	words, bits := n/64, n%64
	for i := len(out) - 1; i >= int(words); i-- {
		v := k.seen[i-int(words)] << bits
		if bits != 0 && i-int(words)-1 >= 0 {
			v |= k.seen[i-int(words)-1] >> (64 - bits)
		}
		out[i] = v
	}
	k.seen = out
}

// serverKeys holds the keys a listener issued.
type serverKeys struct {
	mu   sync.Mutex
	keys map[plainKeyID]*serverKey
}

// issue creates a key for the peer of cs.
func (s *serverKeys) issue(cs tls.ConnectionState, peer string) (plainKeyID, error) {
	var id plainKeyID
	if _, err := rand.Read(id[:]); err != nil {
		return id, err
	}
	key, err := exportPlainKey(cs, id)
	if err != nil {
		return id, err
	}
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.keys == nil {
		s.keys = make(map[plainKeyID]*serverKey)
	}
	for kid, k := range s.keys {
		if now.Sub(k.lastUse) > plainKeyTTL {
			delete(s.keys, kid)
		}
	}
	if len(s.keys) >= maxPlainKeys {
		var oldest plainKeyID
		var when time.Time
		for kid, k := range s.keys {
			if when.IsZero() || k.lastUse.Before(when) {
				oldest, when = kid, k.lastUse
			}
		}
		delete(s.keys, oldest)
	}
	s.keys[id] = &serverKey{key: key, peer: peer, lastUse: now}
	return id, nil
}

// verify checks the MAC and counter of a plain header in wire form and
// returns the peer's name and the payload of the accept reply.
func (s *serverKeys) verify(wire []byte) (peer string, replyMAC []byte, err error) {
	id := plainKeyID(wire[keyIDOffset : keyIDOffset+keyIDLen])
	counter := binary.BigEndian.Uint64(wire[keyCounterStart:macOffset])
	got := [32]byte(wire[macOffset:fixedHeaderLen])
	s.mu.Lock()
	defer s.mu.Unlock()
	k := s.keys[id]
	if k == nil {
		return "", nil, &RefusedError{Reason: ReasonUnauthorized, Detail: "unknown plain key"}
	}
	want := headerMAC(k.key, wire)
	if !hmac.Equal(got[:], want[:]) {
		return "", nil, &RefusedError{Reason: ReasonUnauthorized, Detail: "bad header MAC"}
	}
	if !k.fresh(counter) {
		return "", nil, &RefusedError{Reason: ReasonUnauthorized, Detail: "replayed header"}
	}
	k.lastUse = time.Now()
	return k.peer, acceptMAC(k.key, got), nil
}

// clientKey is a key this host obtained from a peer.
type clientKey struct {
	id      plainKeyID
	key     [32]byte
	mu      sync.Mutex
	counter uint64
}

// sign fills the key ID, a fresh counter and the MAC into a header in wire
// form, and returns the MAC.
func (k *clientKey) sign(wire []byte) [32]byte {
	k.mu.Lock()
	k.counter++
	c := k.counter
	k.mu.Unlock()
	copy(wire[keyIDOffset:], k.id[:])
	binary.BigEndian.PutUint64(wire[keyCounterStart:macOffset], c)
	mac := headerMAC(k.key, wire)
	copy(wire[macOffset:fixedHeaderLen], mac[:])
	return mac
}
