package qmp

import (
	"context"
	"encoding/json"
	"fmt"
	"time"
)

// BlockJob is one entry of query-block-jobs.
type BlockJob struct {
	// Device is the job id (or the device name for jobs started without one).
	Device string `json:"device"`
	// Type is the job type, e.g. "mirror".
	Type string `json:"type"`
	// Len is the estimated amount of work (bytes for mirror).
	Len int64 `json:"len"`
	// Offset is the work done so far, in the same unit as Len.
	Offset int64 `json:"offset"`
	// Busy is true while the job is doing I/O.
	Busy bool `json:"busy"`
	// Paused is true if the job is paused.
	Paused bool `json:"paused"`
	// Speed is the rate limit in bytes/s, 0 for none.
	Speed int64 `json:"speed"`
	// Ready is true once a mirror is in sync and can be completed.
	Ready bool `json:"ready"`
	// Status is the job state, e.g. "running", "ready", "concluded".
	Status string `json:"status"`
	// Error is set when a concluded job failed.
	Error string `json:"error,omitempty"`
}

// JobEnd records how a block job ended, from its BLOCK_JOB_COMPLETED or
// BLOCK_JOB_CANCELLED event.
type JobEnd struct {
	// Event is "BLOCK_JOB_COMPLETED" or "BLOCK_JOB_CANCELLED".
	Event string
	// Error is QEMU's message if the job failed, else empty.
	Error string
	// Offset and Len are the progress at the end.
	Offset, Len int64
}

// handleEvent records block job ends so that waiters can tell why a job
// vanished from query-block-jobs. Other events are ignored.
func (c *Client) handleEvent(m *message) {
	if m.Event != "BLOCK_JOB_COMPLETED" && m.Event != "BLOCK_JOB_CANCELLED" {
		return
	}
	var d struct {
		Device string `json:"device"`
		Error  string `json:"error"`
		Offset int64  `json:"offset"`
		Len    int64  `json:"len"`
	}
	if json.Unmarshal(m.Data, &d) != nil || d.Device == "" {
		return
	}
	c.mu.Lock()
	c.jobEnds[d.Device] = JobEnd{Event: m.Event, Error: d.Error, Offset: d.Offset, Len: d.Len}
	c.mu.Unlock()
}

// LastJobEnd reports how the most recent job with this id ended, if the
// client saw its end event.
func (c *Client) LastJobEnd(jobID string) (JobEnd, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.jobEnds[jobID]
	return e, ok
}

// NBDServerStartUnix starts QEMU's NBD server on a UNIX socket. It uses the
// legacy SocketAddressLegacy form that QEMU 7.2 requires.
func (c *Client) NBDServerStartUnix(ctx context.Context, path string) error {
	return c.Execute(ctx, "nbd-server-start", map[string]any{
		"addr": map[string]any{"type": "unix", "data": map[string]any{"path": path}},
	}, nil)
}

// NBDServerAdd exports the block node or device under its own name.
func (c *Client) NBDServerAdd(ctx context.Context, device string, writable bool) error {
	return c.Execute(ctx, "nbd-server-add", map[string]any{"device": device, "writable": writable}, nil)
}

// NBDServerStop stops the NBD server and removes its exports.
func (c *Client) NBDServerStop(ctx context.Context) error {
	return c.Execute(ctx, "nbd-server-stop", nil, nil)
}

// BlockdevAdd adds a block node; args are blockdev-add's arguments, e.g.
// {"driver":"nbd","node-name":"t","server":{"type":"unix","path":p},"export":"disk0"}.
func (c *Client) BlockdevAdd(ctx context.Context, args map[string]any) error {
	return c.Execute(ctx, "blockdev-add", args, nil)
}

// BlockdevDel removes a block node added with BlockdevAdd.
func (c *Client) BlockdevDel(ctx context.Context, nodeName string) error {
	return c.Execute(ctx, "blockdev-del", map[string]any{"node-name": nodeName}, nil)
}

