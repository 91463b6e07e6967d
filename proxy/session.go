package proxy

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/endpoint"
	"github.com/migtun/migtun/tunnel"
)

// session is one migration session on this host. It owns its life: its
// state machine (prepared → active → finishing → finished, or aborted or
// expired from any open state), its streams, its listeners (on the source)
// and its expiry, which watchExpiry runs. The server only creates it,
// registers it, and releases it once end has returned.
//
//	prepared ──first stream──▶ active ──finish──▶ finishing ──▶ finished
//	    │                       │  ▲                  │
//	    │ TTL without a stream  │  │ a stream again   │ peer failed
//	    ▼                       ▼  │                  ▼
//	 expired ◀──TTL, no stream── (idle)            aborted ◀── abort, shutdown
type session struct {
	id      tunnel.SessionID
	token   tunnel.Token
	role    control.Role
	peer    string // source: the peer's address; destination: its certificate name
	created time.Time
	ttl     time.Duration // how long the session may be without streams
	order   []*sessionChannel
	byName  map[string]*sessionChannel
	// maxStreams bounds the streams the session may open.
	maxStreams int

	// idle is signalled (without blocking) when the session may have
	// become idle: prepared, or active without streams. done is closed when
	// the session ends.
	idle chan struct{}
	done chan struct{}
	// ctx is cancelled when the session ends: what is being opened or
	// connected for it gives up.
	ctx    context.Context
	cancel context.CancelFunc

	mu       sync.Mutex
	streams  int // opened so far
	state    control.State
	err      string
	expires  time.Time // when an idle session expires; zero while it has streams
	relays   map[*activeRelay]struct{}
	wg       sync.WaitGroup             // relays of the session
	progress *control.MigrationProgress // reported by migtun migrate on the source
	// expiredHere is set by expireIfDue until the end it started claims it.
	expiredHere bool
}

// sessionChannel is one channel of a session.
type sessionChannel struct {
	name   string
	target endpoint.Endpoint // destination: where streams go
	own    bool              // destination: target is the session's own socket
	fwd    *forwarder        // source: the local listener
	uri    string
	lvURI  string

	streams, active         atomic.Int64
	doneForward, doneReturn atomic.Int64 // bytes of relays that ended
	lastForward, lastReturn int64        // sampler state
	rateForward, rateReturn atomic.Uint64
}

// newSession returns a prepared session with a fresh ID and token.
func newSession(role control.Role, peer string, ttl time.Duration, maxStreams int) (*session, error) {
	s := &session{role: role, peer: peer, created: time.Now(), ttl: ttl, state: control.StatePrepared, maxStreams: maxStreams,
		byName: make(map[string]*sessionChannel), relays: make(map[*activeRelay]struct{}),
		idle: make(chan struct{}, 1), done: make(chan struct{})}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.expires = s.created.Add(ttl)
	if _, err := rand.Read(s.id[:]); err != nil {
		return nil, err
	}
	if _, err := rand.Read(s.token[:]); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *session) idString() string { return hex.EncodeToString(s.id[:]) }

func (s *session) tokenString() string { return hex.EncodeToString(s.token[:]) }

func (s *session) addChannel(c *sessionChannel) {
	s.order = append(s.order, c)
	s.byName[c.name] = c
}

// within returns a context that ends when parent or the session does,
// and its cancel.
func (s *session) within(parent context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(parent)
	stop := context.AfterFunc(s.ctx, cancel)
	return ctx, func() { stop(); cancel() }
}

// checkToken compares t with the session's token in constant time.
func (s *session) checkToken(t tunnel.Token) bool {
	return subtle.ConstantTimeCompare(t[:], s.token[:]) == 1
}

// watchExpiry ends the session through expire once it has been idle —
// prepared without a stream, or active with every stream ended and no
// finish — for its TTL. It returns when the session ends. The server runs
// it, one goroutine per session, and waits for it.
func (s *session) watchExpiry(expire func(reason string)) {
	t := time.NewTimer(s.ttl)
	defer t.Stop()
	for {
		s.mu.Lock()
		deadline := s.expires
		s.mu.Unlock()
		if !deadline.IsZero() {
			t.Reset(time.Until(deadline))
		} else {
			t.Stop()
		}
		select {
		case <-s.done:
			return
		case <-s.idle:
		case <-t.C:
			// Decided and done under one lock: a stream that arrives now
			// either counts (and there is no expiry) or finds it ended.
			if s.expireIfDue() {
				expire(fmt.Sprintf("no stream for %v", s.ttl))
				return
			}
		}
	}
}

