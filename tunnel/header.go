package tunnel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
)

// Version is the stream header version this package speaks.
const Version = 1

// ALPN is the application protocol negotiated on TLS and QUIC connections.
// It names the header version, so a peer speaking another version fails the
// handshake instead of misreading a header.
const ALPN = "migtun/1"

// magic opens every stream header.
var magic = [4]byte{'M', 'G', 'T', 'N'}

// Header layout (all integers big endian):
//
//	offset size field
//	0      4    magic "MGTN"
//	4      1    version (1)
//	5      1    kind
//	6      1    flags (must be 0)
//	7      1    channel name length n (1..MaxChannelLen)
//	8      16   session ID (all zero: no session)
//	24     32   session token
//	56     8    stream index
//	64     8    plain key ID (plain streams; zero otherwise)
//	72     8    plain key counter (plain streams; zero otherwise)
//	80     32   plain MAC (plain streams; zero otherwise)
//	112    n    channel name
//
// With flag 0x01 (a lane of a striped stream, see stripe.go) a lane
// extension follows the channel name:
//
//	0      16   group ID (the same on every lane of the stream)
//	16     1    lane number (0..count-1)
//	17     1    lane count (2..MaxStripes)
//	18     2    zero
const (
	fixedHeaderLen = 112
	// MaxChannelLen is the longest channel name a header carries.
	MaxChannelLen = 64
	laneExtLen    = 20
	// MaxHeaderLen is the hard size limit of a stream header.
	MaxHeaderLen = fixedHeaderLen + MaxChannelLen + laneExtLen
	macOffset    = 80
	flagLane     = 0x01
)

// Kind says what a stream is for.
type Kind uint8

const (
	// KindData is a stream of a channel: bytes relayed to a local endpoint.
	KindData Kind = 1
	// KindControl is a request/response exchange between peers (prepare,
	// finish, abort); its body is defined by the package that uses it.
	KindControl Kind = 2
	// KindPlainKey is sent over TLS to obtain a key for authenticating plain
	// streams; it is handled inside this package.
	KindPlainKey Kind = 3
)

