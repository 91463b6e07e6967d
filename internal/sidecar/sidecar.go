// Package sidecar runs "migtun serve" as a child process for the
// end-to-end tests and the demo: it starts the binary, waits for its ready
// line, and stops it with SIGTERM.
package sidecar

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// Proc is a running "migtun serve".
type Proc struct {
	// Addr is the tunnel port it listens on, read from its ready line.
	Addr string
	// Control are its control endpoints ("unix:PATH", "tcp:HOST:PORT"),
	// read from its ready line.
	Control []string
	// LogPath is the file its stderr goes to.
	LogPath string

	cmd     *exec.Cmd
	wrapped bool
	exited  chan struct{}
	err     error
	killed  atomic.Bool
}

var readyRE = regexp.MustCompile(`ready: listening on (\S+) .*control: \[([^\]]*)\]`)

// Start runs bin with args (its first argument is the subcommand, "serve"),
// optionally under wrap (for example strace and its flags), sends its
// stderr to logPath and waits up to 30 seconds for its ready line.
func Start(bin string, wrap []string, logPath string, args ...string) (*Proc, error) {
	argv := append(append([]string{}, wrap...), bin)
	argv = append(argv, args...)
	p := &Proc{cmd: exec.Command(argv[0], argv[1:]...), wrapped: len(wrap) > 0, LogPath: logPath, exited: make(chan struct{})}
	// If the test or demo dies, its sidecars die with it.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	p.cmd.Stderr = logf
	stdout, err := p.cmd.StdoutPipe()
	if err != nil {
		logf.Close()
		return nil, err
	}
	if err := p.cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	ready := make(chan []string, 1)
	go func() { // ends when the process closes its stdout
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if m := readyRE.FindStringSubmatch(sc.Text()); m != nil {
				select {
				case ready <- m:
				default:
				}
			}
		}
	}()
	go func() { // ends when the process exits
		p.err = p.cmd.Wait()
		logf.Close()
		close(p.exited)
	}()
	select {
	case m := <-ready:
		p.Addr, p.Control = m[1], strings.Fields(m[2])
		return p, nil
	case <-p.exited:
		return nil, fmt.Errorf("migtun serve exited before it was ready (%v):\n%s", p.err, p.Log(20))
	case <-time.After(30 * time.Second):
		p.Kill()
		return nil, fmt.Errorf("migtun serve not ready after 30s:\n%s", p.Log(20))
	}
}

// Log returns the last n lines of the process's stderr.
func (p *Proc) Log(n int) string {
	b, _ := os.ReadFile(p.LogPath)
	l := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// PID returns migtun's process ID, also when it runs under a wrapper.
func (p *Proc) PID() int { return p.pid() }

// pid returns the process to signal: migtun itself, also when wrapped.
func (p *Proc) pid() int {
	pid := p.cmd.Process.Pid
	if p.wrapped {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
		if f := strings.Fields(string(b)); err == nil && len(f) > 0 {
			if child, err := strconv.Atoi(f[0]); err == nil {
				return child
			}
		}
	}
	return pid
}

// ErrStopTimeout is returned by Stop when the process had to be killed.
var ErrStopTimeout = errors.New("sidecar: migtun did not stop in time after SIGTERM and was killed")

// Stop sends SIGTERM and waits up to timeout for the process to exit; it
// returns the exit error, if any (none for a process Kill ended). Stop may
// be called more than once.
func (p *Proc) Stop(timeout time.Duration) error {
	select {
	case <-p.exited:
		if p.killed.Load() {
			return nil
		}
		return p.err
	default:
	}
	syscall.Kill(p.pid(), syscall.SIGTERM)
	select {
	case <-p.exited:
		return p.err
	case <-time.After(timeout):
		p.Kill()
		return ErrStopTimeout
	}
}

// Kill kills the process at once and waits for it.
func (p *Proc) Kill() {
	p.killed.Store(true)
	syscall.Kill(p.pid(), syscall.SIGKILL)
	p.cmd.Process.Kill()
	<-p.exited
}