// expireIfDue moves the session to expired if its expiry has come, in one
// step with the check; it reports whether it did. The caller then releases
// what the session holds (see Server.endSession).
func (s *session) expireIfDue() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state.Ended() || s.expires.IsZero() || time.Now().Before(s.expires) {
		return false
	}
	s.state, s.err = control.StateExpired, fmt.Sprintf("no stream for %v", s.ttl)
	s.expires = time.Time{}
	s.expiredHere = true
	close(s.done)
	s.cancel()
	return true
}

// startFinish moves an open session to finishing; a second finish, or one
// of an ended session, is refused.
func (s *session) startFinish() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.state == control.StateFinishing:
		return control.Errorf(control.CodeBusy, "session %s is being finished already", s.idString())
	case s.state.Ended():
		return control.Errorf(control.CodeNotFound, "session %s has ended already", s.idString())
	}
	s.state, s.expires = control.StateFinishing, time.Time{}
	return nil
}

// reserveStream counts a new stream of the session before anything is
// connected for it; it fails when the session takes no more streams or has
// opened as many as it may.
func (s *session) reserveStream() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state != control.StatePrepared && s.state != control.StateActive {
		return &tunnel.RefusedError{Reason: tunnel.ReasonUnknownSession, Detail: "the session is " + string(s.state)}
	}
	if s.streams >= s.maxStreams {
		return &tunnel.RefusedError{Reason: tunnel.ReasonLimit, Detail: fmt.Sprintf("the session has opened all of its %d streams", s.maxStreams)}
	}
	s.streams++
	return nil
}

// addRelay attaches a relay to the session; it fails once the session no
// longer takes streams. The first stream makes a prepared session active.
func (s *session) addRelay(r *activeRelay) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state != control.StatePrepared && s.state != control.StateActive {
		return &tunnel.RefusedError{Reason: tunnel.ReasonUnknownSession, Detail: "session is " + string(s.state)}
	}
	s.state = control.StateActive
	s.expires = time.Time{}
	s.relays[r] = struct{}{}
	s.wg.Add(1)
	r.ch.streams.Add(1)
	r.ch.active.Add(1)
	return nil
}

// removeRelay detaches an ended relay and keeps its byte counts.
func (s *session) removeRelay(r *activeRelay) {
	fwd, ret := r.directions(r.role)
	// Under the lock, with the delete, so that channelInfo counts the
	// relay's bytes exactly once.
	s.mu.Lock()
	r.ch.doneForward.Add(fwd)
	r.ch.doneReturn.Add(ret)
	r.ch.active.Add(-1)
	delete(s.relays, r)
	if s.state == control.StateActive && len(s.relays) == 0 {
		// The last stream ended without a finish: expire unless another
		// comes (or a finish) within the TTL.
		s.expires = time.Now().Add(s.ttl)
		s.poke()
	}
	s.mu.Unlock()
	s.wg.Done()
}

// poke tells watchExpiry that the expiry changed.
func (s *session) poke() {
	select {
	case s.idle <- struct{}{}:
	default:
	}
}

// setState moves the session to st unless it has already ended; it
// reports whether it did. A final state closes done.
func (s *session) setState(st control.State, err string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state.Ended() {
		return false
	}
	s.state = st
	if err != "" && s.err == "" {
		s.err = err
	}
	s.expires = time.Time{}
	if st.Ended() {
		close(s.done)
		s.cancel()
	}
	return true
}

// end moves the session to its final state st, closes its listeners
// (removing their socket files), aborts its streams and waits for them. It
// reports false if the session had ended already.
func (s *session) end(st control.State, reason string) bool {
	if !s.setState(st, reason) && !s.claimExpiry(st) {
		return false
	}
	s.closeListeners()
	s.abortRelays()
	s.wg.Wait()
	return true
}

