package migrate

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"

	"github.com/migtun/migtun/proxy"
)

// control is a client of the local migtun's control endpoint.
type control struct {
	http *http.Client
}

func newControl(spec string) (*control, error) {
	ep, err := proxy.ParseEndpoint(spec)
	if err != nil {
		return nil, err
	}
	if ep.Network != "unix" && ep.Network != "tcp" {
		return nil, fmt.Errorf("control endpoint %s: want unix:PATH or tcp:HOST:PORT", spec)
	}
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, ep.Network, ep.Address)
	}}
	return &control{http: &http.Client{Transport: tr, Timeout: 2 * time.Minute}}, nil
}

func (c *control) close() { c.http.CloseIdleConnections() }

// do sends a request with an optional JSON body and decodes the answer.
func (c *control) do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://migtun"+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("the local migtun's control endpoint: %w (is 'migtun serve --control …' running?)", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode >= 300 {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(data, &e) == nil && e.Error != "" {
			return errors.New(e.Error)
		}
		return fmt.Errorf("control endpoint answered %s", resp.Status)
	}
	if out == nil {
		return nil
	}
	return json.Unmarshal(data, out)
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

func (c *control) vmAbort(ctx context.Context, id string, req proxy.VMRequest) error {
	return c.do(ctx, "POST", "/v1/sessions/"+url.PathEscape(id)+"/vm-abort", req, nil)
}

// reportProgress hands the migration's progress to the local migtun for
// its metrics.
func (c *control) reportProgress(ctx context.Context, id string, p proxy.MigrationProgress) error {
	return c.do(ctx, "PUT", "/v1/sessions/"+url.PathEscape(id)+"/progress", p, nil)
}
