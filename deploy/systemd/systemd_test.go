package systemd

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/migtun/migtun/deploy/internal/testbin"
)

// maxExposure is the highest `systemd-analyze security --offline=yes`
// exposure level allowed for migtun.service (0 is best, 10 worst). The
// unit scores 1.2 with systemd 252; running as root would add 0.4.
const maxExposure = 1.5

// installedBinary is where the unit expects migtun.
const installedBinary = "/usr/local/bin/migtun"

func TestMain(m *testing.M) {
	code := m.Run()
	testbin.Cleanup()
	os.Exit(code)
}

func loadUnit(t *testing.T) (Unit, map[string]string) {
	t.Helper()
	u, err := ParseUnit("migtun.service")
	if err != nil {
		t.Fatal(err)
	}
	env, err := ParseEnvFile("migtun.env")
	if err != nil {
		t.Fatal(err)
	}
	return u, env
}

// TestVerify runs systemd-analyze verify on the unit, with ExecStart's
// binary path pointing at a freshly built migtun (verify checks that the
// command exists) and nothing else changed.
func TestVerify(t *testing.T) {
	analyze := testbin.NeedTool(t, "systemd-analyze")
	bin := testbin.Migtun(t)
	data, err := os.ReadFile("migtun.service")
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(data), "ExecStart="+installedBinary+" "); n != 1 {
		t.Fatalf("migtun.service: %d ExecStart lines running %s, want 1", n, installedBinary)
	}
	unit := filepath.Join(t.TempDir(), "migtun.service")
	data = []byte(strings.Replace(string(data), "ExecStart="+installedBinary+" ", "ExecStart="+bin+" ", 1))
	if err := os.WriteFile(unit, data, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", unit).CombinedOutput()
	if err != nil || len(out) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

var exposureLine = regexp.MustCompile(`Overall exposure level for migtun\.service: ([0-9.]+)`)

// TestSecurityExposure keeps the unit's offline exposure score at or below
// maxExposure.
func TestSecurityExposure(t *testing.T) {
	analyze := testbin.NeedTool(t, "systemd-analyze")
	out, err := exec.Command(analyze, "security", "--offline=yes", "--no-pager", "migtun.service").CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	m := exposureLine.FindSubmatch(out)
	if m == nil {
		t.Fatalf("no exposure level in:\n%s", out)
	}
	score, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("exposure level %.1f (at most %.1f)", score, maxExposure)
	if score > maxExposure {
		t.Errorf("exposure level %.1f, want at most %.1f:\n%s", score, maxExposure, out)
	}
}

// TestDrainWithinStopTimeout checks that the drain timeout the environment
// file sets ends before systemd would kill migtun.
func TestDrainWithinStopTimeout(t *testing.T) {
	u, env := loadUnit(t)
	drain, err := time.ParseDuration(env["MIGTUN_DRAIN_TIMEOUT"])
	if err != nil {
		t.Fatalf("MIGTUN_DRAIN_TIMEOUT: %v", err)
	}
	stop, err := time.ParseDuration(u.Get("Service", "TimeoutStopSec"))
	if err != nil {
		t.Fatalf("TimeoutStopSec: %v", err)
	}
	if drain+5*time.Second > stop {
		t.Errorf("--drain-timeout %v leaves less than 5s of TimeoutStopSec %v", drain, stop)
	}
	if got := u.Get("Service", "KillSignal"); got != "SIGTERM" {
		t.Errorf("KillSignal=%s, want SIGTERM (migtun drains on it)", got)
	}
}

// TestOptsExample checks that the MIGTUN_OPTS example in the environment
// file parses with migtun serve's flags.
func TestOptsExample(t *testing.T) {
	u, env := loadUnit(t)
	data, err := os.ReadFile("migtun.env")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^# MIGTUN_OPTS=(.+)$`).FindSubmatch(data)
	if m == nil {
		t.Fatal("no MIGTUN_OPTS example in migtun.env")
	}
	env["MIGTUN_OPTS"] = string(m[1])
	env["RUNTIME_DIRECTORY"] = "/run/migtun"
	args, err := ExpandCommand(u.Get("Service", "ExecStart"), env)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := testbin.CheckServeArgs(testbin.Migtun(t), args[2:]); err != nil {
		t.Error(err)
	}
}

// TestExecStartServes starts the unit's ExecStart command line, expanded
// from the environment file as systemd would, and checks that it serves:
// the control socket in the runtime directory answers /healthz, the
// metrics port answers /healthz and /metrics, logs are JSON lines, and SIGTERM stops it
// cleanly. Only what cannot be the same on a test machine is replaced: the
// certificate files, loopback ports, and the runtime directory systemd
// would make.
func TestExecStartServes(t *testing.T) {
	bin := testbin.Migtun(t)
	u, env := loadUnit(t)
	dir := t.TempDir()
	pki := filepath.Join(dir, "pki")
	for _, args := range [][]string{{"certs", "init", "--dir", pki}, {"certs", "issue", "--dir", pki, "--name", "host-a", "--san", "127.0.0.1"}} {
		if out, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
			t.Fatalf("migtun %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	runtimeDir := filepath.Join(dir, "run-migtun")
	if err := os.Mkdir(runtimeDir, 0o700); err != nil {
		t.Fatal(err)
	}
	for k, v := range map[string]string{
		"MIGTUN_CERT":           filepath.Join(pki, "host-a.crt"),
		"MIGTUN_KEY":            filepath.Join(pki, "host-a.key"),
		"MIGTUN_CA":             filepath.Join(pki, "ca.crt"),
		"MIGTUN_LISTEN":         "127.0.0.1:0",
		"MIGTUN_METRICS_LISTEN": freePort(t),
		"RUNTIME_DIRECTORY":     runtimeDir,
	} {
		if _, ok := env[k]; !ok && k != "RUNTIME_DIRECTORY" {
			t.Fatalf("migtun.env does not set %s", k)
		}
		env[k] = v
	}
	args, err := ExpandCommand(u.Get("Service", "ExecStart"), env)
	if err != nil {
		t.Fatal(err)
	}
	if args[0] != installedBinary {
		t.Fatalf("ExecStart runs %s, want %s", args[0], installedBinary)
	}
	t.Logf("running %q", args)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args[1:]...)
	cmd.Env = append(os.Environ(), "RUNTIME_DIRECTORY="+runtimeDir)
	if os.Geteuid() == 0 {
		// As User= would: not root, owning the runtime directory, and
		// reading the key through its group.
		runAs(t, cmd, dir, runtimeDir, filepath.Join(pki, "host-a.crt"), filepath.Join(pki, "host-a.key"))
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	logs := make(chan []string, 1)
	go func() { logs <- readLines(stderr) }()
	ready := make(chan error, 1)
	go func() { ready <- waitReady(stdout) }()
	if err := <-ready; err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("no ready line: %v; logs:\n%s", err, strings.Join(<-logs, "\n"))
	}

	control := filepath.Join(runtimeDir, "control.sock")
	uc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", control)
	}}, Timeout: 10 * time.Second}
	body := get(t, uc, "http://control/healthz")
	var health struct{ Status string }
	if err := json.Unmarshal(body, &health); err != nil || health.Status != "ok" {
		t.Errorf("control /healthz: %q (%v), want status ok", body, err)
	}
	hc := &http.Client{Timeout: 10 * time.Second}
	body = get(t, hc, "http://"+env["MIGTUN_METRICS_LISTEN"]+"/healthz")
	if err := json.Unmarshal(body, &health); err != nil || health.Status != "ok" {
		t.Errorf("metrics port /healthz: %q (%v), want status ok", body, err)
	}
	metrics := get(t, hc, "http://"+env["MIGTUN_METRICS_LISTEN"]+"/metrics")
	if !strings.Contains(string(metrics), "\nmigtun_") && !strings.HasPrefix(string(metrics), "migtun_") {
		t.Errorf("/metrics has no migtun_ series:\n%.500s", metrics)
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	werr := cmd.Wait()
	lines := <-logs
	if werr != nil {
		t.Errorf("after SIGTERM: %v; logs:\n%s", werr, strings.Join(lines, "\n"))
	}
	if _, err := os.Stat(control); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("control socket left behind: %v", err)
	}
	if len(lines) == 0 {
		t.Error("no log lines")
	}
	for _, l := range lines {
		var rec struct{ Time, Level, Msg string }
		if err := json.Unmarshal([]byte(l), &rec); err != nil || rec.Level == "" || rec.Msg == "" {
			t.Errorf("log line is not a JSON record with level and msg: %q", l)
		}
	}
}

