package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"testing"
	"time"
)

func dialFake(t *testing.T, f *fakeQEMU) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, f.path)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestRunReplyErrorAndEvents(t *testing.T) {
	f := startFake(t, func(cmd string, args json.RawMessage) reply {
		switch cmd {
		case "query-status":
			return reply{ret: map[string]any{"status": "prelaunch", "running": false},
				events: []string{"RESUME", `MIGRATION {"status": "setup"}`}}
		case "echo":
			var a map[string]any
			json.Unmarshal(args, &a)
			return reply{ret: a, events: []string{"STOP"}}
		}
		return reply{class: "CommandNotFound", desc: fmt.Sprintf("The command %s has not been found", cmd),
			events: []string{"POWERDOWN"}}
	})
	c := dialFake(t, f)
	if got := c.Version().String(); got != "7.2.0" {
		t.Errorf("Version = %q, want 7.2.0", got)
	}
	ctx := t.Context()

	st, err := c.Status(ctx)
	if err != nil || st != "prelaunch" {
		t.Fatalf("Status = %q, %v; want prelaunch", st, err)
	}

	var out struct {
		A int    `json:"a"`
		B string `json:"b"`
	}
	if err := c.Execute(ctx, "echo", map[string]any{"a": 7, "b": "x"}, &out); err != nil || out.A != 7 || out.B != "x" {
		t.Fatalf("echo = %+v, %v", out, err)
	}

	err = c.Execute(ctx, "no-such-command", nil, nil)
	var qe *Error
	if !errors.As(err, &qe) {
		t.Fatalf("error %v (%T) is not *Error", err, err)
	}
	if qe.Class != "CommandNotFound" || qe.Command != "no-such-command" {
		t.Errorf("Error = %+v", qe)
	}
	if want := "qmp: no-such-command: The command no-such-command has not been found"; err.Error() != want {
		t.Errorf("Error() = %q, want %q", err.Error(), want)
	}

	// The connection is still usable after an error.
	if _, err := c.Status(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestConcurrentRun(t *testing.T) {
	f := startFake(t, func(cmd string, args json.RawMessage) reply {
		var a struct{ N int }
		json.Unmarshal(args, &a)
		return reply{ret: map[string]int{"n": a.N * 2}, events: []string{"TICK"}}
	})
	c := dialFake(t, f)
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 64 {
		wg.Go(func() {
			var r struct{ N int }
			if err := c.Execute(t.Context(), "double", map[string]int{"N": i}, &r); err != nil {
				errs <- err
				return
			}
			if r.N != 2*i {
				errs <- fmt.Errorf("double(%d) = %d", i, r.N)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestDialWaitsForSocket(t *testing.T) {
	f := newFake(t, func(string, json.RawMessage) reply { return reply{} })
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	type result struct {
		c   *Client
		err error
	}
	done := make(chan result, 1)
	go func() {
		c, err := Dial(ctx, f.path)
		done <- result{c, err}
	}()
	time.Sleep(150 * time.Millisecond)
	if err := f.listen(); err != nil {
		t.Fatal(err)
	}
	r := <-done
	if r.err != nil {
		t.Fatalf("Dial: %v", r.err)
	}
	defer r.c.Close()
	if _, err := r.c.Status(ctx); err != nil {
		// The fake answers {} to everything: status is empty but no error.
		t.Fatal(err)
	}
}

func TestDialGivesUp(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	_, err := Dial(ctx, socketDir(t)+"/absent.sock")
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Dial = %v, want deadline exceeded", err)
	}
}

func TestDialHandshakeTimeout(t *testing.T) {
	f := newFake(t, nil)
	f.greeting = "none"
	if err := f.listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	_, err := Dial(ctx, f.path)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Dial = %v, want deadline exceeded", err)
	}
}

func TestDialNotQMP(t *testing.T) {
	f := newFake(t, nil)
	f.greeting = `{"hello": "world"}`
	if err := f.listen(); err != nil {
		t.Fatal(err)
	}
	_, err := Dial(t.Context(), f.path)
	if !errors.Is(err, ErrNotQMP) {
		t.Fatalf("Dial = %v, want ErrNotQMP", err)
	}
}

// QEMU 7.2 can send an event (RESUME) before the greeting when the client
// connects while it is still starting.
func TestDialSkipsEventsBeforeGreeting(t *testing.T) {
	f := newFake(t, func(string, json.RawMessage) reply { return reply{} })
	f.greeting = event("RESUME") + "\r\n" + fakeGreeting
	if err := f.listen(); err != nil {
		t.Fatal(err)
	}
	c := dialFake(t, f)
	if got := c.Version().String(); got != "7.2.0" {
		t.Errorf("Version = %q, want 7.2.0", got)
	}
	if _, err := c.Status(t.Context()); err != nil {
		t.Fatal(err)
	}
}

func TestCancelledCommandDoesNotDesync(t *testing.T) {
	var mu sync.Mutex
	hang := true
	f := startFake(t, func(cmd string, args json.RawMessage) reply {
		mu.Lock()
		defer mu.Unlock()
		if cmd == "slow" && hang {
			hang = false
			return reply{noReply: true}
		}
		return reply{ret: map[string]string{"cmd": cmd}}
	})
	c := dialFake(t, f)
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	if err := c.Execute(ctx, "slow", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("slow = %v, want deadline exceeded", err)
	}
	for _, cmd := range []string{"a", "b"} {
		var r struct{ Cmd string }
		if err := c.Execute(t.Context(), cmd, nil, &r); err != nil || r.Cmd != cmd {
			t.Fatalf("%s = %+v, %v", cmd, r, err)
		}
	}
}

func TestCloseAndDisconnect(t *testing.T) {
	f := startFake(t, func(cmd string, args json.RawMessage) reply {
		switch cmd {
		case "hang":
			return reply{noReply: true}
		case "quit":
			return reply{closeConn: true, events: []string{"SHUTDOWN"}}
		}
		return reply{}
	})

	// Close fails a command in flight with ErrClosed.
	c := dialFake(t, f)
	errc := make(chan error, 1)
	go func() { errc <- c.Execute(t.Context(), "hang", nil, nil) }()
	time.Sleep(50 * time.Millisecond)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; !errors.Is(err, ErrClosed) {
		t.Fatalf("hang after Close = %v, want ErrClosed", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close = %v", err)
	}
	if err := c.Execute(t.Context(), "x", nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("Run after Close = %v, want ErrClosed", err)
	}

	// QEMU closing the connection ends the client; Quit counts it as success.
	c = dialFake(t, f)
	if err := c.Quit(t.Context()); err != nil {
		t.Fatalf("Quit = %v", err)
	}
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("client still open after QEMU closed the connection")
	}
	if err := c.Execute(t.Context(), "x", nil, nil); !errors.Is(err, io.EOF) {
		t.Fatalf("Run after disconnect = %v, want EOF", err)
	}
}

func TestWaitMigration(t *testing.T) {
	var mu sync.Mutex
	states := []string{"setup", "active", "active", "completed"}
	f := startFake(t, func(cmd string, args json.RawMessage) reply {
		mu.Lock()
		defer mu.Unlock()
		switch cmd {
		case "query-migrate":
			s := states[0]
			if len(states) > 1 {
				states = states[1:]
			}
			ret := map[string]any{"status": s}
			if s == "failed" {
				ret["error-desc"] = "Unable to write to socket: Broken pipe"
			} else {
				ret["ram"] = map[string]any{"transferred": 100, "remaining": 50, "total": 150, "mbps": 1.5}
			}
			return reply{ret: ret, events: []string{`MIGRATION {"status": "` + s + `"}`}}
		}
		return reply{}
	})
	c := dialFake(t, f)
	var seen []string
	info, err := c.WaitMigration(t.Context(), time.Millisecond, func(i *MigrationInfo) { seen = append(seen, i.Status) })
	if err != nil || info.Status != MigrationCompleted || info.RAM.Transferred != 100 {
		t.Fatalf("WaitMigration = %+v, %v", info, err)
	}
	if len(seen) != 4 {
		t.Errorf("progress saw %v", seen)
	}

	mu.Lock()
	states = []string{"active", "failed"}
	mu.Unlock()
	_, err = c.WaitMigration(t.Context(), time.Millisecond, nil)
	if !errors.Is(err, ErrMigrationFailed) {
		t.Fatalf("WaitMigration = %v, want ErrMigrationFailed", err)
	}
	if want := "qmp: migration failed: Unable to write to socket: Broken pipe"; err.Error() != want {
		t.Errorf("error = %q, want %q", err, want)
	}

	mu.Lock()
	states = []string{"active"}
	mu.Unlock()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Millisecond)
	defer cancel()
	if _, err := c.WaitMigration(ctx, time.Millisecond, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitMigration = %v, want deadline exceeded", err)
	}
}

func TestBlockJobs(t *testing.T) {
	var mu sync.Mutex
	var calls []string
	polls := 0
	f := startFake(t, func(cmd string, args json.RawMessage) reply {
		mu.Lock()
		defer mu.Unlock()
		calls = append(calls, cmd+" "+string(args))
		switch cmd {
		case "query-block-jobs":
			polls++
			switch {
			case polls == 1:
				return reply{ret: []map[string]any{{"device": "mirror0", "type": "mirror", "len": 100, "offset": 10, "ready": false, "status": "running"}}}
			case polls == 2:
				return reply{ret: []map[string]any{{"device": "mirror0", "type": "mirror", "len": 100, "offset": 100, "ready": true, "status": "ready"}}}
			case polls == 3:
				// The job failed: its end event precedes the reply.
				return reply{ret: []any{}, events: []string{`BLOCK_JOB_COMPLETED {"device": "mirror1", "type": "mirror", "len": 100, "offset": 40, "speed": 0, "error": "Input/output error"}`}}
			default:
				return reply{ret: []any{}}
			}
		}
		return reply{}
	})
	c := dialFake(t, f)
	ctx := t.Context()
	if err := c.NBDServerStartUnix(ctx, "/x/nbd.sock"); err != nil {
		t.Fatal(err)
	}
	if err := c.BlockdevMirror(ctx, "mirror0", "disk0", "nbd-target", "full", 0); err != nil {
		t.Fatal(err)
	}
	var offsets []int64
	if err := c.WaitBlockJobReady(ctx, "mirror0", time.Millisecond, func(j BlockJob) { offsets = append(offsets, j.Offset) }); err != nil {
		t.Fatal(err)
	}
	if len(offsets) != 2 || offsets[1] != 100 {
		t.Errorf("offsets = %v", offsets)
	}
	err := c.WaitBlockJobReady(ctx, "mirror1", time.Millisecond, nil)
	if !errors.Is(err, ErrJobFailed) {
		t.Fatalf("WaitBlockJobReady = %v, want ErrJobFailed", err)
	}
	if err := c.WaitBlockJobReady(ctx, "mirror2", time.Millisecond, nil); !errors.Is(err, ErrJobGone) {
		t.Fatalf("WaitBlockJobReady = %v, want ErrJobGone", err)
	}
	if err := c.WaitBlockJobGone(ctx, "mirror1", time.Millisecond); !errors.Is(err, ErrJobFailed) {
		t.Fatalf("WaitBlockJobGone = %v, want ErrJobFailed", err)
	}

	mu.Lock()
	defer mu.Unlock()
	want := []string{
		`nbd-server-start {"addr":{"data":{"path":"/x/nbd.sock"},"type":"unix"}}`,
		`blockdev-mirror {"device":"disk0","job-id":"mirror0","sync":"full","target":"nbd-target"}`,
	}
	for i, w := range want {
		if calls[i] != w {
			t.Errorf("call %d = %s, want %s", i, calls[i], w)
		}
	}
}

func TestNilArgumentsOmitted(t *testing.T) {
	var got []string
	var mu sync.Mutex
	f := startFake(t, func(cmd string, args json.RawMessage) reply {
		mu.Lock()
		got = append(got, string(args))
		mu.Unlock()
		return reply{}
	})
	c := dialFake(t, f)
	var m map[string]any
	var p *struct{}
	for _, a := range []any{nil, m, p} {
		if err := c.Execute(t.Context(), "x", a, nil); err != nil {
			t.Fatal(err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	for _, g := range got {
		if g != "" {
			t.Errorf("arguments sent as %q, want omitted", g)
		}
	}
}
