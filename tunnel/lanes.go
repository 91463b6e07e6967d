package tunnel

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"sync"
	"time"
)

// errLaneTransport refuses a lane that came over plain or QUIC: striping
// needs the authenticated records of tls with the bulk record layer.
var errLaneTransport = &RefusedError{Reason: ReasonMalformed, Detail: "striped streams travel over tls only"}

// laneKey names a striped stream on the listening side: lanes of one peer
// with one group ID.
type laneKey struct {
	peer  string
	group [16]byte
}

// laneGroup gathers the lanes of one striped stream until all have come.
type laneGroup struct {
	key   laneKey
	first Header // the header of the lane that came first, lane fields aside
	lanes []*tlsStream
	have  int
	done  chan struct{} // closed when every lane came, or the wait ended
	full  bool
	stop  func() bool // stops the expiry
}

// laneGroups are the striped streams whose lanes are still coming. Their
// lanes hold no handshake slot while they wait, so they have budgets of
// their own: groups in all, groups of one peer, and lanes held.
type laneGroups struct {
	mu      sync.Mutex
	groups  map[laneKey]*laneGroup
	perPeer map[string]int
	held    int // lanes in groups still gathering
	max     int // groups in all
	peerMax int // groups of one peer
	heldMax int // lanes held
}

// newLaneGroups sizes the budgets from the handshake limit: a host takes
// as many gathering groups as connections in their handshake, half of
// them from one peer, and four lanes held for each.
func newLaneGroups(handshakes int) laneGroups {
	return laneGroups{groups: map[laneKey]*laneGroup{}, perPeer: map[string]int{},
		max: handshakes, peerMax: max(1, handshakes/2), heldMax: 4 * handshakes}
}

// joinLane adds the lane s with header h to its group. The first lane
// (number 0) gives back its handshake slot (release), waits for the
// others, for up to the handshake timeout, and becomes the group's
// Incoming; the others are held by the group and return (nil, nil).
func (l *Listener) joinLane(h Header, peer string, s *tlsStream, bulk bool, release func()) (*Incoming, error) {
	if !bulk {
		err := &RefusedError{Reason: ReasonMalformed, Detail: "striped streams need the bulk record layer"}
		refuse(s, err)
		return nil, err
	}
	g, err := l.lanes.join(h, peer, s, l.cfg.HandshakeTimeout)
	if err != nil {
		refuse(s, err)
		return nil, err
	}
	if h.lane.index != 0 {
		return nil, nil // held by the group; lane 0 answers for it
	}
	release()
	select {
	case <-g.done:
	case <-l.ctx.Done():
		l.lanes.expire(g)
	}
	l.lanes.mu.Lock()
	full := g.full
	have := g.have
	l.lanes.mu.Unlock()
	if !full {
		err := &RefusedError{Reason: ReasonTimeout, Detail: fmt.Sprintf("%d of %d lanes came within the handshake timeout", have, len(g.lanes))}
		refuse(s, err)
		return nil, err
	}
	h.lane = laneInfo{}
	return &Incoming{Header: h, Peer: peer, Transport: TLS, s: s, bulk: true, lanes: g.lanes}, nil
}

// join adds lane s to the group its header names, making the group if it
// is the first lane to come; a group whose lanes do not all come within
// wait is dropped and its lanes closed.
func (gs *laneGroups) join(h Header, peer string, s *tlsStream, wait time.Duration) (*laneGroup, error) {
	key := laneKey{peer: peer, group: h.lane.group}
	gs.mu.Lock()
	defer gs.mu.Unlock()
	if gs.held >= gs.heldMax {
		return nil, &RefusedError{Reason: ReasonLimit, Detail: "too many lanes of striped streams waiting for the others"}
	}
	g := gs.groups[key]
	if g == nil {
		if len(gs.groups) >= gs.max || gs.perPeer[peer] >= gs.peerMax {
			return nil, &RefusedError{Reason: ReasonLimit, Detail: "too many striped streams gathering their lanes"}
		}
		g = &laneGroup{key: key, first: h, lanes: make([]*tlsStream, h.lane.count), done: make(chan struct{})}
		g.first.lane = laneInfo{}
		t := time.AfterFunc(wait, func() { gs.expire(g) })
		g.stop = t.Stop
		gs.groups[key] = g
		gs.perPeer[peer]++
	}
	want := g.first
	got := h
	got.lane = laneInfo{}
	switch {
	case int(h.lane.count) != len(g.lanes):
		return nil, &RefusedError{Reason: ReasonMalformed, Detail: fmt.Sprintf("lane of %d, its group has %d", h.lane.count, len(g.lanes))}
	case got != want:
		return nil, &RefusedError{Reason: ReasonMalformed, Detail: "lane of another stream than its group's"}
	case g.lanes[h.lane.index] != nil:
		return nil, &RefusedError{Reason: ReasonMalformed, Detail: fmt.Sprintf("lane %d came twice", h.lane.index)}
	}
	g.lanes[h.lane.index] = s
	g.have++
	gs.held++
	if g.have == len(g.lanes) {
		g.full = true
		g.stop()
		gs.remove(g)
		close(g.done)
	}
	return g, nil
}

