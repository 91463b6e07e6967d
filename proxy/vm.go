package proxy

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"strings"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/endpoint"
)

// VM operations: a peer that prepared a session may ask the destination to
// drive one of the VMs registered on it (make it wait for the session's
// incoming migration, finish it, recover it, give it up). Package migrate
// owns those operations and their types; this package only carries them:
// on the source from the control endpoint (POST /v1/sessions/{id}/vm-OP)
// to the peer, and on the destination from the control stream to the
// VMHandler, with the session the peer proved it holds. The peer only names
// a VM and passes JSON; the sockets the VM's QEMU listens on are the
// session's own routes, so no path ever comes from the wire.

// VMHandler serves the VM operations of destination sessions.
type VMHandler interface {
	// ServeVM serves the VM operation op ("prepare", "finish", …) that
	// the peer of sess sent with body, and returns the answer to send
	// back (nil: none). Errors carry a control.Code.
	ServeVM(ctx context.Context, op string, sess VMSession, body json.RawMessage) (any, error)
	// SessionEnded tells the handler that a destination session ended, so
	// a VM still held for it is given up.
	SessionEnded(session string)
}

// VMSession is what a VMHandler learns of the session an operation belongs
// to.
type VMSession struct {
	// ID is the session's ID in hex.
	ID string
	// Peer is the name on the peer's certificate.
	Peer string
	// Targets are the local endpoints the session's channels deliver to,
	// by channel name (main: QEMU's migrate-incoming address, nbd: its NBD
	// server's).
	Targets map[string]endpoint.Endpoint
}

// handleVM serves a VM operation of the peer that prepared sess.
func (s *Server) handleVM(ctx context.Context, sess *session, req controlRequest) controlResponse {
	op := strings.TrimPrefix(req.Op, vmOpPrefix)
	if !validVMOp(op) {
		return failed(control.Errorf(control.CodeBadRequest, "unknown control operation %q", req.Op))
	}
	if s.cfg.VMs == nil {
		return failed(control.Errorf(control.CodeNotFound, "this host drives no VM (register one with serve --qmp NAME=unix:PATH)"))
	}
	// QEMU creates the session's sockets in this host's socket directory.
	if err := s.ensureSocketDir(); err != nil {
		return failed(err)
	}
	vs := VMSession{ID: sess.idString(), Peer: sess.peer, Targets: map[string]endpoint.Endpoint{}}
	for _, c := range sess.order {
		vs.Targets[c.name] = c.target
	}
	out, err := s.cfg.VMs.ServeVM(ctx, op, vs, req.VM)
	if err != nil {
		return failed(err)
	}
	if out == nil {
		return controlResponse{}
	}
	b, err := json.Marshal(out)
	if err != nil {
		return failed(err)
	}
	return controlResponse{VM: b}
}

// vmSessionEnded releases what a destination session's VM held: the
// handler gives up a VM still prepared for it, and the session's own
// sockets (CHANNEL=session routes), which QEMU created, are removed.
func (s *Server) vmSessionEnded(sess *session) {
	if sess.role != control.RoleDestination {
		return
	}
	if s.cfg.VMs != nil {
		s.cfg.VMs.SessionEnded(sess.idString())
	}
	for _, c := range sess.order {
		if c.target.Network == "unix" && c.target.Address == s.sessionSocketPath(sess, c.name) {
			os.Remove(c.target.Address)
		}
	}
}

// VMCall sends a VM operation of a source session to its peer and returns
// the peer's answer.
func (s *Server) VMCall(ctx context.Context, id, op string, body json.RawMessage) (json.RawMessage, error) {
	sess, err := s.openSession(id)
	if err != nil {
		return nil, err
	}
	if sess.role != control.RoleSource {
		return nil, control.Errorf(control.CodeBadRequest, "VM operations are asked of the source host; this host is the session's destination")
	}
	resp, err := s.callPeer(ctx, sess.peer, controlRequest{Op: vmOpPrefix + op, Session: id, Token: sess.tokenString(), VM: body})
	if err != nil {
		return nil, err
	}
	return resp.VM, nil
}

// maxVMOp is the longest VM operation name the endpoint takes.
const maxVMOp = 16

// handleVMCall serves POST /v1/sessions/{id}/vm-OP: the body goes to the
// peer as it is, and its answer comes back as it is.
func (s *Server) handleVMCall(w http.ResponseWriter, r *http.Request) {
	op, ok := strings.CutPrefix(r.PathValue("action"), vmOpPrefix)
	if !ok || !validVMOp(op) {
		writeError(w, control.Errorf(control.CodeNotFound, "no session operation %q", r.PathValue("action")))
		return
	}
	var body json.RawMessage
	if !readJSON(w, r, &body) {
		return
	}
	out, err := s.VMCall(r.Context(), r.PathValue("id"), op, body)
	if err != nil {
		writeError(w, err)
		return
	}
	if len(out) == 0 {
		out = json.RawMessage("{}")
	}
	writeJSON(w, http.StatusOK, out)
}

// validVMOp checks an operation name: 1 to maxVMOp lowercase letters.
func validVMOp(op string) bool {
	if op == "" || len(op) > maxVMOp {
		return false
	}
	for _, c := range op {
		if c < 'a' || c > 'z' {
			return false
		}
	}
	return true
}
