package kubernetes

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/migtun/migtun/deploy/internal/testbin"
)

// TestDaemonSetServes runs the DaemonSet's container as the kubelet would
// on a node: its arguments with $(NODE_IP) set to an address of this
// machine (a random one of 127/8, so the fixed ports are unlikely to be
// taken), its hostPath and Secret mounts at temporary directories (the
// Secret laid out as the kubelet lays it out), as the pod's user when the
// test runs as root; then it makes the probes' and Prometheus's requests
// and stops it with SIGTERM.
func TestDaemonSetServes(t *testing.T) {
	bin := testbin.Migtun(t)
	_, o := load(t)
	spec := o.daemonSets[0].Spec.Template.Spec
	c := spec.Containers[0]
	nodeIP := fmt.Sprintf("127.%d.%d.%d", rand.IntN(256), rand.IntN(256), 1+rand.IntN(254))
	env := map[string]string{}
	for _, e := range c.Env {
		if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.hostIP" {
			env[e.Name] = nodeIP
		} else if e.ValueFrom == nil {
			env[e.Name] = e.Value
		} else {
			t.Fatalf("env %s: no value for %v", e.Name, e.ValueFrom)
		}
	}

	// The mounts, at temporary directories.
	vols := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		vols[v.Name] = v
	}
	local := map[string]string{} // mount path → directory here
	root := t.TempDir()
	// Run as the pod's user where the test can (as root), with the
	// kubelet's ownership of the volumes: the hostPath the host made for
	// that user, the Secret's files in the pod's fsGroup.
	psc := spec.SecurityContext
	asUser := os.Geteuid() == 0
	if asUser {
		for _, p := range []string{root, filepath.Dir(root)} {
			if err := os.Chmod(p, 0o711); err != nil {
				t.Fatal(err)
			}
		}
	}
	ca := newTestCA(t)
	for i, m := range c.VolumeMounts {
		dir := filepath.Join(root, strconv.Itoa(i))
		switch v := vols[m.Name]; {
		case v.HostPath != nil:
			if err := os.Mkdir(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			if asUser {
				if err := os.Chown(dir, int(*psc.RunAsUser), int(*psc.RunAsGroup)); err != nil {
					t.Fatal(err)
				}
			}
		case v.Secret != nil:
			(&secretVolume{dir: dir}).write(t, ca.secret(t, 7, time.Now().Add(24*time.Hour)))
			if asUser {
				mode := os.FileMode(*v.Secret.DefaultMode)
				err := filepath.Walk(dir, func(path string, fi os.FileInfo, err error) error {
					if err != nil || fi.Mode()&os.ModeSymlink != 0 {
						return err
					}
					if err := os.Lchown(path, 0, int(*psc.FSGroup)); err != nil {
						return err
					}
					if fi.Mode().IsRegular() {
						return os.Chmod(path, mode)
					}
					return nil
				})
				if err != nil {
					t.Fatal(err)
				}
			}
		default:
			t.Fatalf("volume %s: neither hostPath nor Secret", m.Name)
		}
		local[m.MountPath] = dir
	}
	// Longest mount path first, so a mount inside another is mapped as itself.
	mounts := slices.SortedFunc(maps.Keys(local), func(a, b string) int { return len(b) - len(a) })
	var args []string
	for _, a := range c.Args {
		a = expand(a, env)
		for _, p := range mounts {
			a = regexp.MustCompile(regexp.QuoteMeta(p)+`(/|$)`).ReplaceAllString(a, local[p]+"$1")
		}
		args = append(args, a)
	}
	t.Logf("running migtun %q", args)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	if asUser {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{
			Uid: uint32(*psc.RunAsUser), Gid: uint32(*psc.RunAsGroup), Groups: []uint32{uint32(*psc.FSGroup)}}}
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var logs strings.Builder
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stdout)
	if !sc.Scan() || !strings.HasPrefix(sc.Text(), "migtun ready") {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("no ready line: %q\n%s", sc.Text(), logs.String())
	}
	go io.Copy(io.Discard, stdout)

	port := func(name string) string {
		for _, p := range c.Ports {
			if p.Name == name {
				return strconv.Itoa(int(p.ContainerPort))
			}
		}
		t.Fatalf("no port %q", name)
		return ""
	}
	hc := &http.Client{Timeout: 10 * time.Second}
	get := func(what, url string) string {
		resp, err := hc.Get(url)
		if err != nil {
			t.Errorf("%s: GET %s: %v", what, url, err)
			return ""
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Errorf("%s: GET %s: %s", what, url, resp.Status)
		}
		return string(body)
	}
	for name, p := range map[string]*corev1.Probe{"readiness": c.ReadinessProbe, "liveness": c.LivenessProbe} {
		get(name+" probe", "http://"+net.JoinHostPort(nodeIP, port(p.HTTPGet.Port.String()))+p.HTTPGet.Path)
	}
	ann := o.daemonSets[0].Spec.Template.Annotations
	if body := get("Prometheus", "http://"+net.JoinHostPort(nodeIP, ann["prometheus.io/port"])+ann["prometheus.io/path"]); !strings.Contains(body, "migtun_certificate_expiry_timestamp_seconds") {
		t.Errorf("scrape has no migtun metrics:\n%.300s", body)
	}
	// The tunnel port listens on the node's address.
	if conn, err := net.Dial("tcp", net.JoinHostPort(nodeIP, port("tunnel"))); err != nil {
		t.Errorf("tunnel port: %v", err)
	} else {
		conn.Close()
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("after SIGTERM: %v\n%s", err, logs.String())
	}
}
