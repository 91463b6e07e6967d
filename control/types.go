package control

import "time"

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

// Ended reports whether s is a final state.
func (s State) Ended() bool {
	return s == StateFinished || s == StateAborted || s == StateExpired
}

// Role says which end of a migration a host is for a session.
type Role string

// Roles.
const (
	RoleSource      Role = "source"
	RoleDestination Role = "destination"
)

// PrepareRequest asks for a session with a peer.
type PrepareRequest struct {
	// Peer is the host:port of the peer's migtun.
	Peer string `json:"peer"`
	// Channels are the channels the migration needs, e.g. main and nbd.
	Channels []string `json:"channels"`
	// Listen is "unix" (default: sockets under the socket directory) or
	// "tcp" (127.0.0.1 on an ephemeral port).
	Listen string `json:"listen,omitempty"`
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

// Channel returns the session's channel of that name, or nil.
func (s *SessionInfo) Channel(name string) *ChannelInfo {
	for i := range s.Channels {
		if s.Channels[i].Name == name {
			return &s.Channels[i]
		}
	}
	return nil
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

// FinishReport is the outcome of finishing a session.
type FinishReport struct {
	Session SessionInfo `json:"session"`
	// Peer is the peer's view of the channels.
	Peer []ChannelInfo `json:"peer"`
	// Mismatch lists every difference between the two views; empty when
	// both hosts saw the same streams and bytes.
	Mismatch []string `json:"mismatch"`
	// Aborted counts streams still open after the grace period, aborted.
	Aborted int `json:"aborted_streams"`
}

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

// RouteInfo is a route as the control endpoint lists it.
type RouteInfo struct {
	Channel string `json:"channel"`
	// Target is "unix:PATH", "tcp:HOST:PORT" or "session".
	Target string `json:"target"`
}

// AbortRequest is the optional body of an abort.
type AbortRequest struct {
	// Reason says why, for the logs of both hosts.
	Reason string `json:"reason"`
}