// claimExpiry reports, once, whether an end in state expired follows the
// session's own expireIfDue, whose state change is already made.
func (s *session) claimExpiry(st control.State) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st != control.StateExpired || !s.expiredHere {
		return false
	}
	s.expiredHere = false
	return true
}

// closeListeners closes the source's local listeners of the session.
func (s *session) closeListeners() {
	for _, c := range s.order {
		if c.fwd != nil {
			c.fwd.ln.Close() // removes the socket file
		}
	}
}

// abortRelays aborts every stream of the session at once.
func (s *session) abortRelays() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for r := range s.relays {
		r.abort()
	}
}

// drain waits up to grace (and while ctx lasts) for the session's relays
// to end by themselves, then aborts the rest and waits for them. It returns
// how many it aborted.
func (s *session) drain(ctx context.Context, grace time.Duration) int {
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }() // ends when the relays do, below at the latest
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-done:
		return 0
	case <-t.C:
	case <-ctx.Done():
	}
	s.mu.Lock()
	n := len(s.relays)
	s.mu.Unlock()
	s.abortRelays()
	<-done
	return n
}

// info returns the session's description.
func (s *session) info() control.SessionInfo {
	s.mu.Lock()
	in := control.SessionInfo{ID: s.idString(), Role: s.role, Peer: s.peer, State: s.state, Created: s.created, Error: s.err}
	if !s.expires.IsZero() {
		e := s.expires
		in.Expires = &e
	}
	s.mu.Unlock()
	for _, c := range s.order {
		in.Channels = append(in.Channels, s.channelInfo(c))
	}
	return in
}

func (s *session) channelInfo(c *sessionChannel) control.ChannelInfo {
	s.mu.Lock()
	fwd, ret := c.doneForward.Load(), c.doneReturn.Load()
	for r := range s.relays {
		if r.ch == c {
			f, b := r.directions(r.role)
			fwd, ret = fwd+f, ret+b
		}
	}
	s.mu.Unlock()
	return control.ChannelInfo{
		Name: c.name, URI: c.uri, LibvirtURI: c.lvURI,
		Streams: c.streams.Load(), ActiveStreams: c.active.Load(),
		BytesForward: fwd, BytesReturn: ret,
		RateForward: math.Float64frombits(c.rateForward.Load()), RateReturn: math.Float64frombits(c.rateReturn.Load()),
	}
}

// sample updates each channel's rates from the bytes moved since the last
// sample, dt ago.
func (s *session) sample(dt time.Duration) {
	for _, c := range s.order {
		ci := s.channelInfo(c)
		c.rateForward.Store(math.Float64bits(float64(ci.BytesForward-c.lastForward) / dt.Seconds()))
		c.rateReturn.Store(math.Float64bits(float64(ci.BytesReturn-c.lastReturn) / dt.Seconds()))
		c.lastForward, c.lastReturn = ci.BytesForward, ci.BytesReturn
	}
}

// compare returns a description of each difference between this host's
// view of the channels and the peer's.
func compare(local, peer []control.ChannelInfo) []string {
	byName := map[string]control.ChannelInfo{}
	for _, c := range peer {
		byName[c.Name] = c
	}
	var diffs []string
	for _, l := range local {
		p, ok := byName[l.Name]
		if !ok {
			diffs = append(diffs, fmt.Sprintf("channel %q: the peer does not report it", l.Name))
			continue
		}
		if l.Streams != p.Streams {
			diffs = append(diffs, fmt.Sprintf("channel %q: %d streams here, %d at the peer", l.Name, l.Streams, p.Streams))
		}
		if l.BytesForward != p.BytesForward {
			diffs = append(diffs, fmt.Sprintf("channel %q: %d bytes forward here, %d at the peer", l.Name, l.BytesForward, p.BytesForward))
		}
		if l.BytesReturn != p.BytesReturn {
			diffs = append(diffs, fmt.Sprintf("channel %q: %d bytes return here, %d at the peer", l.Name, l.BytesReturn, p.BytesReturn))
		}
	}
	return diffs
}
