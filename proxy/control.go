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

	"github.com/migtun/migtun/control"
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
	// handleTimeout bounds the destination's handling of a request; it
	// stays below controlTimeout, so even the answer "timed out" reaches
	// the source.
	handleTimeout = controlTimeout - 5*time.Second
)

// Control operations. The VM operations (vm-prepare, vm-finish, …) are
// package migrate's; this package carries them opaquely (see VMHandler).
const (
	opPrepare = "prepare"
	opFinish  = "finish"
	opAbort   = "abort"
	// vmOpPrefix starts the name of every VM operation.
	vmOpPrefix = "vm-"
)

// peerNoticeTimeout bounds a notice to the peer whose answer does not
// matter (an abort, an expiry).
const peerNoticeTimeout = 3 * time.Second

// controlRequest is what a source asks of its peer.
type controlRequest struct {
	Op string `json:"op"`
	// Session and Token name the session (finish, abort, VM operations).
	Session string `json:"session,omitempty"`
	Token   string `json:"token,omitempty"`
	// Channels are the channels to prepare.
	Channels []string `json:"channels,omitempty"`
	// Reason says why the source aborts; Expired says the abort is the
	// source's session expiring, so the destination's ends expired too.
	Reason  string `json:"reason,omitempty"`
	Expired bool   `json:"expired,omitempty"`
	// VM is the body of a VM operation, as the VMHandler reads it.
	VM json.RawMessage `json:"vm,omitempty"`
}

// controlResponse is the peer's answer. Error and Code are set on failure.
type controlResponse struct {
	Error string       `json:"error,omitempty"`
	Code  control.Code `json:"code,omitempty"`
	// Session, Token and TTL answer prepare.
	Session string `json:"session,omitempty"`
	Token   string `json:"token,omitempty"`
	TTL     string `json:"ttl,omitempty"`
	// Channels answers finish: the peer's view of each channel.
	Channels []control.ChannelInfo `json:"channels,omitempty"`
	// VM answers a VM operation.
	VM json.RawMessage `json:"vm,omitempty"`
}

// failed returns the response of a failed request.
func failed(err error) controlResponse {
	return controlResponse{Error: err.Error(), Code: control.CodeOf(err)}
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
func readMessage(r io.Reader, v any) error { return decodeMessage(r, v, true) }

// readResponse is readMessage for a peer's answer, which may carry fields
// a newer migtun added: they are ignored, so that an error's text still
// reaches this host.
func readResponse(r io.Reader, v *controlResponse) error { return decodeMessage(r, v, false) }

func decodeMessage(r io.Reader, v any, strict bool) error {
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
	if strict {
		dec.DisallowUnknownFields()
	}
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
		return id, control.Errorf(control.CodeBadRequest, "session ID %q: want %d hex digits", s, 2*len(id))
	}
	copy(id[:], b)
	return id, nil
}

func parseToken(s string) (tunnel.Token, error) {
	var t tunnel.Token
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(t) {
		return t, control.Errorf(control.CodeBadRequest, "malformed session token")
	}
	copy(t[:], b)
	return t, nil
}

// callPeer sends one control request to the peer at addr and returns its
// response; a response with Error set is returned as a *control.Error
// with the peer's code.
func (s *Server) callPeer(ctx context.Context, addr string, req controlRequest) (*controlResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, controlTimeout)
	defer cancel()
	st, err := s.openControl(ctx, addr)
	if err != nil {
		return nil, &control.Error{Code: openCode(ctx, err), Message: fmt.Sprintf("peer %s: %v", addr, err), Peer: addr}
	}
	defer st.Close()
	stop := context.AfterFunc(ctx, func() { st.SetDeadline(time.Now()) })
	defer stop()
	exchange := func(what string, err error) error {
		code := control.CodeUnavailable
		switch {
		case s.ctx.Err() != nil:
			code = control.CodeShuttingDown
		case ctx.Err() != nil:
			code = control.CodeTimeout
		}
		return &control.Error{Code: code, Message: fmt.Sprintf("peer %s: %s %s: %v", addr, what, req.Op, err), Peer: addr}
	}
	if err := writeMessage(st, req); err != nil {
		return nil, exchange("sending", err)
	}
	var resp controlResponse
	if err := readResponse(st, &resp); err != nil {
		return nil, exchange("answer to", err)
	}
	if resp.Error != "" {
		code := resp.Code
		if code == "" {
			code = control.CodeInternal
		}
		return &resp, &control.Error{Code: code, Message: fmt.Sprintf("peer %s refused %s: %s", addr, req.Op, resp.Error), Peer: addr}
	}
	return &resp, nil
}

// openControl opens a control stream to the peer. A peer with too many of
// this host's requests in flight refuses the stream before reading
// anything, so it is opened again, with backoff, until ctx ends; the last
// refusal is returned then.
func (s *Server) openControl(ctx context.Context, addr string) (tunnel.Stream, error) {
	backoff := 20 * time.Millisecond
	for {
		st, err := s.dialer.Open(ctx, addr, tunnel.Header{Kind: tunnel.KindControl, Channel: controlChannel})
		if err == nil || tunnel.ReasonOf(err) != tunnel.ReasonLimit {
			return st, err
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, err
		case <-t.C:
		}
		backoff = min(2*backoff, time.Second)
	}
}

// openCode classifies a failure to open a control stream to the peer.
func openCode(ctx context.Context, err error) control.Code {
	var re *tunnel.RefusedError
	if errors.As(err, &re) {
		switch re.Reason {
		case tunnel.ReasonLimit:
			return control.CodeLimit
		case tunnel.ReasonShuttingDown:
			return control.CodeShuttingDown
		case tunnel.ReasonTimeout:
			return control.CodeTimeout
		}
	}
	if ctx.Err() != nil {
		return control.CodeTimeout
	}
	return control.CodeUnavailable
}

// tellPeer sends a control request whose answer does not matter, bounded
// by ctx and peerNoticeTimeout; a failure is logged.
func (s *Server) tellPeer(ctx context.Context, addr string, req controlRequest) {
	ctx, cancel := context.WithTimeout(ctx, peerNoticeTimeout)
	defer cancel()
	if _, err := s.callPeer(ctx, addr, req); err != nil {
		s.log.Warn("could not tell the peer", "op", req.Op, "session", req.Session, "err", err.Error())
	}
}
