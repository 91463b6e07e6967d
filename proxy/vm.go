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

// VMRegistry is a VMHandler whose VMs are registered at run time through
// the control endpoint (GET, PUT and DELETE /v1/vms/…). The VMs' QMP
// sockets come from this host's operator only, never from a peer.
type VMRegistry interface {
	VMHandler
	// VMs lists the registered VMs.
	VMs() []control.VMInfo
	// RegisterVM registers or replaces a VM.
	RegisterVM(info control.VMInfo) error
	// RemoveVM forgets a VM registered at run time; a VM being migrated
	// into is refused (code busy).
	RemoveVM(name string) error
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
	// Own says, by channel name, that the target is the session's own
	// socket (a CHANNEL=session route), which no other session reaches.
	Own map[string]bool
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
		s.log.Error("socket directory", "err", err.Error())
		return failed(control.Errorf(control.CodeInternal, "the destination's socket directory is not usable (its log says why)"))
	}
	vs := VMSession{ID: sess.idString(), Peer: sess.peer, Targets: map[string]endpoint.Endpoint{}, Own: map[string]bool{}}
	for _, c := range sess.order {
		vs.Targets[c.name], vs.Own[c.name] = c.target, c.own
	}
	// The operation ends with the session too.
	ctx, cancel := sess.within(ctx)
	defer cancel()
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

// registry returns the VM handler as a VMRegistry, or an error saying this
// host registers no VMs at run time.
func (s *Server) registry() (VMRegistry, error) {
	if r, ok := s.cfg.VMs.(VMRegistry); ok {
		return r, nil
	}
	return nil, control.Errorf(control.CodeNotFound, "this host drives no VM")
}

func (s *Server) handleListVMs(w http.ResponseWriter, r *http.Request) {
	reg, err := s.registry()
	if err != nil {
		writeJSON(w, http.StatusOK, []control.VMInfo{})
		return
	}
	writeJSON(w, http.StatusOK, reg.VMs())
}

func (s *Server) handlePutVM(w http.ResponseWriter, r *http.Request) {
	var info control.VMInfo
	if !readJSON(w, r, &info) {
		return
	}
	if info.Name == "" {
		info.Name = r.PathValue("name")
	}
	if info.Name != r.PathValue("name") {
		writeError(w, control.Errorf(control.CodeBadRequest, "the body names VM %q, the path %q", info.Name, r.PathValue("name")))
		return
	}
	reg, err := s.registry()
	if err == nil {
		err = reg.RegisterVM(info)
	}
	if err != nil {
		writeError(w, err)
		return
	}
	s.log.Info("VM registered", "vm", info.Name, "qmp", info.QMP, "peers", info.Peers)
	writeJSON(w, http.StatusOK, info)
}

func (s *Server) handleDeleteVM(w http.ResponseWriter, r *http.Request) {
	reg, err := s.registry()
	if err == nil {
		err = reg.RemoveVM(r.PathValue("name"))
	}
	if err != nil {
		writeError(w, err)
		return
	}
	s.log.Info("VM removed", "vm", r.PathValue("name"))
	w.WriteHeader(http.StatusNoContent)
}
