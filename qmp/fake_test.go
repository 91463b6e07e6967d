package qmp

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// reply is what the fake QEMU answers to one command.
type reply struct {
	ret       any      // "return" value; nil means {}
	class     string   // error class; non-empty sends an error
	desc      string   // error description
	events    []string // events sent before the reply
	noReply   bool     // never answer
	closeConn bool     // close the connection instead of answering
}

// fakeQEMU is a QMP server on a UNIX socket that answers commands with a
// handler. It serves connections one at a time, like QEMU's monitor.
type fakeQEMU struct {
	path     string
	ln       net.Listener
	handler  func(cmd string, args json.RawMessage) reply
	greeting string // overrides the greeting when non-empty

	mu    sync.Mutex
	conns []net.Conn
	wg    sync.WaitGroup
}

const fakeGreeting = `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}}`

// socketDir returns a short temporary directory (UNIX socket paths are
// limited to 108 bytes) removed when the test ends.
func socketDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "qmpt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// newFake returns an unstarted fake server; call listen to start it.
func newFake(t *testing.T, handler func(cmd string, args json.RawMessage) reply) *fakeQEMU {
	f := &fakeQEMU{path: filepath.Join(socketDir(t), "qmp.sock"), handler: handler}
	t.Cleanup(f.stop)
	return f
}

// startFake starts a fake server and returns it.
func startFake(t *testing.T, handler func(cmd string, args json.RawMessage) reply) *fakeQEMU {
	t.Helper()
	f := newFake(t, handler)
	if err := f.listen(); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fakeQEMU) listen() error {
	ln, err := net.Listen("unix", f.path)
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.ln = ln
	f.mu.Unlock()
	f.wg.Add(1)
	go f.acceptLoop(ln)
	return nil
}

func (f *fakeQEMU) acceptLoop(ln net.Listener) {
	defer f.wg.Done()
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		f.mu.Lock()
		f.conns = append(f.conns, conn)
		f.mu.Unlock()
		f.serve(conn) // one client at a time, like QEMU
	}
}

// stop closes the listener and every connection and waits for the server.
func (f *fakeQEMU) stop() {
	f.mu.Lock()
	if f.ln != nil {
		f.ln.Close()
	}
	for _, c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}

func (f *fakeQEMU) serve(conn net.Conn) {
	defer conn.Close()
	greeting := f.greeting
	if greeting == "" {
		greeting = fakeGreeting
	}
	if greeting == "none" {
		// Hold the connection open without greeting until stopped.
		var b [1]byte
		conn.Read(b[:])
		return
	}
	w := bufio.NewWriter(conn)
	send := func(s string) bool {
		w.WriteString(s + "\r\n")
		return w.Flush() == nil
	}
	if !send(greeting) {
		return
	}
	dec := json.NewDecoder(conn)
	negotiated := false
	for {
		var cmd struct {
			Execute   string          `json:"execute"`
			Arguments json.RawMessage `json:"arguments"`
			ID        json.RawMessage `json:"id"`
		}
		if err := dec.Decode(&cmd); err != nil {
			return
		}
		idPart := ""
		if cmd.ID != nil {
			idPart = `, "id": ` + string(cmd.ID)
		}
		if cmd.Execute == "qmp_capabilities" {
			negotiated = true
			if !send(event("NEGOTIATED_TEST") + "\n" + `{"return": {}` + idPart + `}`) {
				return
			}
			continue
		}
		if !negotiated {
			send(`{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}` + idPart + `}`)
			continue
		}
		r := f.handler(cmd.Execute, cmd.Arguments)
		for _, e := range r.events {
			if !send(event(e)) {
				return
			}
		}
		switch {
		case r.closeConn:
			return
		case r.noReply:
			continue
		case r.class != "":
			b, _ := json.Marshal(map[string]string{"class": r.class, "desc": r.desc})
			if !send(`{"error": ` + string(b) + idPart + `}`) {
				return
			}
		default:
			ret := r.ret
			if ret == nil {
				ret = map[string]any{}
			}
			b, err := json.Marshal(ret)
			if err != nil {
				panic(err)
			}
			if !send(`{"return": ` + string(b) + idPart + `}`) {
				return
			}
		}
	}
}

// event formats an event; names of the form "NAME {json}" carry data.
func event(spec string) string {
	name, data := spec, "{}"
	for i := range spec {
		if spec[i] == ' ' {
			name, data = spec[:i], spec[i+1:]
			break
		}
	}
	return fmt.Sprintf(`{"timestamp": {"seconds": 1, "microseconds": 2}, "event": %q, "data": %s}`, name, data)
}