// serviceUID is the user TestExecStartServes runs migtun as when the test
// runs as root, standing in for the unit's User=migtun.
const serviceUID = 65532

// runAs makes cmd run as serviceUID, gives it runtimeDir, the group of
// the certificate and key files, and a way through dir (a test's temporary
// directory, 0700).
func runAs(t *testing.T, cmd *exec.Cmd, dir, runtimeDir string, files ...string) {
	t.Helper()
	for _, p := range []string{dir, filepath.Dir(dir)} {
		if err := os.Chmod(p, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chown(runtimeDir, serviceUID, serviceUID); err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if err := os.Chmod(filepath.Dir(f), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(f, 0, serviceUID); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(f, 0o640); err != nil {
			t.Fatal(err)
		}
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: serviceUID, Gid: serviceUID}}
}

// freePort returns a loopback address no one listens on right now.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// waitReady reads stdout until the line serve prints once every socket is
// up, then drains the rest.
func waitReady(r io.Reader) error {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "migtun ready") {
			go io.Copy(io.Discard, r)
			return nil
		}
	}
	if err := sc.Err(); err != nil {
		return err
	}
	return io.ErrUnexpectedEOF
}

func readLines(r io.Reader) []string {
	var lines []string
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	return lines
}

func get(t *testing.T, c *http.Client, url string) []byte {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s %v\n%s", url, resp.Status, err, body)
	}
	return body
}
