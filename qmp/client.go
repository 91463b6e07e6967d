package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"reflect"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	goqmp "github.com/digitalocean/go-qemu/qmp"
)

// dialRetry is how long Dial waits before trying again when the socket does
// not exist yet or refuses connections (QEMU still starting).
const dialRetry = 20 * time.Millisecond

// Client is a connection to one QEMU monitor. It is safe for concurrent use:
// commands from several goroutines are multiplexed on the connection and
// matched to their replies by id. It implements go-qemu's qmp.Monitor (see
// [Client.Run] and [Client.Events]).
type Client struct {
	conn    net.Conn
	version Version

	wmu sync.Mutex // serialises writes to conn

	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]chan message  // replies awaited, by command id
	jobEnds map[string]JobEnd        // last end of each block job, by job id
	subs    map[*subscriber]struct{} // channels returned by Events
	ended   bool                     // readLoop has closed every subscriber; no new ones
	err     error                    // why the connection ended; set before done is closed

	dropped atomic.Uint64 // events not delivered because a subscriber's buffer was full

	done      chan struct{} // closed when readLoop has returned
	closeOnce sync.Once
}

// Version is the QEMU version announced in the QMP greeting (read as
// go-qemu's qmp.Version).
type Version struct {
	Major, Minor, Micro int
	// Package is the distribution's package version string, if any.
	Package string
}

// String formats the version as "major.minor.micro".
func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro) }

// message is any JSON object QEMU sends: greeting, reply or event. The
// greeting's version and an event's timestamp use go-qemu's wire types.
type message struct {
	QMP *struct {
		Version goqmp.Version `json:"version"`
	} `json:"QMP,omitempty"`
	ID     *uint64         `json:"id,omitempty"`
	Return json.RawMessage `json:"return,omitempty"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error,omitempty"`
	Event     string          `json:"event,omitempty"`
	Data      json.RawMessage `json:"data,omitempty"`
	Timestamp eventTimestamp  `json:"timestamp"`
}

// eventTimestamp has the type of [goqmp.Event]'s Timestamp field, so that
// one can be assigned to the other.
type eventTimestamp = struct {
	Seconds      int64 `json:"seconds"`
	Microseconds int64 `json:"microseconds"`
}

// command is what the client sends: go-qemu's command ("execute" and
// "arguments") tagged with the id that matches QEMU's reply to it.
type command struct {
	goqmp.Command
	ID uint64 `json:"id"`
}

// Dial connects to the QMP UNIX socket at socketPath, reads the greeting and
// negotiates capabilities. While the socket does not exist or refuses
// connections (QEMU is still starting) Dial keeps retrying until ctx ends.
func Dial(ctx context.Context, socketPath string) (*Client, error) {
	var d net.Dialer
	for {
		conn, err := d.DialContext(ctx, "unix", socketPath)
		if err == nil {
			c, err := newClient(ctx, conn)
			if err != nil {
				conn.Close()
				return nil, err
			}
			return c, nil
		}
		if !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("qmp: dial %s: %w", socketPath, err)
		}
		t := time.NewTimer(dialRetry)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("qmp: dial %s: %w (last error: %v)", socketPath, ctx.Err(), err)
		case <-t.C:
		}
	}
}

// newClient performs the greeting and capabilities handshake on conn, bounded
// by ctx, and starts the read loop.
func newClient(ctx context.Context, conn net.Conn) (*Client, error) {
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	br := bufio.NewReaderSize(conn, 64<<10)
	dec := json.NewDecoder(br)
	var greet message
	for {
		if err := dec.Decode(&greet); err != nil {
			stop()
			return nil, handshakeErr(ctx, "read greeting", err)
		}
		// QEMU may emit an event (RESUME, seen with QEMU 7.2 when the
		// client connects while QEMU is still starting) before the greeting.
		if greet.QMP != nil || greet.Event == "" {
			break
		}
		greet = message{}
	}
	if greet.QMP == nil {
		stop()
		return nil, fmt.Errorf("qmp: handshake: %w", ErrNotQMP)
	}
	v := greet.QMP.Version
	c := &Client{
		conn:    conn,
		version: Version{Major: v.QEMU.Major, Minor: v.QEMU.Minor, Micro: v.QEMU.Micro, Package: v.Package},
		nextID:  1,
		pending: make(map[uint64]chan message),
		jobEnds: make(map[string]JobEnd),
		subs:    make(map[*subscriber]struct{}),
		done:    make(chan struct{}),
	}
	// id 0 is the handshake's; commands start at 1.
	if err := json.NewEncoder(conn).Encode(command{Command: goqmp.Command{Execute: "qmp_capabilities"}}); err != nil {
		stop()
		return nil, handshakeErr(ctx, "send qmp_capabilities", err)
	}
	for {
		var m message
		if err := dec.Decode(&m); err != nil {
			stop()
			return nil, handshakeErr(ctx, "read qmp_capabilities reply", err)
		}
		if m.Event != "" {
			continue // events may precede the reply
		}
		if m.Error != nil {
			stop()
			return nil, &Error{Command: "qmp_capabilities", Class: m.Error.Class, Desc: m.Error.Desc}
		}
		break
	}
	if !stop() {
		// ctx ended during the handshake: the deadline may be set (or about to be).
		return nil, handshakeErr(ctx, "handshake", ctx.Err())
	}
	conn.SetDeadline(time.Time{})
	go c.readLoop(dec)
	return c, nil
}

