package migrate

import (
	"bytes"
	"context"
	"encoding/json"
	"slices"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/proxy"
)

// The VM operations: what the source asks of the destination's VM through
// the session, and their wire types. The source sends them with
// control.Client.VM to its own migtun, which carries them to the peer; the
// peer's migtun hands them to its Controller (ServeVM) with the session
// they belong to. A peer only names a VM registered on the destination.
const (
	// opPrepare makes the VM wait for the session's incoming migration.
	opPrepare = "prepare"
	// opFinish waits for the migration to complete, and resumes the guest
	// if asked.
	opFinish = "finish"
	// opRecover makes the VM, whose postcopy migration paused when its
	// channel broke, listen again for the source's resumed channel.
	opRecover = "recover"
	// opAbort gives the incoming migration up.
	opAbort = "abort"
)

// VMRequest is the body of every VM operation.
type VMRequest struct {
	// VM is a VM name registered on the destination.
	VM string `json:"vm"`
	// Prepare is what to prepare (prepare).
	Prepare *VMPrepare `json:"prepare,omitempty"`
	// Resume resumes the destination guest (finish).
	Resume bool `json:"resume,omitempty"`
	// Pause numbers the postcopy pause being recovered, from 1 (recover):
	// a request for a pause the destination listens for already is
	// answered without asking QEMU again, so the source may retry one
	// whose answer it lost.
	Pause int `json:"pause,omitempty"`
	// Reason says why (abort).
	Reason string `json:"reason,omitempty"`
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
	// MultifdCompression is multifd's compression (with "multifd"): one
	// of MultifdCompressions; empty keeps the destination QEMU's.
	MultifdCompression string `json:"multifd_compression,omitempty"`
}

// check refuses parameters no QEMU takes, before any reaches QEMU.
func (p VMPrepare) check() error {
	if p.MultifdChannels < 0 || p.MultifdChannels > 255 {
		return control.Errorf(control.CodeBadRequest, "multifd channels %d: want 0 to 255", p.MultifdChannels)
	}
	if p.MultifdCompression != "" && !slices.Contains(MultifdCompressions, p.MultifdCompression) {
		return control.Errorf(control.CodeBadRequest, "multifd compression %q: want one of %v", p.MultifdCompression, MultifdCompressions)
	}
	return nil
}

// VMPrepared answers prepare.
type VMPrepared struct {
	// QEMU is the destination QEMU's version.
	QEMU string `json:"qemu"`
	// Capabilities are the migration capabilities the destination QEMU
	// offers.
	Capabilities []string `json:"capabilities"`
	// Exports are the disks exported over NBD.
	Exports []string `json:"exports,omitempty"`
}

// VMResult answers finish.
type VMResult struct {
	// Status is the destination VM's run state at the end.
	Status string `json:"status"`
	// Resumed is true if the guest was resumed.
	Resumed bool `json:"resumed"`
}

// destVM sends the VM operations of one session to the destination's VM.
type destVM struct {
	ctl     *control.Client
	session string
	vm      string
}

func (d destVM) prepare(ctx context.Context, p VMPrepare) (*VMPrepared, error) {
	var out VMPrepared
	return &out, d.ctl.VM(ctx, d.session, opPrepare, VMRequest{VM: d.vm, Prepare: &p}, &out)
}

func (d destVM) finish(ctx context.Context, resume bool) (*VMResult, error) {
	var out VMResult
	return &out, d.ctl.VM(ctx, d.session, opFinish, VMRequest{VM: d.vm, Resume: resume}, &out)
}

func (d destVM) recover(ctx context.Context, pause int) error {
	return d.ctl.VM(ctx, d.session, opRecover, VMRequest{VM: d.vm, Pause: pause}, nil)
}

func (d destVM) abort(ctx context.Context, reason string) error {
	return d.ctl.VM(ctx, d.session, opAbort, VMRequest{VM: d.vm, Reason: reason}, nil)
}

var _ proxy.VMRegistry = (*Controller)(nil)

// ServeVM serves a VM operation a peer sent for one of its sessions; it
// implements proxy.VMHandler.
func (c *Controller) ServeVM(ctx context.Context, op string, sess proxy.VMSession, body json.RawMessage) (any, error) {
	var req VMRequest
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return nil, control.Errorf(control.CodeBadRequest, "VM %s request: %v", op, err)
	}
	if req.VM == "" {
		return nil, control.Errorf(control.CodeBadRequest, "no VM named")
	}
	if _, err := c.reg.allow(req.VM, sess.Peer); err != nil {
		return nil, err
	}
	switch op {
	case opPrepare:
		in := Incoming{Session: sess.ID, Peer: sess.Peer, Main: sess.Targets["main"], NBD: sess.Targets["nbd"]}
		if req.Prepare != nil {
			in.VMPrepare = *req.Prepare
		}
		if err := in.VMPrepare.check(); err != nil {
			return nil, err
		}
		if in.Main.IsZero() {
			return nil, control.Errorf(control.CodeBadRequest, "the session has no main channel")
		}
		if in.NBD.IsZero() && len(in.Disks) > 0 {
			return nil, control.Errorf(control.CodeBadRequest, "disks to copy but the session has no nbd channel")
		}
		// A shared route would let another session's streams reach this
		// VM's migration socket or NBD export.
		if !sess.Own["main"] || len(in.Disks) > 0 && !sess.Own["nbd"] {
			return nil, control.Errorf(control.CodeForbidden, "VM %q takes migrations only on its session's own sockets: this host must route main and nbd to session", req.VM)
		}
		return c.PrepareIncoming(ctx, req.VM, in)
	case opFinish:
		return c.FinishIncoming(ctx, req.VM, sess.ID, req.Resume)
	case opRecover:
		main := sess.Targets["main"]
		if main.IsZero() || !sess.Own["main"] {
			return nil, control.Errorf(control.CodeBadRequest, "the session has no main channel of its own")
		}
		return nil, c.RecoverIncoming(ctx, req.VM, sess.ID, req.Pause, main)
	case opAbort:
		c.log.Warn("VM migration aborted by the source", "session", sess.ID, "vm", req.VM, "reason", req.Reason)
		return nil, c.AbortIncoming(ctx, req.VM, sess.ID)
	}
	return nil, control.Errorf(control.CodeBadRequest, "unknown VM operation %q", op)
}