// BlockdevMirror starts a mirror job copying device to the target node. sync
// is "full", "top" or "none". bufSize bounds the data the job has in
// flight at once (QEMU's "buf-size"; 0 keeps QEMU's default of 16 MiB):
// on a long path the mirror moves at most bufSize per round trip.
func (c *Client) BlockdevMirror(ctx context.Context, jobID, device, target, sync string, bufSize int64) error {
	c.mu.Lock()
	delete(c.jobEnds, jobID)
	c.mu.Unlock()
	args := map[string]any{"job-id": jobID, "device": device, "target": target, "sync": sync}
	if bufSize > 0 {
		args["buf-size"] = bufSize
	}
	return c.Execute(ctx, "blockdev-mirror", args, nil)
}

// QueryBlockJobs lists the active block jobs.
func (c *Client) QueryBlockJobs(ctx context.Context) ([]BlockJob, error) {
	var jobs []BlockJob
	if err := c.Execute(ctx, "query-block-jobs", nil, &jobs); err != nil {
		return nil, err
	}
	return jobs, nil
}

// BlockJobCancel cancels a job. Cancelling a mirror that is ready completes
// it instead, leaving the target a consistent copy. force also cancels a
// paused job.
func (c *Client) BlockJobCancel(ctx context.Context, device string, force bool) error {
	return c.Execute(ctx, "block-job-cancel", map[string]any{"device": device, "force": force}, nil)
}

// findJob queries the jobs and returns the one with this id, if any.
func (c *Client) findJob(ctx context.Context, jobID string) (*BlockJob, error) {
	jobs, err := c.QueryBlockJobs(ctx)
	if err != nil {
		return nil, err
	}
	for i := range jobs {
		if jobs[i].Device == jobID {
			return &jobs[i], nil
		}
	}
	return nil, nil
}

// WaitBlockJobReady polls query-block-jobs every poll until the job is
// ready, calling progress (if non-nil) with every state. It fails with
// [ErrJobFailed] if the job concludes with an error and [ErrJobGone] if it
// disappears first.
func (c *Client) WaitBlockJobReady(ctx context.Context, jobID string, poll time.Duration, progress func(BlockJob)) error {
	_, err := pollUntil(ctx, poll, func() (struct{}, bool, error) {
		j, err := c.findJob(ctx, jobID)
		if err != nil {
			return struct{}{}, true, err
		}
		if j == nil {
			return struct{}{}, true, c.jobGoneErr(jobID)
		}
		if progress != nil {
			progress(*j)
		}
		if j.Error != "" {
			return struct{}{}, true, fmt.Errorf("qmp: job %s: %w: %s", jobID, ErrJobFailed, j.Error)
		}
		return struct{}{}, j.Ready, nil
	})
	return err
}

// WaitBlockJobGone polls until the job has left query-block-jobs. It
// returns an error wrapping [ErrJobFailed] if the job's end event carried an
// error.
func (c *Client) WaitBlockJobGone(ctx context.Context, jobID string, poll time.Duration) error {
	_, err := pollUntil(ctx, poll, func() (struct{}, bool, error) {
		j, err := c.findJob(ctx, jobID)
		if err != nil {
			return struct{}{}, true, err
		}
		if j != nil {
			return struct{}{}, false, nil
		}
		if e, ok := c.LastJobEnd(jobID); ok && e.Error != "" {
			return struct{}{}, true, fmt.Errorf("qmp: job %s: %w: %s", jobID, ErrJobFailed, e.Error)
		}
		return struct{}{}, true, nil
	})
	return err
}

// jobGoneErr explains why a job is no longer listed, using its end event
// when the client saw one.
func (c *Client) jobGoneErr(jobID string) error {
	e, ok := c.LastJobEnd(jobID)
	switch {
	case ok && e.Error != "":
		return fmt.Errorf("qmp: job %s: %w: %s", jobID, ErrJobFailed, e.Error)
	case ok:
		return fmt.Errorf("qmp: job %s: %w (ended with %s before becoming ready)", jobID, ErrJobGone, e.Event)
	}
	return fmt.Errorf("qmp: job %s: %w", jobID, ErrJobGone)
}
