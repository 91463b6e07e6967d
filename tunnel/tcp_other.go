//go:build !linux

package tunnel

import (
	"net"
	"time"
)

// setUserTimeout is Linux only; elsewhere keepalive alone bounds a dead peer.
func setUserTimeout(*net.TCPConn, time.Duration) error { return nil }
