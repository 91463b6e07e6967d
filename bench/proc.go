package bench

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// clockTicks is USER_HZ, the unit of the times in /proc/PID/stat; Linux
// fixes it at 100 for user space on every architecture Go supports.
const clockTicks = 100

// proc is a helper process of a path: a migtun, a relay hop, socat or
// stunnel.
type proc struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
	err     error
	// ready receives the first submatch of the ready pattern, if any.
	ready chan string
}

// startProc runs argv with its stdout and stderr going to a log file in
// dir. If readyRE is not nil, the first line of output it matches is sent
// on p.ready (its first submatch, or the whole line).
func startProc(dir, name string, readyRE *regexp.Regexp, argv ...string) (*proc, error) {
	p := &proc{name: name, cmd: exec.Command(argv[0], argv[1:]...), exited: make(chan struct{}),
		ready: make(chan string, 1), logPath: filepath.Join(dir, name+".log")}
	logf, err := os.Create(p.logPath)
	if err != nil {
		return nil, err
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		logf.Close()
		return nil, err
	}
	p.cmd.Stdout, p.cmd.Stderr = pw, pw
	if err := p.cmd.Start(); err != nil {
		logf.Close()
		pr.Close()
		pw.Close()
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	pw.Close()
	go p.scan(pr, logf, readyRE) // ends when the process and its children close the pipe
	go func() {                  // ends when the process exits
		p.err = p.cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// scan copies the process's output to its log and watches for the ready
// line.
func (p *proc) scan(r io.ReadCloser, logf *os.File, readyRE *regexp.Regexp) {
	defer r.Close()
	defer logf.Close()
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		fmt.Fprintln(logf, line)
		if readyRE == nil {
			continue
		}
		if m := readyRE.FindStringSubmatch(line); m != nil {
			v := m[0]
			if len(m) > 1 {
				v = m[1]
			}
			select {
			case p.ready <- v:
			default:
			}
		}
	}
}

// waitReady waits for the ready line and returns its submatch.
func (p *proc) waitReady(timeout time.Duration) (string, error) {
	select {
	case v := <-p.ready:
		return v, nil
	case <-p.exited:
		return "", fmt.Errorf("%s exited before it was ready (%v):\n%s", p.name, p.err, p.tail(15))
	case <-time.After(timeout):
		return "", fmt.Errorf("%s not ready after %s:\n%s", p.name, timeout, p.tail(15))
	}
}

// waitFor polls cond until it holds, the process exits or timeout passes.
func (p *proc) waitFor(timeout time.Duration, what string, cond func() bool) error {
	deadline := time.Now().Add(timeout)
	for !cond() {
		select {
		case <-p.exited:
			return fmt.Errorf("%s exited before %s (%v):\n%s", p.name, what, p.err, p.tail(15))
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: no %s after %s:\n%s", p.name, what, timeout, p.tail(15))
		}
	}
	return nil
}

// tail returns the last n lines of the process's output.
func (p *proc) tail(n int) string {
	b, _ := os.ReadFile(p.logPath)
	l := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// stop sends SIGTERM, waits up to timeout, then kills. It may be called
// more than once.
func (p *proc) stop(timeout time.Duration) {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(timeout):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// cpu returns the CPU time the process, its live descendants and the
// children it has reaped have used so far.
func (p *proc) cpu() time.Duration {
	return treeCPU(p.cmd.Process.Pid, 0)
}

func treeCPU(pid, depth int) time.Duration {
	// Children first: one reaped between the two reads is then counted in
	// the parent's cutime rather than lost.
	var sum time.Duration
	if depth < 8 {
		for _, c := range children(pid) {
			sum += treeCPU(c, depth+1)
		}
	}
	t, err := statCPU(pid)
	if err != nil {
		return sum
	}
	return sum + t
}

// statCPU reads utime+stime+cutime+cstime of pid.
func statCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	return parseStatCPU(string(b))
}

// parseStatCPU reads fields 14–17 (utime, stime, cutime, cstime) of a
// /proc/PID/stat line; the command name, field 2, may hold spaces and
// parentheses, so fields are counted after its last ')'.
func parseStatCPU(s string) (time.Duration, error) {
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("stat: no command name")
	}
	f := strings.Fields(s[i+1:]) // f[0] is field 3, the state
	if len(f) < 15 {
		return 0, errors.New("stat: too few fields")
	}
	var ticks int64
	for _, k := range f[11:15] { // fields 14..17
		v, err := strconv.ParseInt(k, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("stat: %w", err)
		}
		ticks += v
	}
	return time.Duration(ticks) * time.Second / clockTicks, nil
}

// children lists the child processes of pid, over all its threads.
func children(pid int) []int {
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	var out []int
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, t.Name()))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				out = append(out, c)
			}
		}
	}
	return out
}

// selfCPU returns the CPU time of the calling process (every thread).
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// tcpListening reports whether something listens on TCP port in p's
// network namespace, from /proc/PID/net/tcp, without connecting to it.
func (p *proc) tcpListening(port int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/tcp", p.cmd.Process.Pid))
	if err != nil {
		return false
	}
	want := fmt.Sprintf(":%04X", port)
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) > 3 && strings.HasSuffix(f[1], want) && f[3] == "0A" {
			return true
		}
	}
	return false
}

// exists reports whether path exists (a UNIX socket being listened on).
func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
