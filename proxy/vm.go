package proxy

import (
	"context"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"time"
)

// VMs a destination drives: a peer that prepared a session may ask the
// destination to make one of its registered VMs wait for the session's
// incoming migration (vm-prepare), to finish it (vm-finish), to listen
// again after a broken postcopy channel (vm-recover) or to give it up
// (vm-abort). The peer only names a VM; the VM's QMP socket is registered on
// this host (serve --qmp NAME=unix:PATH) and the sockets its QEMU listens on
// are the session's own routes of the main and nbd channels, so no path
// ever comes from the wire.

// VMController drives the VMs registered on a destination. The proxy
// package knows nothing of QMP; package migrate implements it.
type VMController interface {
	// PrepareIncoming makes vm wait for the incoming migration of a
	// session: its QEMU listens on in.Main, exports the disks on in.NBD.
	PrepareIncoming(ctx context.Context, vm string, in VMIncoming) (*VMPrepared, error)
	// FinishIncoming waits for the session's incoming migration to
	// complete, stops the NBD server, and resumes the guest if asked.
	FinishIncoming(ctx context.Context, vm, session string, resume bool) (*VMResult, error)
	// RecoverIncoming makes vm, whose postcopy migration of the session
	// paused when its channel broke, listen on main again for the source's
	// resumed migration channel.
	RecoverIncoming(ctx context.Context, vm, session string, main Endpoint) error
	// AbortIncoming gives up the session's incoming migration and leaves
	// the VM clean, best effort.
	AbortIncoming(ctx context.Context, vm, session string) error
	// SessionEnded tells the controller that a destination session ended;
	// a VM still prepared for it is aborted.
	SessionEnded(session string)
}

// VMDisk is a disk the source will mirror: the destination must have a
// block node of this name and size.
type VMDisk struct {
	Node string `json:"node"`
	Size int64  `json:"size"`
}

// VMPrepare is what the source asks of the destination's VM.
type VMPrepare struct {
	// Disks are the disks to export writable over NBD.
	Disks []VMDisk `json:"disks,omitempty"`
	// Capabilities are the migration capabilities both sides set, e.g.
	// {"multifd": true, "postcopy-ram": true}.
	Capabilities map[string]bool `json:"capabilities,omitempty"`
	// MultifdChannels is multifd's channel count (with "multifd").
	MultifdChannels int `json:"multifd_channels,omitempty"`
}

// VMIncoming is a VMPrepare with what this host decides: the session and
// the local endpoints of its main and nbd channels.
type VMIncoming struct {
	VMPrepare
	Session string
	// Main is where the session's main streams go: QEMU's migrate-incoming
	// address.
	Main Endpoint
	// NBD is where the session's nbd streams go: QEMU's NBD server
	// address; zero when the session has no nbd channel.
	NBD Endpoint
}

// VMPrepared answers vm-prepare.
type VMPrepared struct {
	// QEMU is the destination QEMU's version.
	QEMU string `json:"qemu"`
	// Capabilities are the migration capabilities the destination QEMU
	// offers.
	Capabilities []string `json:"capabilities"`
	// Exports are the disks exported over NBD.
	Exports []string `json:"exports,omitempty"`
}

// VMResult answers vm-finish.
type VMResult struct {
	// Status is the destination VM's run state at the end.
	Status string `json:"status"`
	// Resumed is true if the guest was resumed.
	Resumed bool `json:"resumed"`
}

// VMRequest is the body of the local control endpoint's vm-prepare,
// vm-finish, vm-recover and vm-abort calls.
type VMRequest struct {
	// VM is a VM name registered on the peer.
	VM string `json:"vm"`
	// Prepare is what to prepare (vm-prepare).
	Prepare *VMPrepare `json:"prepare,omitempty"`
	// Resume resumes the destination guest (vm-finish).
	Resume bool `json:"resume,omitempty"`
	// Reason says why (vm-abort).
	Reason string `json:"reason,omitempty"`
}

// Peer control operations on VMs.
const (
	opVMPrepare = "vm-prepare"
	opVMFinish  = "vm-finish"
	opVMAbort   = "vm-abort"
	opVMRecover = "vm-recover"
)

// vmControlTimeout bounds a VM operation at the destination; it stays
// below controlTimeout so the answer reaches the source.
const vmControlTimeout = controlTimeout - 5*time.Second

