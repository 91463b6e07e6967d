package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// Client speaks to a migtun's local control endpoint (see Handler), for
// "migtun session" and "migtun migrate".
type Client struct {
	http *http.Client
}

// NewClient returns a client of the control endpoint at spec, "unix:PATH"
// or "tcp:HOST:PORT". timeout bounds each request (0: none).
func NewClient(spec string, timeout time.Duration) (*Client, error) {
	ep, err := ParseEndpoint(spec)
	if err != nil {
		return nil, err
	}
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, ep.Network, ep.Address)
	}}
	return &Client{http: &http.Client{Transport: tr, Timeout: timeout}}, nil
}

// Close releases the client's idle connections.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// Do sends a request to path with body (nil: none) as JSON and decodes the
// JSON answer into out (nil: ignored). An error answer becomes an error
// carrying the endpoint's message.
func (c *Client) Do(ctx context.Context, method, path string, body, out any) error {
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
