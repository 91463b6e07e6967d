package qmp

import (
	"context"
	"fmt"
	"sort"
	"time"
)

// Migration states reported in [MigrationInfo.Status] (QAPI MigrationStatus).
const (
	MigrationNone       = "none"
	MigrationSetup      = "setup"
	MigrationActive     = "active"
	MigrationDevice     = "device"
	MigrationCancelling = "cancelling"
	MigrationCancelled  = "cancelled"
	MigrationCompleted  = "completed"
	MigrationFailed     = "failed"
	// Postcopy states: the destination runs the guest and pulls the pages
	// it still lacks. A broken migration channel pauses both sides
	// (postcopy-paused) instead of failing; migrate-recover on the
	// destination and migrate with resume on the source go through
	// postcopy-recover back to postcopy-active.
	MigrationPostcopyActive  = "postcopy-active"
	MigrationPostcopyPaused  = "postcopy-paused"
	MigrationPostcopyRecover = "postcopy-recover"
)

// MigrationInfo is the reply of query-migrate. Times are in milliseconds.
type MigrationInfo struct {
	// Status is one of the Migration* states.
	Status string `json:"status"`
	// RAM holds the RAM transfer statistics; nil before the migration starts.
	RAM *RAMStats `json:"ram,omitempty"`
	// TotalTime is the time since the migration started (ms).
	TotalTime int64 `json:"total-time,omitempty"`
	// SetupTime is the time spent in the setup state (ms).
	SetupTime int64 `json:"setup-time,omitempty"`
	// Downtime is the measured downtime once completed (ms).
	Downtime int64 `json:"downtime,omitempty"`
	// ExpectedDowntime is QEMU's estimate while active (ms).
	ExpectedDowntime int64 `json:"expected-downtime,omitempty"`
	// ErrorDesc explains a failed migration.
	ErrorDesc string `json:"error-desc,omitempty"`
}

// RAMStats are the RAM statistics of query-migrate. Byte counts are bytes.
type RAMStats struct {
	// Transferred is the number of bytes sent so far, all channels included.
	Transferred int64 `json:"transferred"`
	// Remaining is the number of bytes still to send.
	Remaining int64 `json:"remaining"`
	// Total is the guest RAM size.
	Total int64 `json:"total"`
	// Duplicate counts pages sent as "all the same byte" markers.
	Duplicate int64 `json:"duplicate"`
	// Normal counts pages sent in full.
	Normal int64 `json:"normal"`
	// NormalBytes is Normal times the page size.
	NormalBytes int64 `json:"normal-bytes"`
	// DirtyPagesRate is the guest's dirtying rate in pages per second.
	DirtyPagesRate int64 `json:"dirty-pages-rate"`
	// Mbps is the measured throughput in megabits per second.
	Mbps float64 `json:"mbps"`
	// DirtySyncCount counts dirty-bitmap synchronisations (passes).
	DirtySyncCount int64 `json:"dirty-sync-count"`
	// MultifdBytes is the part of Transferred sent over multifd channels.
	MultifdBytes int64 `json:"multifd-bytes"`
	// PagesPerSecond is the current transfer rate in pages per second.
	PagesPerSecond int64 `json:"pages-per-second"`
}

// MigrateSetCapabilities sets migration capabilities, e.g. "multifd". Both
// sides need the same capabilities, and the destination must set them before
// migrate-incoming.
func (c *Client) MigrateSetCapabilities(ctx context.Context, caps map[string]bool) error {
	type capability struct {
		Capability string `json:"capability"`
		State      bool   `json:"state"`
	}
	names := make([]string, 0, len(caps))
	for k := range caps {
		names = append(names, k)
	}
	sort.Strings(names)
	list := make([]capability, 0, len(caps))
	for _, k := range names {
		list = append(list, capability{k, caps[k]})
	}
	return c.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": list}, nil)
}

// QueryMigrateCapabilities returns every migration capability and its state.
func (c *Client) QueryMigrateCapabilities(ctx context.Context) (map[string]bool, error) {
	var list []struct {
		Capability string `json:"capability"`
		State      bool   `json:"state"`
	}
	if err := c.Execute(ctx, "query-migrate-capabilities", nil, &list); err != nil {
		return nil, err
	}
	caps := make(map[string]bool, len(list))
	for _, e := range list {
		caps[e.Capability] = e.State
	}
	return caps, nil
}

