package proxy

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/migtun/migtun/tunnel"
)

// State is where a migration session is in its life.
type State string

// Session states. A session starts prepared, becomes active with its first
// stream, and ends finished, aborted or expired.
const (
	StatePrepared  State = "prepared"
	StateActive    State = "active"
	StateFinishing State = "finishing"
	StateFinished  State = "finished"
	StateAborted   State = "aborted"
	StateExpired   State = "expired"
)

func (s State) ended() bool {
	return s == StateFinished || s == StateAborted || s == StateExpired
}

// Role says which end of a migration this host is for a session.
type Role string

// Roles.
const (
	RoleSource      Role = "source"
	RoleDestination Role = "destination"
)

// MigrationProgress is what "migtun migrate" reports of the migration a
// session carries, for the metrics of the source host.
type MigrationProgress struct {
	// RAMTransferred and RAMRemaining are QEMU's RAM counts in bytes.
	RAMTransferred int64 `json:"ram_transferred"`
	RAMRemaining   int64 `json:"ram_remaining"`
	// DirtyPagesRate is QEMU's dirty-page rate, pages per second.
	DirtyPagesRate int64 `json:"dirty_pages_rate"`
	// Disks is the progress of each disk's mirror.
	Disks []DiskMirror `json:"disks,omitempty"`
}

// DiskMirror is the progress of one disk's mirror, in bytes.
type DiskMirror struct {
	Node  string `json:"node"`
	Done  int64  `json:"done"`
	Total int64  `json:"total"`
}

// SessionInfo describes a session, as the control endpoint shows it.
type SessionInfo struct {
	ID      string    `json:"id"`
	Role    Role      `json:"role"`
	Peer    string    `json:"peer"`
	State   State     `json:"state"`
	Created time.Time `json:"created"`
	// Expires is when a session that has seen no stream expires.
	Expires  *time.Time    `json:"expires,omitempty"`
	Error    string        `json:"error,omitempty"`
	Channels []ChannelInfo `json:"channels"`
}

// ChannelInfo describes one channel of a session. Forward bytes go from
// the source to the destination, return bytes the other way; both hosts
// count them the same way, so their figures can be compared.
type ChannelInfo struct {
	Name string `json:"name"`
	// URI is what QEMU is given on the source ("unix:/path" or
	// "tcp:127.0.0.1:port"); LibvirtURI the same for libvirt's
	// --migrateuri/--disks-uri, or its --desturi for the libvirt channel.
	URI           string  `json:"uri,omitempty"`
	LibvirtURI    string  `json:"libvirt_uri,omitempty"`
	Streams       int64   `json:"streams"`
	ActiveStreams int64   `json:"active_streams"`
	BytesForward  int64   `json:"bytes_forward"`
	BytesReturn   int64   `json:"bytes_return"`
	RateForward   float64 `json:"rate_forward"` // bytes/s over the last second
	RateReturn    float64 `json:"rate_return"`
}

// session is one migration session on this host.
type session struct {
	id      tunnel.SessionID
	token   tunnel.Token
	role    Role
	peer    string // source: the peer's address; destination: its certificate name
	created time.Time
	expires time.Time
	order   []*sessionChannel
	byName  map[string]*sessionChannel
	// maxStreams bounds the streams the session may open.
	maxStreams int

	mu       sync.Mutex
	streams  int // opened so far
	state    State
	err      string
	relays   map[*activeRelay]struct{}
	wg       sync.WaitGroup     // relays of the session
	progress *MigrationProgress // reported by migtun migrate on the source
	timer    *time.Timer        // expiry while without streams
	timerWG  *sync.WaitGroup    // the server's count of pending expiry timers
	idle     time.Duration      // how long the session may be without streams
	expire   func()             // what the timer does
}

// armTimer starts the expiry timer; called with s.mu held.
func (s *session) armTimer(d time.Duration) {
	s.timerWG.Add(1)
	s.timer = time.AfterFunc(d, func() {
		defer s.timerWG.Done()
		s.expire()
	})
}