// remove takes g and its lanes off the budgets; gs.mu is held.
func (gs *laneGroups) remove(g *laneGroup) {
	delete(gs.groups, g.key)
	gs.held -= g.have
	if gs.perPeer[g.key.peer]--; gs.perPeer[g.key.peer] <= 0 {
		delete(gs.perPeer, g.key.peer)
	}
}

// expire drops g unless all its lanes came, closing every lane but the
// first, whose goroutine refuses it.
func (gs *laneGroups) expire(g *laneGroup) {
	gs.mu.Lock()
	if g.full || gs.groups[g.key] != g {
		gs.mu.Unlock()
		return
	}
	gs.remove(g)
	g.stop()
	close(g.done)
	held := append([]*tlsStream(nil), g.lanes[1:]...)
	gs.mu.Unlock()
	for i, s := range held {
		if s != nil {
			refuse(s, &RefusedError{Reason: ReasonTimeout, Detail: fmt.Sprintf("lane %d: not every lane came within the handshake timeout", i+1)})
		}
	}
}

// count is the number of groups gathering.
func (gs *laneGroups) count() int {
	gs.mu.Lock()
	defer gs.mu.Unlock()
	return len(gs.groups)
}

// closeAll closes the lanes of every group still gathering (listener
// shutdown).
func (gs *laneGroups) closeAll() {
	gs.mu.Lock()
	groups := make([]*laneGroup, 0, len(gs.groups))
	for _, g := range gs.groups {
		groups = append(groups, g)
	}
	gs.mu.Unlock()
	for _, g := range groups {
		gs.expire(g)
	}
}

// acceptLanes accepts every lane of a striped stream: each switches to the
// bulk record layer and gets the accept reply.
func (in *Incoming) acceptLanes() (Stream, error) {
	lanes := make([]Stream, 0, len(in.lanes))
	fail := func(err error) (Stream, error) {
		for _, l := range in.lanes {
			l.Abort()
		}
		return nil, fmt.Errorf("accepting striped stream: %w", err)
	}
	for _, l := range in.lanes {
		bs, err := newBulkStream(l, false)
		if err != nil {
			return fail(err)
		}
		lanes = append(lanes, bs)
	}
	b := reply{reason: ReasonOK}.appendBinary(make([]byte, 0, MaxReplyLen))
	for _, l := range in.lanes {
		if _, err := l.Write(b); err != nil {
			return fail(err)
		}
		if err := l.SetDeadline(time.Time{}); err != nil {
			return fail(err)
		}
	}
	return newStriped(lanes), nil
}

// OpenStriped opens a data stream to the peer at addr striped over lanes
// TLS connections (see stripe.go), and waits for the peer to accept it.
// With lanes below 2, or a transport other than tls (or no bulk record
// layer), the stream is not striped. A peer
// of a release before striping refuses the stream as malformed.
func (d *Dialer) OpenStriped(ctx context.Context, addr string, h Header, lanes int) (Stream, error) {
	if lanes < 2 || d.cfg.Transport != TLS || h.Kind != KindData || d.cfg.DisableBulk {
		return d.openOne(ctx, addr, h)
	}
	if lanes > MaxStripes {
		return nil, fmt.Errorf("tunnel: %d lanes: at most %d", lanes, MaxStripes)
	}
	h.lane = laneInfo{count: uint8(lanes)}
	if _, err := rand.Read(h.lane.group[:]); err != nil {
		return nil, err
	}
	if err := d.reserveDials(ctx, addr, lanes); err != nil {
		return nil, err
	}
	streams := make([]Stream, lanes)
	errs := make([]error, lanes)
	var wg sync.WaitGroup
	for i := range lanes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lh := h
			lh.lane.index = uint8(i)
			streams[i], errs[i] = d.openLane(ctx, addr, lh)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		for _, s := range streams {
			if s != nil {
				s.Abort()
			}
		}
		if errs[0] != nil { // the first lane carries the peer's answer
			return nil, errs[0]
		}
		return nil, err
	}
	return newStriped(streams), nil
}

// openLane opens one lane, its dial reserved: a data stream over TLS that
// must have switched to the bulk record layer.
func (d *Dialer) openLane(ctx context.Context, addr string, h Header) (Stream, error) {
	wire, err := h.AppendBinary(make([]byte, 0, MaxHeaderLen))
	if err != nil {
		<-d.dialing
		return nil, err
	}
	s, err := d.openTLSReserved(ctx, addr, KindData, wire)
	if err != nil {
		return nil, err
	}
	if _, ok := s.(*bulkStream); !ok {
		s.Abort()
		return nil, fmt.Errorf("tunnel: striping to %s needs the bulk record layer, which the peer did not negotiate", addr)
	}
	return s, nil
}