func handshakeErr(ctx context.Context, what string, err error) error {
	if ctx.Err() != nil {
		err = ctx.Err()
	}
	return fmt.Errorf("qmp: %s: %w", what, err)
}

// Version reports the QEMU version from the greeting.
func (c *Client) Version() Version { return c.version }

// Close closes the connection and waits for the read loop to finish. Commands
// in flight fail with [ErrClosed]. Close is idempotent.
func (c *Client) Close() error {
	var err error
	c.closeOnce.Do(func() {
		c.mu.Lock()
		if c.err == nil {
			c.err = ErrClosed
		}
		c.mu.Unlock()
		if cerr := c.conn.Close(); cerr != nil && !errors.Is(cerr, net.ErrClosed) {
			err = fmt.Errorf("qmp: close: %w", cerr)
		}
		<-c.done
	})
	return err
}

// Done is closed when the connection has ended, by Close or because QEMU
// closed it; [Client.Err] then reports why.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err reports why the connection ended, or nil while it is open.
func (c *Client) Err() error {
	select {
	case <-c.done:
	default:
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// readLoop reads replies and events until the connection ends, handing each
// reply to the command waiting for it and each event to the subscribers.
// It never blocks on a caller: replies go to buffered channels and events
// are offered to subscribers without waiting.
func (c *Client) readLoop(dec *json.Decoder) {
	defer close(c.done)
	defer c.endSubscribers()
	for {
		var m message
		if err := dec.Decode(&m); err != nil {
			c.mu.Lock()
			if c.err == nil {
				c.err = fmt.Errorf("connection lost: %w", err)
			}
			c.mu.Unlock()
			return
		}
		switch {
		case m.Event != "":
			c.handleEvent(&m)
			c.publish(&m)
		case m.ID != nil:
			c.mu.Lock()
			ch := c.pending[*m.ID]
			delete(c.pending, *m.ID)
			c.mu.Unlock()
			if ch != nil {
				ch <- m // buffered: never blocks
			}
		}
		// Replies without an id only answer unparsable input, which this
		// client never sends; they are dropped like unknown messages.
	}
}

// Execute runs the QMP command cmd with args (nil, or anything marshalling
// to a JSON object) and, when result is non-nil, unmarshals the "return"
// value into it. A command QEMU rejects returns an [*Error]. If ctx ends
// first, Execute returns ctx's error and the late reply is discarded.
func (c *Client) Execute(ctx context.Context, cmd string, args any, result any) error {
	if isNil(args) {
		args = nil // a nil map or pointer would marshal as "arguments": null
	}
	m, err := c.roundTrip(ctx, goqmp.Command{Execute: cmd, Args: args})
	if err != nil {
		return err
	}
	if result != nil {
		if err := json.Unmarshal(m.Return, result); err != nil {
			return fmt.Errorf("qmp: %s: decode reply: %w", cmd, err)
		}
	}
	return nil
}

// roundTrip sends cmd tagged with a fresh id and waits for the reply with
// that id. A reply carrying a QMP error is returned as an [*Error].
func (c *Client) roundTrip(ctx context.Context, cmd goqmp.Command) (message, error) {
	ch := make(chan message, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return message{}, fmt.Errorf("qmp: %s: %w", cmd.Execute, err)
	}
	id := c.nextID
	c.nextID++
	c.pending[id] = ch
	c.mu.Unlock()

	if err := c.send(ctx, command{Command: cmd, ID: id}); err != nil {
		c.forget(id)
		return message{}, fmt.Errorf("qmp: %s: %w", cmd.Execute, err)
	}
	select {
	case m := <-ch:
		if m.Error != nil {
			return message{}, &Error{Command: cmd.Execute, Class: m.Error.Class, Desc: m.Error.Desc}
		}
		return m, nil
	case <-ctx.Done():
		c.forget(id)
		return message{}, fmt.Errorf("qmp: %s: %w", cmd.Execute, ctx.Err())
	case <-c.done:
		c.forget(id)
		return message{}, fmt.Errorf("qmp: %s: %w", cmd.Execute, c.Err())
	}
}

func (c *Client) forget(id uint64) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

// send writes one command. The write is bounded by ctx's deadline, if any.
// A write that fails after sending part of the command leaves the stream
// unusable, so it ends the connection.
func (c *Client) send(ctx context.Context, cmd command) error {
	b, err := json.Marshal(cmd)
	if err != nil {
		return fmt.Errorf("encode arguments: %w", err)
	}
	b = append(b, '\n')
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := ctx.Err(); err != nil {
		return err
	}
	dl, _ := ctx.Deadline()
	c.conn.SetWriteDeadline(dl)
	n, err := c.conn.Write(b)
	if err == nil {
		return nil
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		// The only write deadline is ctx's, whose Done may lag a little.
		err = context.DeadlineExceeded
		if cerr := ctx.Err(); cerr != nil {
			err = cerr
		}
	}
	if n == 0 {
		return err // nothing sent: the stream is intact
	}
	err = fmt.Errorf("write: %w", err)
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
	c.conn.Close()
	return err
}

// isNil reports whether v is nil or a nil map, pointer or slice.
func isNil(v any) bool {
	if v == nil {
		return true
	}
	switch rv := reflect.ValueOf(v); rv.Kind() {
	case reflect.Map, reflect.Pointer, reflect.Slice, reflect.Interface:
		return rv.IsNil()
	}
	return false
}

// isDisconnect reports whether err means the connection went away, which
// is the expected outcome of "quit".
func isDisconnect(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, net.ErrClosed)
}
