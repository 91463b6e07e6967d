package qmp

import "errors"

// Sentinel errors. Errors returned by the Client wrap them; test with
// [errors.Is].
var (
	// ErrClosed means the Client was closed.
	ErrClosed = errors.New("client closed")
	// ErrNotQMP means the peer's greeting was not a QMP greeting.
	ErrNotQMP = errors.New("peer did not send a QMP greeting")
	// ErrMigrationFailed means QEMU reported the migration as failed.
	ErrMigrationFailed = errors.New("migration failed")
	// ErrMigrationCancelled means the migration was cancelled.
	ErrMigrationCancelled = errors.New("migration cancelled")
	// ErrJobFailed means a block job ended with an error.
	ErrJobFailed = errors.New("block job failed")
	// ErrJobGone means a block job ended (or never existed) while the caller
	// waited for it to become ready.
	ErrJobGone = errors.New("block job not found")
)

// Error is a command QEMU rejected. Class is QEMU's error class, for example
// "GenericError", "CommandNotFound" or "DeviceNotFound".
type Error struct {
	// Command is the QMP command that failed.
	Command string
	// Class is QEMU's error class.
	Class string
	// Desc is QEMU's human-readable description.
	Desc string
}

// Error formats as "qmp: <command>: <desc>".
func (e *Error) Error() string { return "qmp: " + e.Command + ": " + e.Desc }