// stopTimer cancels the expiry timer; called with s.mu held.
func (s *session) stopTimer() {
	if s.timer != nil && s.timer.Stop() {
		s.timerWG.Done()
	}
	s.timer = nil
}

// sessionChannel is one channel of a session.
type sessionChannel struct {
	name   string
	target Endpoint   // destination: where streams go
	fwd    *forwarder // source: the local listener
	uri    string
	lvURI  string

	streams, active         atomic.Int64
	doneForward, doneReturn atomic.Int64 // bytes of relays that ended
	lastForward, lastReturn int64        // sampler state
	rateForward, rateReturn atomic.Uint64
}

func newSession(role Role, peer string, ttl time.Duration, maxStreams int) (*session, error) {
	s := &session{role: role, peer: peer, created: time.Now(), state: StatePrepared, maxStreams: maxStreams,
		byName: make(map[string]*sessionChannel), relays: make(map[*activeRelay]struct{})}
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

func (s *session) addChannel(c *sessionChannel) {
	s.order = append(s.order, c)
	s.byName[c.name] = c
}

// checkToken compares t with the session's token in constant time.
func (s *session) checkToken(t tunnel.Token) bool {
	return subtle.ConstantTimeCompare(t[:], s.token[:]) == 1
}

// reserveStream counts a new stream of the session before anything is
// connected for it; it fails when the session takes no more streams or has
// opened as many as it may.
func (s *session) reserveStream() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state != StatePrepared && s.state != StateActive {
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
	if s.state != StatePrepared && s.state != StateActive {
		return &tunnel.RefusedError{Reason: tunnel.ReasonUnknownSession, Detail: "session is " + string(s.state)}
	}

	if s.state == StatePrepared {
		s.state = StateActive
	}
	s.stopTimer()
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
	if s.state == StateActive && len(s.relays) == 0 && s.expire != nil && s.timer == nil {
		// The last stream ended without a finish: expire unless another
		// comes (or a finish) within the TTL.
		s.expires = time.Now().Add(s.idle)
		s.armTimer(s.idle)
	}
	s.mu.Unlock()
	s.wg.Done()
}

// setState moves the session to st unless it has already ended; it
// reports whether it did.
func (s *session) setState(st State, err string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state.ended() {
		return false
	}
	s.state = st
	if err != "" && s.err == "" {
		s.err = err
	}
	if st != StatePrepared {
		s.stopTimer()
	}
	return true
}

// abortRelays aborts every stream of the session at once.
func (s *session) abortRelays() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for r := range s.relays {
		r.abort()
	}
}

// drain waits up to grace for the session's relays to end by themselves,
// then aborts the rest and waits for them. It returns how many it aborted.
func (s *session) drain(grace time.Duration) int {
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }() // ends when the relays do
	select {
	case <-done:
		return 0
	case <-time.After(grace):
	}
	s.mu.Lock()
	n := len(s.relays)
	s.mu.Unlock()
	s.abortRelays()
	<-done
	return n
}

// info returns the session's description.
func (s *session) info() SessionInfo {
	s.mu.Lock()
	st, err := s.state, s.err
	s.mu.Unlock()
	in := SessionInfo{ID: s.idString(), Role: s.role, Peer: s.peer, State: st, Created: s.created, Error: err}
	s.mu.Lock()
	if s.timer != nil {
		e := s.expires
		in.Expires = &e
	}
	s.mu.Unlock()
	for _, c := range s.order {
		in.Channels = append(in.Channels, s.channelInfo(c))
	}
	return in
}

func (s *session) channelInfo(c *sessionChannel) ChannelInfo {
	s.mu.Lock()
	fwd, ret := c.doneForward.Load(), c.doneReturn.Load()
	for r := range s.relays {
		if r.ch == c {
			f, b := r.directions(r.role)
			fwd, ret = fwd+f, ret+b
		}
	}
	s.mu.Unlock()
	return ChannelInfo{
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
func compare(local, peer []ChannelInfo) []string {
	byName := map[string]ChannelInfo{}
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
