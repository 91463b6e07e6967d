package control

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"

	"github.com/migtun/migtun/endpoint"
)

// Options configure a Client. The zero value is usable.
type Options struct {
	// Timeout bounds each request; 0: only the caller's context.
	Timeout time.Duration
	// Token is sent as a bearer token; the TCP control endpoint requires
	// one, the UNIX socket does not.
	Token string
}

// Client speaks to a migtun's local control endpoint.
type Client struct {
	http  *http.Client
	token string
}

// NewClient returns a client of the control endpoint at spec, "unix:PATH"
// or "tcp:HOST:PORT". opts may be nil.
func NewClient(spec string, opts *Options) (*Client, error) {
	ep, err := endpoint.Parse(spec)
	if err != nil {
		return nil, err
	}
	if opts == nil {
		opts = &Options{}
	}
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return ep.Dial(ctx, 0)
	}}
	return &Client{http: &http.Client{Transport: tr, Timeout: opts.Timeout}, token: opts.Token}, nil
}

// Close releases the client's idle connections.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// Health asks the endpoint whether it serves.
func (c *Client) Health(ctx context.Context) error {
	return c.do(ctx, http.MethodGet, "/healthz", nil, nil)
}

// Prepare creates a session with a peer.
func (c *Client) Prepare(ctx context.Context, req PrepareRequest) (*SessionInfo, error) {
	var info SessionInfo
	return &info, c.do(ctx, http.MethodPost, "/v1/sessions", req, &info)
}

// Sessions lists the open and the recently ended sessions.
func (c *Client) Sessions(ctx context.Context) ([]SessionInfo, error) {
	var list []SessionInfo
	return list, c.do(ctx, http.MethodGet, "/v1/sessions", nil, &list)
}

// Session describes one session.
func (c *Client) Session(ctx context.Context, id string) (*SessionInfo, error) {
	var info SessionInfo
	return &info, c.do(ctx, http.MethodGet, sessionPath(id, ""), nil, &info)
}

// Finish finishes a source session; grace (0: the server's default) bounds
// how long streams in flight may take to end.
func (c *Client) Finish(ctx context.Context, id string, grace time.Duration) (*FinishReport, error) {
	path := sessionPath(id, "/finish")
	if grace > 0 {
		path += "?grace=" + url.QueryEscape(grace.String())
	}
	var rep FinishReport
	return &rep, c.do(ctx, http.MethodPost, path, nil, &rep)
}

// Abort ends a session on both hosts at once.
func (c *Client) Abort(ctx context.Context, id, reason string) (*SessionInfo, error) {
	var info SessionInfo
	return &info, c.do(ctx, http.MethodPost, sessionPath(id, "/abort"), AbortRequest{Reason: reason}, &info)
}

// ReportProgress hands a migration's progress to the source's migtun for
// its metrics.
func (c *Client) ReportProgress(ctx context.Context, id string, p MigrationProgress) error {
	return c.do(ctx, http.MethodPut, sessionPath(id, "/progress"), p, nil)
}

// VM sends a VM operation (op is "prepare", "finish", "recover" or
// "abort") of a source session to its peer: req is sent as JSON, the
// peer's answer decoded into out (nil: ignored). Package migrate owns the
// types.
func (c *Client) VM(ctx context.Context, id, op string, req, out any) error {
	return c.do(ctx, http.MethodPost, sessionPath(id, "/vm-"+op), req, out)
}

// Routes lists the host's routes.
func (c *Client) Routes(ctx context.Context) ([]RouteInfo, error) {
	var list []RouteInfo
	return list, c.do(ctx, http.MethodGet, "/v1/routes", nil, &list)
}

// SetRoute registers or replaces the route of a channel; target is
// "unix:PATH", "tcp:HOST:PORT" or "session".
func (c *Client) SetRoute(ctx context.Context, channel, target string) error {
	return c.do(ctx, http.MethodPut, "/v1/routes/"+url.PathEscape(channel), RouteInfo{Target: target}, nil)
}

// DeleteRoute removes the route of a channel.
func (c *Client) DeleteRoute(ctx context.Context, channel string) error {
	return c.do(ctx, http.MethodDelete, "/v1/routes/"+url.PathEscape(channel), nil, nil)
}

func sessionPath(id, rest string) string { return "/v1/sessions/" + url.PathEscape(id) + rest }

// do sends a request with body (nil: none) as JSON and decodes the JSON
// answer into out (nil: ignored). An error answer becomes an *Error.
func (c *Client) do(ctx context.Context, method, path string, body, out any) error {
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
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return Errorf(CodeTimeout, "the local migtun's control endpoint: %w", err)
		}
		return Errorf(CodeUnavailable, "the local migtun's control endpoint: %w (is 'migtun serve --control …' running?)", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode >= 300 {
		var e Error
		if json.Unmarshal(data, &e) == nil && e.Message != "" {
			if e.Code == "" {
				e.Code = CodeInternal
			}
			return &e
		}
		return &Error{Code: CodeInternal, Message: fmt.Sprintf("control endpoint answered %s", resp.Status)}
	}
	if out == nil {
		return nil
	}
	return json.Unmarshal(data, out)
}
