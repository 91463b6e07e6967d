package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	goqmp "github.com/digitalocean/go-qemu/qmp"
)

// Client implements go-qemu's Monitor, so go-qemu's raw and qemu packages
// can drive QEMU over this client's transport.
var _ goqmp.Monitor = (*Client)(nil)

// EventBuffer is how many events each channel returned by [Client.Events]
// holds for a consumer that is not keeping up. Once it is full, further
// events for that channel are dropped (the newest are lost, the buffered
// ones are kept) and counted by [Client.DroppedEvents]; the read loop never
// waits for a consumer.
const EventBuffer = 256

// ErrBadRawCommand means a command passed to [Client.Run] or
// [Client.RunRaw] is not a QMP command object this client can send.
var ErrBadRawCommand = errors.New("bad raw QMP command")

// Connect implements go-qemu's Monitor. A Client is connected (and its
// capabilities negotiated) by [Dial], so Connect only reports whether it
// still is: nil while the connection is open, else why it ended.
func (c *Client) Connect() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return fmt.Errorf("qmp: connect: %w", c.err)
	}
	return nil
}

// Disconnect implements go-qemu's Monitor; it is [Client.Close].
func (c *Client) Disconnect() error { return c.Close() }

// Run implements go-qemu's Monitor: it is [Client.RunRaw] without a
// context, so it waits until QEMU replies or the client is closed. Use
// RunRaw to bound the wait.
func (c *Client) Run(command []byte) ([]byte, error) {
	return c.RunRaw(context.Background(), command)
}

// RunRaw sends a raw QMP command, a JSON object such as
// {"execute":"query-status"} or {"execute":"stop","arguments":{}}, and
// returns the raw reply as QEMU would send it to that command:
// {"return":...}, carrying the command's own "id" if it had one. On the
// wire the command is tagged with the client's id like any other, so
// concurrent callers get their own replies. As with go-qemu's
// SocketMonitor, a QMP error is returned as an error, not as reply bytes;
// here it is an [*Error] keeping QEMU's error class. A command with members
// other than "execute", "arguments" and "id" (such as "exec-oob": out-of-band
// execution is not negotiated) fails with [ErrBadRawCommand] without being
// sent.
func (c *Client) RunRaw(ctx context.Context, command []byte) ([]byte, error) {
	var in map[string]json.RawMessage
	if err := json.Unmarshal(command, &in); err != nil {
		return nil, fmt.Errorf("qmp: %w: %w", ErrBadRawCommand, err)
	}
	var cmd goqmp.Command
	if err := json.Unmarshal(in["execute"], &cmd.Execute); err != nil || cmd.Execute == "" {
		return nil, fmt.Errorf(`qmp: %w: "execute" must be a non-empty string`, ErrBadRawCommand)
	}
	if a, ok := in["arguments"]; ok {
		cmd.Args = a // forwarded as given; QEMU checks it
	}
	callerID := in["id"]
	for k := range in {
		if k != "execute" && k != "arguments" && k != "id" {
			return nil, fmt.Errorf("qmp: %s: %w: unsupported member %q", cmd.Execute, ErrBadRawCommand, k)
		}
	}
	m, err := c.roundTrip(ctx, cmd)
	if err != nil {
		return nil, err
	}
	ret := m.Return
	if len(ret) == 0 {
		ret = json.RawMessage("{}")
	}
	// The reply's id is the client's number, not the caller's: go-qemu
	// decodes "id" as a string, so the number must not leak through.
	out, err := json.Marshal(struct {
		Return json.RawMessage `json:"return"`
		ID     json.RawMessage `json:"id,omitempty"`
	}{ret, callerID})
	if err != nil {
		return nil, fmt.Errorf("qmp: %s: encode reply: %w", cmd.Execute, err)
	}
	return out, nil
}

// subscriber is one channel returned by Events.
type subscriber struct {
	ch   chan goqmp.Event
	stop func() bool // deregisters the context.AfterFunc that unsubscribes
}

// Events implements go-qemu's Monitor. It returns a channel receiving every
// event QEMU sends from now on, as go-qemu [goqmp.Event] values. The channel
// is closed when ctx ends or the connection ends (by [Client.Close] or
// because QEMU closed it); no goroutine outlives either. Each channel
// buffers [EventBuffer] events; a consumer that falls further behind loses
// events (counted by [Client.DroppedEvents]) rather than stalling the
// client. Events may be called any number of times; each channel gets every
// event. It fails if the connection has already ended.
func (c *Client) Events(ctx context.Context) (<-chan goqmp.Event, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	s := &subscriber{ch: make(chan goqmp.Event, EventBuffer)}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ended {
		return nil, fmt.Errorf("qmp: events: %w", c.err)
	}
	c.subs[s] = struct{}{}
	// Runs c.unsubscribe in a goroutine of its own once ctx is done; s.stop
	// cancels that when the connection ends first.
	s.stop = context.AfterFunc(ctx, func() { c.unsubscribe(s) })
	return s.ch, nil
}

// DroppedEvents reports how many events, over all channels returned by
// [Client.Events], were dropped because the channel's buffer was full.
func (c *Client) DroppedEvents() uint64 { return c.dropped.Load() }

// unsubscribe closes s's channel unless the connection's end already did.
func (c *Client) unsubscribe(s *subscriber) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.subs[s]; ok {
		delete(c.subs, s)
		close(s.ch)
	}
}

// publish offers an event to every subscriber without blocking. Each gets
// its own copy of the data, so consumers may modify it.
func (c *Client) publish(m *message) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for s := range c.subs {
		e := goqmp.Event{Event: m.Event, Timestamp: m.Timestamp}
		if len(m.Data) > 0 {
			_ = json.Unmarshal(m.Data, &e.Data) // an event whose data is not an object keeps nil Data
		}
		select {
		case s.ch <- e:
		default:
			c.dropped.Add(1)
		}
	}
}

// endSubscribers closes every subscriber's channel when the read loop ends
// and refuses new subscribers.
func (c *Client) endSubscribers() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ended = true
	for s := range c.subs {
		s.stop()
		delete(c.subs, s)
		close(s.ch)
	}
}
