package migrate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/qmp"
)

// pollInterval is how often QEMU is polled for progress.
const pollInterval = 50 * time.Millisecond

// Controller is the destination's side of a migration: it drives the VMs
// registered on this host (see registry.go) for the peers' VM operations
// (see ServeVM). It connects to a VM's QMP socket only for the time of one
// operation, so another client may use the monitor in between.
type Controller struct {
	log *slog.Logger
	reg registry

	mu       sync.Mutex
	incoming map[string]*incoming // by VM name
}

// incoming is a VM prepared for a session's incoming migration.
type incoming struct {
	session string
	cfg     VMConfig // resolved once, when prepared
	nbd     bool     // the NBD server is started
	busy    bool     // an operation is running
	// ended is set when the session ended while an operation ran: the
	// operation's release cleans the VM up and forgets it.
	ended bool
	// recovering is the postcopy pause (VMRequest.Pause) for which QEMU
	// was last asked to listen again; 0: none.
	recovering int
}

// Incoming is a VMPrepare with what the destination decides: the session
// and the local endpoints of its main and nbd channels.
type Incoming struct {
	VMPrepare
	// Session is the session's ID; Peer the certificate name of its source.
	Session, Peer string
	// Main is where the session's main streams go: QEMU's
	// migrate-incoming address.
	Main endpoint.Endpoint
	// NBD is where the session's nbd streams go: QEMU's NBD server
	// address; zero when the session has no nbd channel.
	NBD endpoint.Endpoint
}

// acquire marks vm busy for an operation of session; with prepare set, vm
// must not be prepared for another session and peer must be one it is
// bound to, else it must be prepared for this session.
func (c *Controller) acquire(vm, session, peer string, prepare bool) (*incoming, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	in := c.incoming[vm]
	if in == nil {
		cfg, err := c.reg.allow(vm, peer)
		switch {
		case err != nil:
			return nil, err
		case !prepare:
			return nil, control.Errorf(control.CodeNotPrepared, "VM %q is not prepared for this session", vm)
		}
		in = &incoming{session: session, cfg: cfg, busy: true}
		c.incoming[vm] = in
		return in, nil
	}
	switch {
	case in.session != session:
		return nil, control.Errorf(control.CodeBusy, "VM %q is busy with another migration", vm)
	case in.busy:
		return nil, control.Errorf(control.CodeBusy, "VM %q: another operation is running", vm)
	case prepare:
		return nil, control.Errorf(control.CodeBusy, "VM %q is already prepared for this session", vm)
	}
	in.busy = true
	return in, nil
}

// release ends an operation on vm. The VM is forgotten if forget is set,
// or if its session ended meanwhile; then what it still holds (its NBD
// server) is given up.
func (c *Controller) release(vm string, in *incoming, forget bool) {
	c.mu.Lock()
	in.busy = false
	ended := in.ended
	if (forget || ended) && c.incoming[vm] == in {
		delete(c.incoming, vm)
	}
	c.mu.Unlock()
	if ended && in.nbd {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c.log.Warn("session ended during an operation on its VM; giving the VM up", "vm", vm, "session", in.session)
		c.abort(ctx, vm, in)
	}
}

// dial connects to the VM's QMP socket. The error a peer sees names the
// VM, not the socket; the log has the details.
func (c *Controller) dial(ctx context.Context, vm string, cfg VMConfig) (*qmp.Client, error) {
	q, err := qmp.Dial(ctx, cfg.QMP)
	if err != nil {
		c.log.Warn("VM's QMP socket does not answer", "vm", vm, "qmp", cfg.QMP, "err", err.Error())
		return nil, control.Errorf(codeOf(err), "VM %q: its QMP socket does not answer (%s)", vm, brief(err))
	}
	return q, nil
}

// codeOf is the code of a failed QMP exchange: timeout when it ran out of
// time, vm_failed otherwise.
func codeOf(err error) control.Code {
	if errors.Is(err, context.DeadlineExceeded) {
		return control.CodeTimeout
	}
	return control.CodeVMFailed
}