// handleVM serves a vm-* request of the peer that prepared sess.
func (s *Server) handleVM(sess *session, req controlRequest) controlResponse {
	if s.cfg.VMs == nil {
		return controlResponse{Error: "this host drives no VM (register one with serve --qmp NAME=unix:PATH)"}
	}
	if req.VM == "" {
		return controlResponse{Error: "no VM named"}
	}
	ctx, cancel := context.WithTimeout(s.ctx, vmControlTimeout)
	defer cancel()
	id := sess.idString()
	switch req.Op {
	case opVMPrepare:
		in := VMIncoming{Session: id}
		if req.Prepare != nil {
			in.VMPrepare = *req.Prepare
		}
		main := sess.byName["main"]
		if main == nil {
			return controlResponse{Error: "the session has no main channel"}
		}
		in.Main = main.target
		if nbd := sess.byName["nbd"]; nbd != nil {
			in.NBD = nbd.target
		} else if len(in.Disks) > 0 {
			return controlResponse{Error: "disks to copy but the session has no nbd channel"}
		}
		// QEMU creates the session's sockets in this host's socket directory.
		if err := os.MkdirAll(s.cfg.SocketDir, 0o700); err != nil {
			return controlResponse{Error: "socket directory: " + err.Error()}
		}
		p, err := s.cfg.VMs.PrepareIncoming(ctx, req.VM, in)
		if err != nil {
			return controlResponse{Error: err.Error()}
		}
		s.log.Info("VM prepared for an incoming migration", "session", id, "vm", req.VM, "disks", len(in.Disks))
		return controlResponse{Prepared: p}
	case opVMFinish:
		r, err := s.cfg.VMs.FinishIncoming(ctx, req.VM, id, req.Resume)
		if err != nil {
			return controlResponse{Error: err.Error()}
		}
		s.log.Info("VM migration finished", "session", id, "vm", req.VM, "status", r.Status)
		return controlResponse{Result: r}
	case opVMRecover:
		main := sess.byName["main"]
		if main == nil {
			return controlResponse{Error: "the session has no main channel"}
		}
		if err := s.cfg.VMs.RecoverIncoming(ctx, req.VM, id, main.target); err != nil {
			return controlResponse{Error: err.Error()}
		}
		s.log.Warn("VM listens again for its paused postcopy migration", "session", id, "vm", req.VM, "target", main.target.String())
		return controlResponse{}
	default: // opVMAbort
		if err := s.cfg.VMs.AbortIncoming(ctx, req.VM, id); err != nil {
			return controlResponse{Error: err.Error()}
		}
		s.log.Warn("VM migration aborted", "session", id, "vm", req.VM, "reason", req.Reason)
		return controlResponse{}
	}
}

// vmSessionEnded releases what a destination session's VM held: the
// controller gives up a VM still prepared for it, and the session's own
// sockets (CHANNEL=session routes), which QEMU created, are removed.
func (s *Server) vmSessionEnded(sess *session) {
	if sess.role != RoleDestination {
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

// VMCall sends a vm-prepare, vm-finish, vm-recover or vm-abort request for
// a source session to its peer. op is "prepare", "finish", "recover" or
// "abort".
func (s *Server) VMCall(ctx context.Context, id, op string, req VMRequest) (*VMPrepared, *VMResult, error) {
	sess, err := s.openSession(id)
	if err != nil {
		return nil, nil, err
	}
	if sess.role != RoleSource {
		return nil, nil, fmt.Errorf("%w: VM operations are asked of the source host; this host is the session's destination", ErrBadRequest)
	}
	if req.VM == "" {
		return nil, nil, fmt.Errorf("%w: no VM named", ErrBadRequest)
	}
	creq := controlRequest{Session: id, Token: hex.EncodeToString(sess.token[:]), VM: req.VM}
	switch op {
	case "prepare":
		creq.Op, creq.Prepare = opVMPrepare, req.Prepare
	case "finish":
		creq.Op, creq.Resume = opVMFinish, req.Resume
	case "recover":
		creq.Op = opVMRecover
	case "abort":
		creq.Op, creq.Reason = opVMAbort, req.Reason
	default:
		return nil, nil, fmt.Errorf("%w: unknown VM operation %q", ErrBadRequest, op)
	}
	resp, err := s.callPeer(ctx, sess.peer, creq)
	if err != nil {
		return nil, nil, err
	}
	return resp.Prepared, resp.Result, nil
}

// vmHandlers adds the VM operations to the control endpoint:
//
//	POST /v1/sessions/{id}/vm-prepare  {"vm":…,"prepare":{…}} → VMPrepared
//	POST /v1/sessions/{id}/vm-finish   {"vm":…,"resume":true} → VMResult
//	POST /v1/sessions/{id}/vm-recover  {"vm":…}               → {}
//	POST /v1/sessions/{id}/vm-abort    {"vm":…,"reason":…}    → {}
func (s *Server) vmHandlers(mux *http.ServeMux) {
	for _, op := range []string{"prepare", "finish", "recover", "abort"} {
		mux.HandleFunc("POST /v1/sessions/{id}/vm-"+op, func(w http.ResponseWriter, r *http.Request) {
			var req VMRequest
			if !readJSON(w, r, &req) {
				return
			}
			p, res, err := s.VMCall(r.Context(), r.PathValue("id"), op, req)
			switch {
			case err != nil:
				writeError(w, err)
			case p != nil:
				writeJSON(w, http.StatusOK, p)
			case res != nil:
				writeJSON(w, http.StatusOK, res)
			default:
				writeJSON(w, http.StatusOK, struct{}{})
			}
		})
	}
}
