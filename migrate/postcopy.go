package migrate

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/migtun/migtun/qmp"
)

// DefaultRecoverTimeout is how long a postcopy migration paused by a broken
// channel is tried to be recovered. It stays below the sessions' default
// time-to-live (the default --session-ttl of migtun serve), which ends a session left
// without streams.
const DefaultRecoverTimeout = 90 * time.Second

// When a postcopy migration switches from precopy to postcopy.
const (
	// PostcopyAfterFirstPass switches once the whole RAM was sent once
	// (the default).
	PostcopyAfterFirstPass = "first-pass"
	// PostcopyImmediately switches as soon as the migration runs: the
	// destination runs the guest at once and pulls every page.
	PostcopyImmediately = "immediately"
)

// ErrPostcopyFailed is wrapped by the error of a migration that failed
// after it switched to postcopy: a broken channel not recovered within
// RecoverTimeout, a timeout or a signal. The guest's state is then split
// between the hosts, so neither QEMU is resumed or cancelled; a paused one
// stays postcopy-paused and can still be recovered by hand
// (migrate-recover on the destination, migrate with resume on the source).
var ErrPostcopyFailed = errors.New("the migration failed in postcopy; neither QEMU was resumed or cancelled")

// recoverPostcopy makes one attempt to resume a postcopy migration that
// QEMU paused because its channel broke: the destination QEMU is asked
// (vm-recover) to listen again on the session's main route once it has
// paused too, then the source QEMU resumes into the session's main socket,
// and a new main stream crosses the tunnel. The session outlives the
// broken streams, so no path or token changes. A failed attempt (the path
// is still down, the destination has not noticed the break yet) is
// reported as progress and retried at the next poll, until RecoverTimeout
// has passed since the pause began.
func (r *run) recoverPostcopy(ctx context.Context) error {
	if r.pausedAt.IsZero() {
		r.pausedAt = time.Now()
		r.res.Recoveries++
	}
	err := r.tryRecover(ctx)
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if time.Since(r.pausedAt) > r.o.RecoverTimeout {
		return fmt.Errorf("%w: the migration channel broke, both QEMUs paused (postcopy-paused), and %v of retries did not bring it back: %v", ErrPostcopyFailed, r.o.RecoverTimeout, err)
	}
	r.progress(Progress{Step: StepPerform, Migration: &qmp.MigrationInfo{Status: qmp.MigrationPostcopyPaused}, Recovering: err.Error()})
	select { // the tunnel is down or the destination not paused yet
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(time.Second):
	}
	return nil
}

// tryRecover is one attempt of recoverPostcopy. It returns once the source
// QEMU has left postcopy-paused.
func (r *run) tryRecover(ctx context.Context) error {
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := r.dest.recover(cctx, r.res.Recoveries); err != nil {
		return fmt.Errorf("destination: %w", err)
	}
	if err := r.q.MigrateResume(cctx, r.uri("main")); err != nil {
		return fmt.Errorf("source QEMU: migrate resume: %w", err)
	}
	for {
		info, err := r.q.QueryMigrate(cctx)
		if err != nil {
			return err
		}
		if info.Status != qmp.MigrationPostcopyPaused {
			return nil
		}
		select {
		case <-cctx.Done():
			return errors.New("the source QEMU stayed postcopy-paused after migrate resume")
		case <-time.After(pollInterval):
		}
	}
}