// brief says what kind of failure err is, without the paths or addresses
// its text may hold.
func brief(err error) string {
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return "no answer in time"
	case errors.Is(err, context.Canceled):
		return "cancelled"
	case errors.Is(err, qmp.ErrNotQMP):
		return "not a QMP monitor"
	}
	return "cannot connect"
}

// PrepareIncoming checks the VM waits for an incoming migration and has
// every disk, sets the capabilities, exports the disks over NBD on in.NBD
// and listens on in.Main.
func (c *Controller) PrepareIncoming(ctx context.Context, vm string, in Incoming) (p *VMPrepared, err error) {
	st, err := c.acquire(vm, in.Session, in.Peer, true)
	if err != nil {
		return nil, err
	}
	defer func() { c.release(vm, st, err != nil) }()
	q, err := c.dial(ctx, vm, st.cfg)
	if err != nil {
		return nil, err
	}
	defer q.Close()
	fail := func(what string, err error) error {
		return control.Errorf(control.CodeVMFailed, "VM %q: %s: %w", vm, what, err)
	}

	status, err := q.QueryStatus(ctx)
	if err != nil {
		return nil, fail("query-status", err)
	}
	if status.Status != "inmigrate" {
		return nil, control.Errorf(control.CodeBusy, "VM %q is not waiting for an incoming migration: its state is %q (start its QEMU with -incoming defer)", vm, status.Status)
	}
	if err := checkDisks(ctx, q, in.Disks); err != nil {
		return nil, fail("checking the target disks", err)
	}
	offered, err := q.QueryMigrateCapabilities(ctx)
	if err != nil {
		return nil, fail("query-migrate-capabilities", err)
	}
	caps, err := capabilitySet(offered, in.Capabilities, "destination QEMU "+q.Version().String())
	if err != nil {
		return nil, control.Errorf(control.CodeBadRequest, "%w", err)
	}
	if err := q.MigrateSetCapabilities(ctx, caps); err != nil {
		return nil, fail("migrate-set-capabilities", err)
	}
	if in.MultifdChannels > 0 {
		params := map[string]any{"multifd-channels": in.MultifdChannels}
		if in.MultifdCompression != "" {
			params["multifd-compression"] = in.MultifdCompression
		}
		if err := q.MigrateSetParameters(ctx, params); err != nil {
			return nil, fail("migrate-set-parameters", err)
		}
	}
	p = &VMPrepared{QEMU: q.Version().String(), Capabilities: slices.Sorted(maps.Keys(offered))}
	if len(in.Disks) > 0 {
		if err := nbdServerStart(ctx, q, in.NBD); err != nil {
			return nil, fail("nbd-server-start", err)
		}
		st.nbd = true
		defer func() {
			if err != nil {
				stopNBD(q, vm, c.log)
				st.nbd = false
			}
		}()
		for _, d := range in.Disks {
			if err := q.NBDServerAdd(ctx, d.Node, true); err != nil {
				return nil, fail("nbd-server-add "+d.Node, err)
			}
			p.Exports = append(p.Exports, d.Node)
		}
	}
	uri, err := endpointURI(in.Main)
	if err != nil {
		return nil, fail("the main channel's route", err)
	}
	if err := q.MigrateIncoming(ctx, uri); err != nil {
		return nil, fail("migrate-incoming", err)
	}
	c.log.Info("VM waits for its incoming migration", "vm", vm, "session", in.Session, "uri", uri, "exports", p.Exports)
	return p, nil
}

// FinishIncoming waits for the incoming migration to complete, stops the
// NBD server and resumes the guest if asked.
func (c *Controller) FinishIncoming(ctx context.Context, vm, session string, resume bool) (r *VMResult, err error) {
	st, err := c.acquire(vm, session, "", false)
	if err != nil {
		return nil, err
	}
	defer func() { c.release(vm, st, err == nil) }()
	q, err := c.dial(ctx, vm, st.cfg)
	if err != nil {
		return nil, err
	}
	defer q.Close()
	if _, err := q.WaitMigration(ctx, pollInterval, nil); err != nil {
		return nil, control.Errorf(codeOf(err), "VM %q: waiting for the incoming migration: %w", vm, err)
	}
	if st.nbd {
		if err := q.NBDServerStop(ctx); err != nil {
			return nil, control.Errorf(control.CodeVMFailed, "VM %q: nbd-server-stop: %w", vm, err)
		}
		st.nbd = false
	}
	r = &VMResult{}
	if resume {
		if err := q.Cont(ctx); err != nil {
			return nil, control.Errorf(control.CodeVMFailed, "VM %q: cont: %w", vm, err)
		}
		r.Resumed = true
	}
	if r.Status, err = q.Status(ctx); err != nil {
		return nil, control.Errorf(control.CodeVMFailed, "VM %q: query-status: %w", vm, err)
	}
	c.log.Info("incoming migration finished", "vm", vm, "session", session, "status", r.Status)
	return r, nil
}

