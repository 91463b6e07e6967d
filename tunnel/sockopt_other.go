//go:build !linux

package tunnel

import "syscall"

func checkCongestion(string) error { return nil }

// tcpControl is Linux only; elsewhere the kernel's defaults apply.
func (c *Config) tcpControl() func(network, address string, rc syscall.RawConn) error { return nil }

// BufferWarning is Linux only: elsewhere the tunnel sets no buffers.
func BufferWarning(int) string { return "" }

// QUICBufferWarning is Linux only.
func QUICBufferWarning() string { return "" }