// MigrateSetParameters sets migration parameters, for example
// "max-bandwidth" (bytes/s), "multifd-channels" or "downtime-limit" (ms).
func (c *Client) MigrateSetParameters(ctx context.Context, params map[string]any) error {
	return c.Execute(ctx, "migrate-set-parameters", params, nil)
}

// QueryMigrateParameters returns the current migration parameters.
func (c *Client) QueryMigrateParameters(ctx context.Context) (map[string]any, error) {
	var p map[string]any
	if err := c.Execute(ctx, "query-migrate-parameters", nil, &p); err != nil {
		return nil, err
	}
	return p, nil
}

// MigrateIncoming makes a destination started with "-incoming defer" listen
// on uri, e.g. "unix:/run/vm/in.sock" or "tcp:127.0.0.1:4444".
func (c *Client) MigrateIncoming(ctx context.Context, uri string) error {
	return c.Execute(ctx, "migrate-incoming", map[string]any{"uri": uri}, nil)
}

// Migrate starts migrating to uri. It returns once the migration has
// started; use [Client.WaitMigration] to follow it.
func (c *Client) Migrate(ctx context.Context, uri string) error {
	return c.Execute(ctx, "migrate", map[string]any{"uri": uri}, nil)
}

// MigrateResume resumes a paused postcopy migration (postcopy-paused)
// through uri, once the destination listens there ([Client.MigrateRecover]).
func (c *Client) MigrateResume(ctx context.Context, uri string) error {
	return c.Execute(ctx, "migrate", map[string]any{"uri": uri, "resume": true}, nil)
}

// MigrateRecover makes a destination whose postcopy migration is paused
// listen on uri for the source's resumed migration channel.
func (c *Client) MigrateRecover(ctx context.Context, uri string) error {
	return c.Execute(ctx, "migrate-recover", map[string]any{"uri": uri}, nil)
}

// MigrateCancel cancels the outgoing migration.
func (c *Client) MigrateCancel(ctx context.Context) error {
	return c.Execute(ctx, "migrate_cancel", nil, nil)
}

// QueryMigrate returns the migration status and statistics.
func (c *Client) QueryMigrate(ctx context.Context) (*MigrationInfo, error) {
	var info MigrationInfo
	if err := c.Execute(ctx, "query-migrate", nil, &info); err != nil {
		return nil, err
	}
	return &info, nil
}

// WaitMigration polls query-migrate every poll until the migration
// completes, fails or is cancelled, calling progress (if non-nil) with every
// reply. It returns the final info, with an error wrapping
// [ErrMigrationFailed] or [ErrMigrationCancelled] (and QEMU's error-desc)
// unless the migration completed.
func (c *Client) WaitMigration(ctx context.Context, poll time.Duration, progress func(*MigrationInfo)) (*MigrationInfo, error) {
	return pollUntil(ctx, poll, func() (*MigrationInfo, bool, error) {
		info, err := c.QueryMigrate(ctx)
		if err != nil {
			return nil, true, err
		}
		if progress != nil {
			progress(info)
		}
		switch info.Status {
		case MigrationCompleted:
			return info, true, nil
		case MigrationFailed:
			return info, true, fmt.Errorf("qmp: %w: %s", ErrMigrationFailed, info.ErrorDesc)
		case MigrationCancelled:
			return info, true, fmt.Errorf("qmp: %w", ErrMigrationCancelled)
		}
		return info, false, nil
	})
}

// pollUntil calls step immediately and then every poll until it reports
// done or ctx ends.
func pollUntil[T any](ctx context.Context, poll time.Duration, step func() (T, bool, error)) (T, error) {
	if poll <= 0 {
		poll = 100 * time.Millisecond
	}
	t := time.NewTicker(poll)
	defer t.Stop()
	for {
		v, done, err := step()
		if done || err != nil {
			return v, err
		}
		select {
		case <-ctx.Done():
			return v, fmt.Errorf("qmp: wait: %w", ctx.Err())
		case <-t.C:
		}
	}
}