// RecoverIncoming waits until the VM's incoming postcopy migration has
// paused (this host may notice a broken channel later than the source),
// then has its QEMU listen on main (the session's own main route) for the
// source's resumed channel. A request for the pause it listens for already
// is answered at once, so the source may retry one whose answer it lost.
func (c *Controller) RecoverIncoming(ctx context.Context, vm, session string, pause int, main endpoint.Endpoint) error {
	st, err := c.acquire(vm, session, "", false)
	if err != nil {
		return err
	}
	defer c.release(vm, st, false)
	uri, err := endpointURI(main)
	if err != nil {
		return control.Errorf(control.CodeBadRequest, "VM %q: the main channel's route: %w", vm, err)
	}
	q, err := c.dial(ctx, vm, st.cfg)
	if err != nil {
		return err
	}
	defer q.Close()
	status, err := waitPostcopyPaused(ctx, q)
	if err != nil {
		return control.Errorf(codeOf(err), "VM %q: %w", vm, err)
	}
	if status == qmp.MigrationPostcopyRecover {
		return nil // the source's channel is back already
	}
	if pause > 0 && st.recovering == pause {
		return nil // QEMU listens for this pause already
	}
	// Marked before asking: if the answer is lost, QEMU may listen already.
	st.recovering = pause
	if err := q.MigrateRecover(ctx, uri); err != nil {
		var qe *qmp.Error
		if errors.As(err, &qe) {
			st.recovering = 0 // QEMU refused: it does not listen
		}
		return control.Errorf(control.CodeVMFailed, "VM %q: migrate-recover: %w", vm, err)
	}
	return nil
}

// waitPostcopyPaused waits while the incoming migration is postcopy-active
// and returns postcopy-paused or postcopy-recover; a migration that is not
// in postcopy, or ended, is an error.
func waitPostcopyPaused(ctx context.Context, q *qmp.Client) (string, error) {
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		info, err := q.QueryMigrate(ctx)
		if err != nil {
			return "", err
		}
		switch info.Status {
		case qmp.MigrationPostcopyPaused, qmp.MigrationPostcopyRecover:
			return info.Status, nil
		case qmp.MigrationPostcopyActive:
			// This host has not noticed the break yet.
		default:
			return "", fmt.Errorf("its incoming migration is %q, not a paused postcopy migration", info.Status)
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("its incoming migration did not pause: %w", ctx.Err())
		case <-t.C:
		}
	}
}

// AbortIncoming gives up the session's incoming migration: the NBD server
// is stopped if the VM's QEMU is still there. (QEMU cannot take back a
// migrate-incoming; a destination whose incoming migration failed exits.)
func (c *Controller) AbortIncoming(ctx context.Context, vm, session string) error {
	st, err := c.acquire(vm, session, "", false)
	if errors.Is(err, control.ErrNotPrepared) {
		return nil // nothing to undo
	}
	if err != nil {
		return err
	}
	defer c.release(vm, st, true)
	c.abort(ctx, vm, st)
	return nil
}

// SessionEnded gives up every VM still prepared for the session. A VM
// whose operation is running is marked, and given up when it ends.
func (c *Controller) SessionEnded(session string) {
	type held struct {
		vm string
		in *incoming
	}
	var idle []held
	c.mu.Lock()
	for name, in := range c.incoming {
		switch {
		case in.session != session:
		case in.busy:
			in.ended = true
		default:
			in.busy = true
			idle = append(idle, held{name, in})
		}
	}
	c.mu.Unlock()
	for _, h := range idle {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c.log.Warn("session ended with its VM still prepared; aborting", "vm", h.vm, "session", session)
		c.abort(ctx, h.vm, h.in)
		cancel()
		c.release(h.vm, h.in, true)
	}
}

