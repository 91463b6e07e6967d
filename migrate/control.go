package migrate

import (
	"context"
	"net/url"
	"time"

	"github.com/migtun/migtun/proxy"
)

// control is a client of the local migtun's control endpoint.
type control struct{ *proxy.Client }

func newControl(spec string) (*control, error) {
	c, err := proxy.NewClient(spec, 2*time.Minute)
	if err != nil {
		return nil, err
	}
	return &control{c}, nil
}

func (c *control) close() { c.Close() }

func (c *control) do(ctx context.Context, method, path string, body, out any) error {
	return c.Do(ctx, method, path, body, out)
}

func (c *control) prepare(ctx context.Context, req proxy.PrepareRequest) (*proxy.SessionInfo, error) {
	var info proxy.SessionInfo
	if err := c.do(ctx, "POST", "/v1/sessions", req, &info); err != nil {
		return nil, err
	}
	return &info, nil
}

func (c *control) show(ctx context.Context, id string) (*proxy.SessionInfo, error) {
	var info proxy.SessionInfo
	if err := c.do(ctx, "GET", "/v1/sessions/"+url.PathEscape(id), nil, &info); err != nil {
		return nil, err
	}
	return &info, nil
}

func (c *control) finish(ctx context.Context, id string) (*proxy.FinishReport, error) {
	var rep proxy.FinishReport
	if err := c.do(ctx, "POST", "/v1/sessions/"+url.PathEscape(id)+"/finish", nil, &rep); err != nil {
		return nil, err
	}
	return &rep, nil
}

func (c *control) abort(ctx context.Context, id, reason string) error {
	return c.do(ctx, "POST", "/v1/sessions/"+url.PathEscape(id)+"/abort", map[string]string{"reason": reason}, nil)
}

func (c *control) vmPrepare(ctx context.Context, id string, req proxy.VMRequest) (*proxy.VMPrepared, error) {
	var p proxy.VMPrepared
	if err := c.do(ctx, "POST", "/v1/sessions/"+url.PathEscape(id)+"/vm-prepare", req, &p); err != nil {
		return nil, err
	}
	return &p, nil
}

func (c *control) vmFinish(ctx context.Context, id string, req proxy.VMRequest) (*proxy.VMResult, error) {
	var r proxy.VMResult
	if err := c.do(ctx, "POST", "/v1/sessions/"+url.PathEscape(id)+"/vm-finish", req, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

func (c *control) vmRecover(ctx context.Context, id string, req proxy.VMRequest) error {
	return c.do(ctx, "POST", "/v1/sessions/"+url.PathEscape(id)+"/vm-recover", req, nil)
}

func (c *control) vmAbort(ctx context.Context, id string, req proxy.VMRequest) error {
	return c.do(ctx, "POST", "/v1/sessions/"+url.PathEscape(id)+"/vm-abort", req, nil)
}

// reportProgress hands the migration's progress to the local migtun for
// its metrics.
func (c *control) reportProgress(ctx context.Context, id string, p proxy.MigrationProgress) error {
	return c.do(ctx, "PUT", "/v1/sessions/"+url.PathEscape(id)+"/progress", p, nil)
}
