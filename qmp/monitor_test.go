package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	goqmp "github.com/digitalocean/go-qemu/qmp"
	"github.com/digitalocean/go-qemu/qmp/raw"

	"github.com/migtun/migtun/internal/leaktest"
)

func TestMonitorRun(t *testing.T) {
	leaktest.Check(t)
	var mu sync.Mutex
	var calls []string
	f := startFake(t, func(cmd string, args json.RawMessage) reply {
		mu.Lock()
		calls = append(calls, cmd+" "+string(args))
		mu.Unlock()
		switch cmd {
		case "query-status":
			return reply{ret: map[string]any{"status": "running", "running": true, "singlestep": false}}
		case "query-version":
			return reply{ret: map[string]any{"qemu": map[string]int{"major": 7, "minor": 2, "micro": 0}, "package": "fake"}}
		case "echo":
			if len(args) == 0 {
				return reply{}
			}
			return reply{ret: args}
		case "stop":
			return reply{class: "GenericError", desc: "not allowed"}
		}
		return reply{class: "CommandNotFound", desc: fmt.Sprintf("The command %s has not been found", cmd)}
	})
	c := dialFake(t, f)
	if err := c.Connect(); err != nil {
		t.Fatalf("Connect on a dialed client = %v", err)
	}

	// go-qemu's generated API runs over the client.
	rm := raw.NewMonitor(c)
	st, err := rm.QueryStatus()
	if err != nil || st.Status != raw.RunStateRunning || !st.Running {
		t.Fatalf("QueryStatus = %+v, %v", st, err)
	}
	v, err := rm.QueryVersion()
	if err != nil || v.Qemu.Major != 7 || v.Qemu.Minor != 2 || v.Package != "fake" {
		t.Fatalf("QueryVersion = %+v, %v", v, err)
	}
	// A QMP error is an error, keeping its class, as through go-qemu.
	err = rm.Stop()
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "GenericError" || qe.Command != "stop" || !strings.Contains(err.Error(), "not allowed") {
		t.Fatalf("Stop = %v (%T), want *Error GenericError", err, err)
	}

	// The raw reply has no numeric id: go-qemu decodes "id" as a string.
	out, err := c.Run([]byte(`{"execute": "query-status"}`))
	if err != nil {
		t.Fatal(err)
	}
	var resp struct {
		ID     string `json:"id"`
		Return struct {
			Status string `json:"status"`
		} `json:"return"`
	}
	if err := json.Unmarshal(out, &resp); err != nil || resp.Return.Status != "running" || strings.Contains(string(out), `"id"`) {
		t.Fatalf("Run reply %s: %+v, %v", out, resp, err)
	}
	// A caller's own id comes back in the reply; arguments pass unchanged.
	out, err = c.Run([]byte(`{"execute": "echo", "arguments": {"a": [1, "x"]}, "id": {"k": "mine"}}` + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"return":{"a":[1,"x"]},"id":{"k":"mine"}}`; string(out) != want {
		t.Errorf("Run reply = %s, want %s", out, want)
	}
	// A command without arguments sends none; an empty reply is {}.
	out, err = c.RunRaw(t.Context(), []byte(`{"execute": "echo"}`))
	if err != nil || string(out) != `{"return":{}}` {
		t.Errorf("RunRaw echo without arguments = %s, %v", out, err)
	}
	if out, err := c.Run([]byte(`{"execute": "nope"}`)); out != nil || !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Errorf("Run nope = %s, %v", out, err)
	}

	// Commands the client cannot send are refused before reaching QEMU.
	mu.Lock()
	n := len(calls)
	mu.Unlock()
	for _, bad := range []string{
		`not json`,
		`[]`,
		`{}`,
		`{"execute": 5}`,
		`{"execute": ""}`,
		`{"exec-oob": "query-status"}`,
		`{"execute": "query-status", "control": {"run-oob": true}}`,
	} {
		if out, err := c.Run([]byte(bad)); out != nil || !errors.Is(err, ErrBadRawCommand) {
			t.Errorf("Run(%s) = %s, %v; want ErrBadRawCommand", bad, out, err)
		}
	}

	// Concurrent raw commands each get their own reply.
	var wg sync.WaitGroup
	for i := range 32 {
		wg.Go(func() {
			want := fmt.Sprintf(`{"return":{"n":%d}}`, i)
			out, err := c.Run(fmt.Appendf(nil, `{"execute": "echo", "arguments": {"n": %d}}`, i))
			if err != nil || string(out) != want {
				t.Errorf("echo %d = %s, %v", i, out, err)
			}
		})
	}
	wg.Wait()
	mu.Lock()
	if got := len(calls) - n; got != 32 {
		t.Errorf("QEMU saw %d commands after the refused ones, want 32: %q", got, calls[n:])
	}
	want := []string{
		"query-status {}", "query-version {}", "stop {}", // raw sends empty arguments
		"query-status ", `echo {"a":[1,"x"]}`, "echo ", "nope ",
	}
	for i, w := range want {
		if calls[i] != w {
			t.Errorf("call %d = %q, want %q", i, calls[i], w)
		}
	}
	mu.Unlock()

	// RunRaw honours its context.
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := c.RunRaw(ctx, []byte(`{"execute": "query-status"}`)); !errors.Is(err, context.Canceled) {
		t.Errorf("RunRaw with cancelled ctx = %v", err)
	}

	if err := c.Disconnect(); err != nil {
		t.Fatal(err)
	}
	if err := c.Connect(); !errors.Is(err, ErrClosed) {
		t.Errorf("Connect after Disconnect = %v, want ErrClosed", err)
	}
	if _, err := rm.QueryStatus(); !errors.Is(err, ErrClosed) {
		t.Errorf("QueryStatus after Disconnect = %v, want ErrClosed", err)
	}
}

// recv receives one event or fails the test after a while.
func recv(t *testing.T, ch <-chan goqmp.Event) (goqmp.Event, bool) {
	t.Helper()
	select {
	case e, ok := <-ch:
		return e, ok
	case <-time.After(5 * time.Second):
		t.Fatal("no event within 5s")
		return goqmp.Event{}, false
	}
}

// waitClosed drains ch until it is closed and returns how many events it
// still held.
func waitClosed(t *testing.T, ch <-chan goqmp.Event) int {
	t.Helper()
	n := 0
	for {
		if _, ok := recv(t, ch); !ok {
			return n
		}
		n++
	}
}

func TestEvents(t *testing.T) {
	leaktest.Check(t)
	f := startFake(t, func(cmd string, args json.RawMessage) reply {
		if cmd == "emit" {
			return reply{events: []string{"STOP", `MIGRATION {"status": "setup"}`}}
		}
		return reply{}
	})
	c := dialFake(t, f)
	ctx1, cancel1 := context.WithCancel(t.Context())
	defer cancel1()
	ev1, err := c.Events(ctx1)
	if err != nil {
		t.Fatal(err)
	}
	ev2, err := c.Events(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Execute(t.Context(), "emit", nil, nil); err != nil {
		t.Fatal(err)
	}
	for _, ch := range []<-chan goqmp.Event{ev1, ev2} {
		e, _ := recv(t, ch)
		if e.Event != "STOP" || e.Timestamp.Seconds != 1 || e.Timestamp.Microseconds != 2 {
			t.Errorf("first event = %+v", e)
		}
		e, _ = recv(t, ch)
		if e.Event != "MIGRATION" || e.Data["status"] != "setup" {
			t.Errorf("second event = %+v", e)
		}
		e.Data["status"] = "changed" // each channel has its own copy
	}

	// Cancelling the context closes that channel only.
	cancel1()
	if n := waitClosed(t, ev1); n != 0 {
		t.Errorf("%d unexpected events on ev1", n)
	}
	if err := c.Execute(t.Context(), "emit", nil, nil); err != nil {
		t.Fatal(err)
	}
	if e, _ := recv(t, ev2); e.Event != "STOP" {
		t.Errorf("event = %+v", e)
	}
	// A context that has already ended gives a channel closed at once.
	done, cancel := context.WithCancel(t.Context())
	cancel()
	ev3, err := c.Events(done)
	if err != nil {
		t.Fatal(err)
	}
	if n := waitClosed(t, ev3); n != 0 {
		t.Errorf("%d unexpected events on ev3", n)
	}

	// Closing the client closes the remaining channels.
	ctx4, cancel4 := context.WithCancel(t.Context())
	defer cancel4()
	ev4, err := c.Events(ctx4)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if n := waitClosed(t, ev2); n != 1 { // the MIGRATION event left unread
		t.Errorf("ev2 held %d events, want 1", n)
	}
	if n := waitClosed(t, ev4); n != 0 {
		t.Errorf("%d unexpected events on ev4", n)
	}
	if _, err := c.Events(t.Context()); !errors.Is(err, ErrClosed) {
		t.Errorf("Events after Close = %v, want ErrClosed", err)
	}
	if c.DroppedEvents() != 0 {
		t.Errorf("DroppedEvents = %d", c.DroppedEvents())
	}
}

func TestEventsSlowConsumer(t *testing.T) {
	leaktest.Check(t)
	const extra = 10
	f := startFake(t, func(cmd string, args json.RawMessage) reply {
		switch cmd {
		case "burst":
			var evs []string
			for i := range EventBuffer + extra {
				evs = append(evs, fmt.Sprintf(`TICK {"n": %d}`, i))
			}
			return reply{events: evs}
		case "quit":
			return reply{closeConn: true}
		}
		return reply{}
	})
	c := dialFake(t, f)
	ev, err := c.Events(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	// Nobody reads ev, yet the reader goes on: the command's reply, which
	// follows the events, arrives.
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if err := c.Execute(ctx, "burst", nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Execute(ctx, "other", nil, nil); err != nil {
		t.Fatal(err)
	}
	if got := c.DroppedEvents(); got != extra {
		t.Errorf("DroppedEvents = %d, want %d", got, extra)
	}
	// The oldest events were kept, in order.
	for i := range 3 {
		if e, _ := recv(t, ev); e.Data["n"] != float64(i) {
			t.Errorf("event %d = %+v", i, e)
		}
	}

	// QEMU closing the connection closes the channel too.
	if err := c.Quit(ctx); err != nil {
		t.Fatal(err)
	}
	if n := waitClosed(t, ev); n != EventBuffer-3 {
		t.Errorf("channel held %d more events, want %d", n, EventBuffer-3)
	}
	if _, err := c.Events(t.Context()); err == nil {
		t.Error("Events after disconnect succeeded")
	}
}