func (c *Controller) abort(ctx context.Context, vm string, st *incoming) {
	if !st.nbd {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	q, err := c.dial(ctx, vm, st.cfg)
	if err != nil {
		c.log.Info("abort: the VM's QEMU is gone", "vm", vm)
		return
	}
	defer q.Close()
	stopNBD(q, vm, c.log)
	st.nbd = false
}

func stopNBD(q *qmp.Client, vm string, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := q.NBDServerStop(ctx); err != nil {
		log.Warn("nbd-server-stop", "vm", vm, "err", err.Error())
	}
}

// blockNode is an entry of query-named-block-nodes.
type blockNode struct {
	NodeName string `json:"node-name"`
	ReadOnly bool   `json:"ro"`
	Image    struct {
		VirtualSize int64 `json:"virtual-size"`
	} `json:"image"`
}

// checkDisks verifies every disk exists as a block node of the same size.
func checkDisks(ctx context.Context, q *qmp.Client, disks []VMDisk) error {
	if len(disks) == 0 {
		return nil
	}
	var nodes []blockNode
	if err := q.Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &nodes); err != nil {
		return err
	}
	return matchDisks(nodes, disks)
}

// matchDisks is checkDisks on a query-named-block-nodes reply.
func matchDisks(nodes []blockNode, disks []VMDisk) error {
	byName := make(map[string]blockNode, len(nodes))
	for _, n := range nodes {
		byName[n.NodeName] = n
	}
	var errs []error
	for _, d := range disks {
		n, ok := byName[d.Node]
		switch {
		case !ok:
			errs = append(errs, fmt.Errorf("no block node %q", d.Node))
		case n.ReadOnly:
			errs = append(errs, fmt.Errorf("block node %q is read-only", d.Node))
		case n.Image.VirtualSize != d.Size:
			errs = append(errs, fmt.Errorf("block node %q has %d bytes, the source's has %d", d.Node, n.Image.VirtualSize, d.Size))
		}
	}
	return errors.Join(errs...)
}

// capabilitySet returns the capabilities to set: the wanted ones, which
// QEMU must offer, and the migration-shaping ones QEMU offers but that are
// not wanted, switched off.
func capabilitySet(offered, want map[string]bool, who string) (map[string]bool, error) {
	caps := map[string]bool{}
	for _, name := range []string{"multifd", "postcopy-ram", "postcopy-preempt"} {
		if _, ok := offered[name]; ok {
			caps[name] = false
		}
	}
	for name, on := range want {
		if _, ok := offered[name]; !ok {
			if !on {
				continue
			}
			return nil, fmt.Errorf("%s does not offer the migration capability %q", who, name)
		}
		caps[name] = on
	}
	return caps, nil
}

// endpointURI is QEMU's migration URI for a local endpoint.
func endpointURI(ep endpoint.Endpoint) (string, error) {
	if ep.Network != "unix" && ep.Network != "tcp" {
		return "", fmt.Errorf("endpoint %s: QEMU cannot listen there", ep)
	}
	return ep.String(), nil
}

// nbdServerStart starts the NBD server at ep, in the legacy address form
// QEMU 7.2 requires.
func nbdServerStart(ctx context.Context, q *qmp.Client, ep endpoint.Endpoint) error {
	switch ep.Network {
	case "unix":
		return q.NBDServerStartUnix(ctx, ep.Address)
	case "tcp":
		host, port, err := net.SplitHostPort(ep.Address)
		if err != nil {
			return err
		}
		if _, err := strconv.Atoi(port); err != nil {
			return fmt.Errorf("port %q", port)
		}
		return q.Execute(ctx, "nbd-server-start", map[string]any{
			"addr": map[string]any{"type": "inet", "data": map[string]any{"host": host, "port": port}},
		}, nil)
	}
	return fmt.Errorf("endpoint %s: the nbd channel must route to unix:PATH or tcp:HOST:PORT", ep)
}
