package proxy

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/migtun/migtun/tunnel"
)

// Peer control messages travel on KindControl streams of the tunnel port:
// the opener sends one request, the receiver one response, each a JSON
// object behind a 4-byte big-endian length, at most maxControlBody bytes.

const (
	// controlChannel is the channel name of control streams.
	controlChannel = "control"
	// maxControlBody is the hard size limit of one control message.
	maxControlBody = 64 << 10
	// controlTimeout bounds one control exchange.
	controlTimeout = 30 * time.Second
)

// Control operations.
const (
	opPrepare = "prepare"
	opFinish  = "finish"
	opAbort   = "abort"
)

// controlRequest is what a source asks of its peer.
type controlRequest struct {
	Op string `json:"op"`
	// Session and Token name the session (finish, abort).
	Session string `json:"session,omitempty"`
	Token   string `json:"token,omitempty"`
	// Channels are the channels to prepare.
	Channels []string `json:"channels,omitempty"`
	// Reason says why the source aborts; Expired says the abort is the
	// source's session expiring, so the destination's ends expired too.
	Reason  string `json:"reason,omitempty"`
	Expired bool   `json:"expired,omitempty"`
	// VM names a VM registered on the destination (vm-prepare, vm-finish,
	// vm-recover, vm-abort); Prepare is what vm-prepare asks, Resume what
	// vm-finish does.
	VM      string     `json:"vm,omitempty"`
	Prepare *VMPrepare `json:"prepare,omitempty"`
	Resume  bool       `json:"resume,omitempty"`
}

// controlResponse is the peer's answer. Error is set on failure.
type controlResponse struct {
	Error string `json:"error,omitempty"`
	// Session, Token and TTL answer prepare.
	Session string `json:"session,omitempty"`
	Token   string `json:"token,omitempty"`
	TTL     string `json:"ttl,omitempty"`
	// Channels answers finish: the peer's view of each channel.
	Channels []ChannelInfo `json:"channels,omitempty"`
	// Prepared answers vm-prepare, Result vm-finish.
	Prepared *VMPrepared `json:"prepared,omitempty"`
	Result   *VMResult   `json:"result,omitempty"`
}

// writeMessage writes v as one length-prefixed JSON message.
func writeMessage(w io.Writer, v any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if len(body) > maxControlBody {
		return fmt.Errorf("control message of %d bytes exceeds the limit of %d", len(body), maxControlBody)
	}
	buf := binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(body)), uint32(len(body)))
	_, err = w.Write(append(buf, body...))
	return err
}

// errBadControl marks control input that could not be decoded.
var errBadControl = errors.New("bad control message")

// readMessage reads one length-prefixed JSON message into v, refusing
// anything over maxControlBody, unknown fields and trailing data.
func readMessage(r io.Reader, v any) error {
	var n [4]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		return fmt.Errorf("%w: reading length: %v", errBadControl, err)
	}
	size := binary.BigEndian.Uint32(n[:])
	if size > maxControlBody {
		return fmt.Errorf("%w: %d bytes exceeds the limit of %d", errBadControl, size, maxControlBody)
	}
	body := make([]byte, size)
	if _, err := io.ReadFull(r, body); err != nil {
		return fmt.Errorf("%w: reading body: %v", errBadControl, err)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: %v", errBadControl, err)
	}
	if dec.More() {
		return fmt.Errorf("%w: trailing data", errBadControl)
	}
	return nil
}

// parseSessionID reads a session ID in hex.
func parseSessionID(s string) (tunnel.SessionID, error) {
	var id tunnel.SessionID
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(id) {
		return id, fmt.Errorf("session ID %q: want %d hex digits", s, 2*len(id))
	}
	copy(id[:], b)
	return id, nil
}

func parseToken(s string) (tunnel.Token, error) {
	var t tunnel.Token
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(t) {
		return t, errors.New("malformed session token")
	}
	copy(t[:], b)
	return t, nil
}

// callPeer sends one control request to the peer at addr and returns its
// response; a response with Error set is returned as an error.
func (s *Server) callPeer(ctx context.Context, addr string, req controlRequest) (*controlResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, controlTimeout)
	defer cancel()
	st, err := s.dialer.Open(ctx, addr, tunnel.Header{Kind: tunnel.KindControl, Channel: controlChannel})
	if err != nil {
		return nil, fmt.Errorf("peer %s: %w", addr, err)
	}
	defer st.Close()
	stop := context.AfterFunc(ctx, func() { st.SetDeadline(time.Now()) })
	defer stop()
	if err := writeMessage(st, req); err != nil {
		return nil, fmt.Errorf("peer %s: sending %s: %w", addr, req.Op, err)
	}
	var resp controlResponse
	if err := readMessage(st, &resp); err != nil {
		return nil, fmt.Errorf("peer %s: answer to %s: %w", addr, req.Op, err)
	}
	if resp.Error != "" {
		return &resp, fmt.Errorf("peer %s refused %s: %s", addr, req.Op, resp.Error)
	}
	return &resp, nil
}

// serveControl answers one control stream from a peer.
func (s *Server) serveControl(in *tunnel.Incoming) {
	st, err := in.Accept()
	if err != nil {
		return
	}
	defer st.Close()
	st.SetDeadline(time.Now().Add(controlTimeout))
	log := s.log.With("peer", in.Peer)
	var req controlRequest
	var resp controlResponse
	if err := readMessage(st, &req); err != nil {
		s.metrics.refused(tunnel.ReasonMalformed)
		log.Warn("control request refused", "err", err.Error())
		resp.Error = err.Error()
	} else {
		resp = s.sessions.handlePeer(s, in.Peer, req)
		if resp.Error != "" {
			log.Warn("control request failed", "op", req.Op, "session", req.Session, "err", resp.Error)
		}
	}
	if err := writeMessage(st, resp); err == nil {
		st.CloseWrite()
	}
}
