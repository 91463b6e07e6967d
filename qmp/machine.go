package qmp

import "context"

// StatusInfo is the reply of query-status.
type StatusInfo struct {
	// Status is the run state, e.g. "running", "paused", "prelaunch",
	// "inmigrate", "postmigrate", "finish-migrate".
	Status string `json:"status"`
	// Running is true while guest CPUs run.
	Running bool `json:"running"`
}

// QueryStatus runs query-status.
func (c *Client) QueryStatus(ctx context.Context) (*StatusInfo, error) {
	var s StatusInfo
	if err := c.Execute(ctx, "query-status", nil, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// Status returns the VM's run state (query-status "status").
func (c *Client) Status(ctx context.Context) (string, error) {
	s, err := c.QueryStatus(ctx)
	if err != nil {
		return "", err
	}
	return s.Status, nil
}

// Stop pauses the guest CPUs.
func (c *Client) Stop(ctx context.Context) error { return c.Execute(ctx, "stop", nil, nil) }

// Cont resumes the guest CPUs.
func (c *Client) Cont(ctx context.Context) error { return c.Execute(ctx, "cont", nil, nil) }

// Quit asks QEMU to exit. QEMU closing the connection before or right after
// its reply counts as success.
func (c *Client) Quit(ctx context.Context) error {
	err := c.Execute(ctx, "quit", nil, nil)
	if err != nil && isDisconnect(err) {
		return nil
	}
	return err
}
