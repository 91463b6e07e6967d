//go:build !linux

package tunnel

import "syscall"

func checkCongestion(string) error { return nil }

// tcpControl is Linux only; elsewhere the kernel's defaults apply.
func (c *Config) tcpControl() func(network, address string, rc syscall.RawConn) error { return nil }
