package control_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"testing"

	"github.com/migtun/migtun/control"
)

// TestErrors: an Errorf error matches its code's sentinel at any depth of
// wrapping, keeps what it wrapped reachable (one %w or several), and
// CodeOf finds its code, or timeout for a context deadline.
func TestErrors(t *testing.T) {
	err := control.Errorf(control.CodeBusy, "VM %q: %w", "web1", io.EOF)
	wrapped := fmt.Errorf("prepare: %w", err)
	if !errors.Is(wrapped, control.ErrBusy) || errors.Is(wrapped, control.ErrNotFound) {
		t.Errorf("errors.Is by code: busy %v, not_found %v", errors.Is(wrapped, control.ErrBusy), errors.Is(wrapped, control.ErrNotFound))
	}
	if !errors.Is(wrapped, io.EOF) || control.CodeOf(wrapped) != control.CodeBusy {
		t.Errorf("the cause or the code is lost: %v, %s", errors.Is(wrapped, io.EOF), control.CodeOf(wrapped))
	}
	two := control.Errorf(control.CodeVMFailed, "%w and %w", io.EOF, context.Canceled)
	if !errors.Is(two, io.EOF) || !errors.Is(two, context.Canceled) {
		t.Errorf("two wrapped errors: %v", two)
	}
	if control.CodeOf(fmt.Errorf("x: %w", context.DeadlineExceeded)) != control.CodeTimeout || control.CodeOf(io.EOF) != control.CodeInternal {
		t.Error("CodeOf of plain errors")
	}
	for code, status := range map[control.Code]int{control.CodeNotFound: 404, control.CodeLimit: 429, control.CodeBusy: 409,
		control.CodeUnauthorized: 401, control.CodeShuttingDown: 503, control.CodeTimeout: 504, "nonsense": 500} {
		if code.Status() != status {
			t.Errorf("%s: status %d, want %d (%s)", code, code.Status(), status, http.StatusText(status))
		}
	}
}
