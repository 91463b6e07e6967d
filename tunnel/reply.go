package tunnel

import (
	"errors"
	"fmt"
	"io"
)

// Reason says why a stream was refused. It travels in replies and labels
// metrics, so its values never change meaning.
type Reason uint8

const (
	// ReasonOK is the reason of an accepted stream.
	ReasonOK Reason = 0
	// ReasonMalformed: the header could not be parsed.
	ReasonMalformed Reason = 1
	// ReasonBadVersion: the header has a version this side does not speak.
	ReasonBadVersion Reason = 2
	// ReasonUnknownKind: the header's kind is not known.
	ReasonUnknownKind Reason = 3
	// ReasonBadChannel: the channel name is not valid.
	ReasonBadChannel Reason = 4
	// ReasonNoRoute: the receiver has no route for the channel.
	ReasonNoRoute Reason = 5
	// ReasonUnauthorized: the stream failed authentication (plain MAC, replay,
	// unknown key, or a session token that does not match).
	ReasonUnauthorized Reason = 6
	// ReasonUnknownSession: no such session, or it has ended or expired.
	ReasonUnknownSession Reason = 7
	// ReasonDialFailed: the receiver could not connect its local endpoint.
	ReasonDialFailed Reason = 8
	// ReasonPlainDisabled: a plain stream reached a port that does not allow
	// plaintext.
	ReasonPlainDisabled Reason = 9
	// ReasonTimeout: the header did not arrive within the handshake deadline.
	ReasonTimeout Reason = 10
	// ReasonLimit: a limit (sessions, streams) was reached.
	ReasonLimit Reason = 11
	// ReasonShuttingDown: the receiver is stopping.
	ReasonShuttingDown Reason = 12
	// ReasonInternal: the receiver failed for a reason of its own.
	ReasonInternal Reason = 13
	// ReasonHandshake: the TLS or QUIC handshake failed.
	ReasonHandshake Reason = 14
)

var reasonNames = [...]string{
	ReasonOK:             "ok",
	ReasonMalformed:      "malformed",
	ReasonBadVersion:     "bad_version",
	ReasonUnknownKind:    "unknown_kind",
	ReasonBadChannel:     "bad_channel",
	ReasonNoRoute:        "no_route",
	ReasonUnauthorized:   "unauthorized",
	ReasonUnknownSession: "unknown_session",
	ReasonDialFailed:     "dial_failed",
	ReasonPlainDisabled:  "plain_disabled",
	ReasonTimeout:        "timeout",
	ReasonLimit:          "limit",
	ReasonShuttingDown:   "shutting_down",
	ReasonInternal:       "internal",
	ReasonHandshake:      "handshake",
}

// String returns the reason's stable snake_case name, used as a metric label.
func (r Reason) String() string {
	if int(r) < len(reasonNames) {
		return reasonNames[r]
	}
	return fmt.Sprintf("reason_%d", uint8(r))
}

// RefusedError is a stream refused by the receiver (or, on the receiving
// side, the reason a stream is being refused).
type RefusedError struct {
	Reason Reason
	Detail string
}

func (e *RefusedError) Error() string {
	if e.Detail == "" {
		return "stream refused: " + e.Reason.String()
	}
	return "stream refused: " + e.Reason.String() + ": " + e.Detail
}

// Is makes errors.Is(err, &RefusedError{Reason: r}) match on the reason.
func (e *RefusedError) Is(target error) bool {
	t, ok := target.(*RefusedError)
	return ok && t.Reason == e.Reason
}

// ReasonOf returns the reason carried by err, or ReasonInternal when err is
// not a *RefusedError.
func ReasonOf(err error) Reason {
	var re *RefusedError
	if errors.As(err, &re) {
		return re.Reason
	}
	return ReasonInternal
}

// Reply layout: version (1), reason (1), payload length n (1), payload (n).
// For a refusal the payload is a human-readable detail; for an accepted plain
// stream it is the receiver's MAC; for a plain-key exchange, the key ID.
const (
	replyFixedLen = 3
	// MaxReplyLen is the hard size limit of a reply.
	MaxReplyLen = replyFixedLen + 255
)

type reply struct {
	reason  Reason
	payload []byte
}

func (r reply) appendBinary(b []byte) []byte {
	p := r.payload
	if len(p) > 255 {
		p = p[:255]
	}
	b = append(b, Version, byte(r.reason), byte(len(p)))
	return append(b, p...)
}

// readReply reads one reply from r, never past its end.
func readReply(r io.Reader) (reply, error) {
	var buf [MaxReplyLen]byte
	if _, err := io.ReadFull(r, buf[:replyFixedLen]); err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return reply{}, fmt.Errorf("reading reply: %w", io.ErrUnexpectedEOF)
		}
		return reply{}, fmt.Errorf("reading reply: %w", err)
	}
	if buf[0] != Version {
		return reply{}, fmt.Errorf("reading reply: version %d, want %d", buf[0], Version)
	}
	n := int(buf[2])
	if _, err := io.ReadFull(r, buf[replyFixedLen:replyFixedLen+n]); err != nil {
		return reply{}, fmt.Errorf("reading reply: %w", io.ErrUnexpectedEOF)
	}
	return reply{reason: Reason(buf[1]), payload: append([]byte(nil), buf[replyFixedLen:replyFixedLen+n]...)}, nil
}

// err turns a refusal into a *RefusedError and an acceptance into nil.
func (r reply) err() error {
	if r.reason == ReasonOK {
		return nil
	}
	detail := make([]rune, 0, len(r.payload))
	for _, c := range string(r.payload) {
		if c < 0x20 || c == 0x7f {
			c = '?'
		}
		detail = append(detail, c)
	}
	return &RefusedError{Reason: r.reason, Detail: string(detail)}
}
