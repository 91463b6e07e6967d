package control

import (
	"context"
	"errors"
	"fmt"
	"net/http"
)

// Code is a stable error code of the control API and of the peer control
// protocol. Its values never change meaning; programs branch on them, never
// on an error's text.
type Code string

// Error codes.
const (
	// CodeBadRequest: the request is malformed or cannot be served as asked.
	CodeBadRequest Code = "bad_request"
	// CodeNotFound: no such session, route or VM (or it has ended).
	CodeNotFound Code = "not_found"
	// CodeUnauthorized: the request lacks the control endpoint's token.
	CodeUnauthorized Code = "unauthorized"
	// CodeForbidden: the peer may not do this (a VM bound to other peers).
	CodeForbidden Code = "forbidden"
	// CodeUnsupported: a request body that is not JSON.
	CodeUnsupported Code = "unsupported_media_type"
	// CodeLimit: a limit was reached (sessions, requests in flight).
	CodeLimit Code = "limit"
	// CodeBusy: the VM is busy with another migration or operation.
	CodeBusy Code = "busy"
	// CodeNotPrepared: the VM is not prepared for this session.
	CodeNotPrepared Code = "not_prepared"
	// CodeTimeout: the operation did not end within its time.
	CodeTimeout Code = "timeout"
	// CodeShuttingDown: the host is stopping.
	CodeShuttingDown Code = "shutting_down"
	// CodeUnavailable: the peer could not be reached or did not answer.
	CodeUnavailable Code = "unavailable"
	// CodeVMFailed: QEMU failed the operation; the text is QEMU's.
	CodeVMFailed Code = "vm_failed"
	// CodeInternal: anything else.
	CodeInternal Code = "internal"
)

// Status returns the HTTP status the control endpoint answers with.
func (c Code) Status() int {
	switch c {
	case CodeBadRequest:
		return http.StatusBadRequest
	case CodeNotFound:
		return http.StatusNotFound
	case CodeUnauthorized:
		return http.StatusUnauthorized
	case CodeForbidden:
		return http.StatusForbidden
	case CodeUnsupported:
		return http.StatusUnsupportedMediaType
	case CodeLimit:
		return http.StatusTooManyRequests
	case CodeBusy, CodeNotPrepared:
		return http.StatusConflict
	case CodeTimeout:
		return http.StatusGatewayTimeout
	case CodeShuttingDown:
		return http.StatusServiceUnavailable
	case CodeUnavailable, CodeVMFailed:
		return http.StatusBadGateway
	}
	return http.StatusInternalServerError
}

// Error is an error with a Code. Errors from the peer carry its address in
// Peer.
type Error struct {
	Code    Code   `json:"code"`
	Message string `json:"error"`
	// Peer is the peer that answered with the error, if it came from one.
	Peer string `json:"peer,omitempty"`

	cause error // what Errorf's %w wrapped
}

func (e *Error) Error() string { return e.Message }

// Unwrap returns what Errorf's format wrapped with %w, if anything: the
// formatted error, whose chain holds every error wrapped.
func (e *Error) Unwrap() error { return e.cause }

// Is reports whether target is an *Error with the same code, so that
// errors.Is(err, control.ErrNotFound) holds at any depth of wrapping.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code
}

// Errorf returns an *Error with code and a message formatted as by
// fmt.Errorf; an error given with %w stays reachable by errors.Is and As.
func Errorf(code Code, format string, args ...any) error {
	err := fmt.Errorf(format, args...)
	if errors.Unwrap(err) == nil && !wrapsMany(err) {
		return &Error{Code: code, Message: err.Error()}
	}
	return &Error{Code: code, Message: err.Error(), cause: err}
}

// CodeOf returns the code of the first *Error in err's chain, CodeTimeout
// for a context deadline, and CodeInternal otherwise.
func CodeOf(err error) Code {
	var e *Error
	switch {
	case errors.As(err, &e):
		return e.Code
	case errors.Is(err, context.DeadlineExceeded):
		return CodeTimeout
	}
	return CodeInternal
}

// Sentinels to compare with errors.Is.
var (
	ErrBadRequest   = &Error{Code: CodeBadRequest}
	ErrNotFound     = &Error{Code: CodeNotFound}
	ErrUnauthorized = &Error{Code: CodeUnauthorized}
	ErrForbidden    = &Error{Code: CodeForbidden}
	ErrLimit        = &Error{Code: CodeLimit}
	ErrBusy         = &Error{Code: CodeBusy}
	ErrNotPrepared  = &Error{Code: CodeNotPrepared}
	ErrTimeout      = &Error{Code: CodeTimeout}
	ErrShuttingDown = &Error{Code: CodeShuttingDown}
	ErrUnavailable  = &Error{Code: CodeUnavailable}
	ErrVMFailed     = &Error{Code: CodeVMFailed}
)

// wrapsMany reports whether err wraps several errors (%w more than once).
func wrapsMany(err error) bool {
	u, ok := err.(interface{ Unwrap() []error })
	return ok && len(u.Unwrap()) > 0
}