func (k Kind) String() string {
	switch k {
	case KindData:
		return "data"
	case KindControl:
		return "control"
	case KindPlainKey:
		return "plain-key"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// SessionID names a migration session. The zero value means "no session".
type SessionID [16]byte

// Token is the secret a session's streams carry.
type Token [32]byte

// Header opens every stream.
type Header struct {
	Kind    Kind
	Session SessionID
	Token   Token
	// Index numbers the streams of one channel in the order they were opened.
	Index uint64
	// Channel names the kind of stream (main, nbd, libvirt, …); it is only a
	// name, looked up in the receiver's own routes.
	Channel string

	keyID [16]byte // plain streams: which key signed the header
	mac   [32]byte // plain streams: HMAC of the header under that key
	lane  laneInfo // a lane of a striped stream; zero otherwise
}

// laneInfo places a stream's connection among the lanes of a striped
// stream.
type laneInfo struct {
	group [16]byte
	index uint8
	count uint8 // 0: not striped
}

// ValidChannel reports whether name may be used as a channel name: 1 to
// MaxChannelLen bytes of lower-case letters, digits, '-', '_' and '.'.
func ValidChannel(name string) bool {
	if len(name) == 0 || len(name) > MaxChannelLen {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-', c == '_', c == '.':
		default:
			return false
		}
	}
	return true
}

// AppendBinary appends the wire form of h to b.
func (h *Header) AppendBinary(b []byte) ([]byte, error) {
	if err := h.validate(); err != nil {
		return b, err
	}
	var flags byte
	if h.lane.count > 0 {
		flags = flagLane
	}
	b = append(b, magic[:]...)
	b = append(b, Version, byte(h.Kind), flags, byte(len(h.Channel)))
	b = append(b, h.Session[:]...)
	b = append(b, h.Token[:]...)
	b = binary.BigEndian.AppendUint64(b, h.Index)
	b = append(b, h.keyID[:]...)
	b = append(b, h.mac[:]...)
	b = append(b, h.Channel...)
	if h.lane.count > 0 {
		b = append(b, h.lane.group[:]...)
		b = append(b, h.lane.index, h.lane.count, 0, 0)
	}
	return b, nil
}

func (h *Header) validate() error {
	switch h.Kind {
	case KindData, KindControl, KindPlainKey:
	default:
		return &RefusedError{Reason: ReasonUnknownKind, Detail: h.Kind.String()}
	}
	if !ValidChannel(h.Channel) {
		return &RefusedError{Reason: ReasonBadChannel, Detail: fmt.Sprintf("%q", h.Channel)}
	}
	if l := h.lane; l.count > 0 && (h.Kind != KindData || l.count < 2 || l.count > MaxStripes || l.index >= l.count) {
		return &RefusedError{Reason: ReasonMalformed, Detail: fmt.Sprintf("lane %d of %d of a %s stream", l.index, l.count, h.Kind)}
	}
	return nil
}

// ReadHeader reads and checks one header from r. It never reads more than
// MaxHeaderLen bytes, nor past the header's end. A header that is not valid
// is reported as a *RefusedError saying why.
func ReadHeader(r io.Reader) (Header, error) {
	var buf [MaxHeaderLen]byte
	h, _, err := readHeader(r, &buf)
	return h, err
}

// readHeader reads one header into buf and returns it parsed and in wire form.
func readHeader(r io.Reader, buf *[MaxHeaderLen]byte) (Header, []byte, error) {
	short := func(err error) error {
		if err == io.ErrUnexpectedEOF || err == io.EOF {
			return &RefusedError{Reason: ReasonMalformed, Detail: "short header"}
		}
		if isTimeout(err) {
			return &RefusedError{Reason: ReasonTimeout, Detail: "no complete header within the handshake timeout"}
		}
		return err
	}
	if _, err := io.ReadFull(r, buf[:fixedHeaderLen]); err != nil {
		return Header{}, nil, short(err)
	}
	if [4]byte(buf[0:4]) != magic {
		return Header{}, nil, &RefusedError{Reason: ReasonMalformed, Detail: "bad magic"}
	}
	if buf[4] != Version {
		return Header{}, nil, &RefusedError{Reason: ReasonBadVersion, Detail: fmt.Sprintf("version %d, want %d", buf[4], Version)}
	}
	if buf[6]&^flagLane != 0 {
		return Header{}, nil, &RefusedError{Reason: ReasonMalformed, Detail: "unknown flags"}
	}
	n := int(buf[7])
	if n == 0 || n > MaxChannelLen {
		return Header{}, nil, &RefusedError{Reason: ReasonBadChannel, Detail: fmt.Sprintf("channel length %d", n)}
	}
	end := fixedHeaderLen + n
	if buf[6]&flagLane != 0 {
		end += laneExtLen
	}
	if _, err := io.ReadFull(r, buf[fixedHeaderLen:end]); err != nil {
		return Header{}, nil, short(err)
	}
	wire := buf[:end]
	h, err := parseHeader(wire)
	return h, wire, err
}

// parseHeader decodes a complete header whose length has been checked.
func parseHeader(b []byte) (Header, error) {
	h := Header{
		Kind:    Kind(b[5]),
		Session: SessionID(b[8:24]),
		Token:   Token(b[24:56]),
		Index:   binary.BigEndian.Uint64(b[56:64]),
		keyID:   [16]byte(b[64:80]),
		mac:     [32]byte(b[80:112]),
		Channel: string(b[fixedHeaderLen : fixedHeaderLen+int(b[7])]),
	}
	if b[6]&flagLane != 0 {
		ext := b[fixedHeaderLen+int(b[7]):]
		if ext[18] != 0 || ext[19] != 0 {
			return Header{}, &RefusedError{Reason: ReasonMalformed, Detail: "lane extension: reserved bytes set"}
		}
		h.lane = laneInfo{group: [16]byte(ext[:16]), index: ext[16], count: ext[17]}
		if h.lane.count == 0 {
			return Header{}, &RefusedError{Reason: ReasonMalformed, Detail: "lane extension: no lanes"}
		}
	}
	if err := h.validate(); err != nil {
		return Header{}, err
	}
	return h, nil
}

// isTimeout reports whether err is a deadline that passed (a socket's or a
// QUIC stream's).
func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &ne) && ne.Timeout()
}
