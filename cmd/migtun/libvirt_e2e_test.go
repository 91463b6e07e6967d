package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/internal/vmtest"
)

// libvirtRig is two libvirt QEMU daemons, "hosts" a and b, each in its own
// mount namespace (scripts/libvirt-hosts.sh), and a migtun serve in each
// namespace: b routes libvirt to its daemon and main and nbd to session,
// both use /run/migtun as --socket-dir. /run/migtun, /var/lib/libvirt and
// the rest are private per host, so the source migtun's session sockets and
// the destination QEMU's listening sockets have the same paths, as libvirt's
// UNIX-socket migration requires, without colliding.
type libvirtRig struct {
	gen            libvirtGen
	dir, script    string
	uriA, uriB     string
	srcCtl, dstCtl string
	dstAddr        string
}

// requireRoot is requireTool for running as root: libvirtd in system mode
// and mount namespaces need it.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("the libvirt end-to-end test needs root (libvirtd, mount namespaces)")
	}
	t.Skip("the libvirt end-to-end test needs root (libvirtd, mount namespaces)")
}

// libvirtGen is a libvirt generation and the QEMU generation it drives:
// Debian 12's libvirt 9.0 with QEMU 7.2, and libvirt 11.3 unpacked into a
// prefix by scripts/libvirt-next.sh with QEMU 10.0.
type libvirtGen struct {
	name   string // "9.0", "11.3"
	prefix string // "" for the system's libvirt
	qemu   string // the QEMU generation
}

var libvirtGens = []libvirtGen{
	{"9.0", "", "7.2"},
	{"11.3", libvirtNextPrefix(), "10.0"},
}

// libvirtNextPrefix is where scripts/libvirt-next.sh unpacks libvirt 11.3.
func libvirtNextPrefix() string {
	if p := os.Getenv("MIGTUN_LIBVIRT_NEXT"); p != "" {
		return p
	}
	return "/opt/migtun/libvirt-11.3"
}

// env is the environment of the generation's libvirt-hosts.sh and virsh.
func (g libvirtGen) env() []string {
	if g.prefix == "" {
		return os.Environ()
	}
	return append(os.Environ(), "LIBVIRT_PREFIX="+g.prefix,
		"LD_LIBRARY_PATH="+filepath.Join(g.prefix, "usr/lib/x86_64-linux-gnu"))
}

// virshBin is the generation's virsh.
func (g libvirtGen) virshBin() string {
	if g.prefix == "" {
		return "virsh"
	}
	return filepath.Join(g.prefix, "usr/bin/virsh")
}

// version is what the generation's libvirtd reports ("libvirtd (libvirt)
// 11.3.0"); it fails the test (under CI=true) or skips it when that
// libvirt is not installed.
func (g libvirtGen) version(t *testing.T) string {
	t.Helper()
	bin := "libvirtd"
	if g.prefix != "" {
		bin = filepath.Join(g.prefix, "usr/sbin/libvirtd")
	}
	cmd := exec.Command(bin, "--version")
	cmd.Env = g.env()
	out, err := cmd.Output()
	v := strings.TrimSpace(string(out))
	if err != nil || !strings.Contains(v, " "+g.name+".") {
		cannot(t, "no libvirt %s (%s --version: %q, %v); scripts/libvirt-next.sh installs 11.3", g.name, bin, v, err)
	}
	return v
}

func newLibvirtRig(t *testing.T, g libvirtGen, q vmtest.QEMU) *libvirtRig {
	t.Helper()
	for _, tool := range []string{"unshare", "nsenter"} {
		requireTool(t, tool)
	}
	if g.prefix == "" {
		requireTool(t, "libvirtd")
		requireTool(t, "virsh")
	}
	requireRoot(t)
	t.Logf("running against libvirt %s with %s", g.version(t), q)
	script, err := filepath.Abs("../../scripts/libvirt-hosts.sh")
	if err != nil {
		t.Fatal(err)
	}
	r := &libvirtRig{gen: g, dir: shortTempDir(t), script: script}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := exec.CommandContext(ctx, script, "start", r.dir)
	start.Env = g.env()
	out, err := start.Output()
	t.Cleanup(func() {
		if t.Failed() {
			for _, h := range []string{"a", "b"} {
				t.Logf("host %s libvirtd log:\n%s", h, tail(filepath.Join(r.dir, h, "libvirtd.log"), 30))
			}
		}
		stop := exec.Command(script, "stop", r.dir)
		stop.Env = g.env()
		if out, err := stop.CombinedOutput(); err != nil {
			t.Errorf("stopping the libvirt daemons: %v\n%s", err, out)
		}
	})
	if err != nil {
		t.Fatalf("starting two libvirt daemons: %v\n%s", err, stderrOf(err))
	}
	uris := strings.Fields(string(out))
	if len(uris) != 2 {
		t.Fatalf("libvirt-hosts.sh start printed %q", out)
	}
	r.uriA, r.uriB = uris[0], uris[1]

	ca := pki(t, "src", "dst")
	// The control sockets live in a directory only root can enter.
	r.srcCtl, r.dstCtl = "unix:"+filepath.Join(r.dir, "ctl", "src.ctl"), "unix:"+filepath.Join(r.dir, "ctl", "dst.ctl")
	in := func(host string) []string { return []string{script, "exec", r.dir, host} }
	dst := startServe(t, ca, "dst", in("b"), "--socket-dir", "/run/migtun", "--control", r.dstCtl,
		"--route", "libvirt=unix:"+filepath.Join(r.dir, "b", "sock", "libvirt-sock"),
		"--route", "main=session", "--route", "nbd=session")
	startServe(t, ca, "src", in("a"), "--socket-dir", "/run/migtun", "--control", r.srcCtl)
	r.dstAddr = dst.Addr
	return r
}

func stderrOf(err error) string {
	if ee, ok := err.(*exec.ExitError); ok {
		return string(ee.Stderr)
	}
	return ""
}

func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	l := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// virsh runs the generation's virsh against uri and returns its trimmed
// output.
func (r *libvirtRig) virsh(t *testing.T, uri string, args ...string) string {
	t.Helper()
	out, err := r.virshErr(uri, args...)
	if err != nil {
		t.Fatalf("virsh %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func (r *libvirtRig) virshErr(uri string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, r.gen.virshBin(), append([]string{"-c", uri}, args...)...)
	cmd.Env = r.gen.env()
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// hostPath is where a path in host's private directories (see
// libvirt-hosts.sh) is in the test's own mount namespace.
func (r *libvirtRig) hostPath(host, path string) string {
	for _, m := range []struct{ in, out string }{{"/var/lib/libvirt/", "lib/"}, {"/var/log/libvirt/", "log/"}, {"/run/migtun/", "migtun/"}} {
		if rest, ok := strings.CutPrefix(path, m.in); ok {
			return filepath.Join(r.dir, host, m.out, rest)
		}
	}
	panic("no host path for " + path)
}

// TestLibvirtMigration migrates a running libvirt domain with its disk
// (--copy-storage-all) from one libvirt daemon to another through a migtun
// session, with libvirt's own virsh: peer to peer (the source daemon reaches
// the destination daemon through the session's libvirt channel, the command
// printed by "migtun session prepare --libvirt") and managed direct (virsh
// reaches both daemons, only main and nbd go through migtun). The domain
// must run on the destination afterwards, the disks must be identical, and
// both migtuns must agree on the session's streams and bytes.
//
// It runs libvirt 9.0 with QEMU 7.2 and libvirt 11.3 with QEMU 10.0, the
// generations selected by MIGTUN_QEMU (see vmtest.Selected).
func TestLibvirtMigration(t *testing.T) {
	selected, err := vmtest.Selected()
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range libvirtGens {
		if !slices.Contains(selected, g.qemu) {
			continue
		}
		t.Run("libvirt-"+g.name+"/qemu-"+g.qemu, func(t *testing.T) {
			testLibvirtMigration(t, g, vmtest.Require(t, g.qemu))
		})
	}
}

func testLibvirtMigration(t *testing.T, g libvirtGen, q vmtest.QEMU) {
	r := newLibvirtRig(t, g, q)
	const diskSize = 32 << 20
	domType := "qemu"
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
		f.Close()
		domType = "kvm"
	}
	for i, tc := range []struct {
		name string
		p2p  bool
	}{{"p2p", true}, {"direct", false}} {
		t.Run(tc.name, func(t *testing.T) {
			name := "mtvm-" + tc.name
			image := "/var/lib/libvirt/images/" + name + ".img"
			srcImg, dstImg := r.hostPath("a", image), r.hostPath("b", image)
			// The source disk is random; the destination's is an empty file
			// of the same size, which libvirt requires to exist.
			f, err := os.Create(srcImg)
			if err != nil {
				t.Fatal(err)
			}
			err = vmtest.FillRandom(context.Background(), f, diskSize, uint64(i+1))
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(dstImg, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(dstImg, diskSize); err != nil {
				t.Fatal(err)
			}
			xml := filepath.Join(r.dir, name+".xml")
			if err := os.WriteFile(xml, []byte(fmt.Sprintf(domainXML, domType, name, q.Binary, image)), 0o644); err != nil {
				t.Fatal(err)
			}
			r.virsh(t, r.uriA, "define", xml)
			t.Cleanup(func() {
				if t.Failed() {
					for _, h := range []string{"a", "b"} {
						t.Logf("host %s QEMU log:\n%s", h, tail(r.hostPath(h, "/var/log/libvirt/qemu/"+name+".log"), 20))
					}
				}
				r.virshErr(r.uriB, "destroy", name)
				r.virshErr(r.uriA, "destroy", name)
				r.virshErr(r.uriA, "undefine", name)
			})
			r.virsh(t, r.uriA, "start", name)

			channels := []string{"main", "nbd"}
			if tc.p2p {
				channels = append([]string{"libvirt"}, channels...)
			}
			info, printed := r.prepareLibvirt(t, channels...)
			lv := map[string]string{}
			for _, c := range info.Channels {
				lv[c.Name] = c.LibvirtURI
			}
			var args []string
			if tc.p2p {
				want := fmt.Sprintf("virsh migrate --live --p2p --copy-storage-all DOMAIN --desturi '%s' --migrateuri %s --disks-uri %s",
					lv["libvirt"], lv["main"], lv["nbd"])
				if printed != want {
					t.Fatalf("session prepare --libvirt printed\n%s\nwant\n%s", printed, want)
				}
				// Run what was printed, with the domain's name.
				for _, a := range strings.Fields(printed)[1:] {
					if a == "DOMAIN" {
						a = name
					}
					args = append(args, strings.Trim(a, "'"))
				}
			} else {
				args = []string{"migrate", "--live", "--copy-storage-all", name, "--desturi", r.uriB,
					"--migrateuri", lv["main"], "--disks-uri", lv["nbd"]}
			}
			t.Logf("virsh -c %s %s", r.uriA, strings.Join(args, " "))
			start := time.Now()
			r.virsh(t, r.uriA, args...)
			t.Logf("virsh migrate took %v", time.Since(start).Round(time.Millisecond))

			if st := r.virsh(t, r.uriB, "domstate", name); st != "running" {
				t.Fatalf("on the destination the domain is %q, want running", st)
			}
			if st := r.virsh(t, r.uriA, "domstate", name); st != "shut off" {
				t.Fatalf("on the source the domain is %q, want shut off", st)
			}

			rep := r.finish(t, info.ID)
			for _, c := range rep.Session.Channels {
				if c.Streams < 1 {
					t.Errorf("channel %s carried no stream", c.Name)
				}
				if c.Name == "nbd" && c.BytesForward < diskSize {
					t.Errorf("channel nbd carried %d bytes, less than the %d byte disk", c.BytesForward, diskSize)
				}
				t.Logf("finish: channel %-7s %d streams, %d bytes forward, %d back; the peer agrees", c.Name, c.Streams, c.BytesForward, c.BytesReturn)
			}

			// Stop the destination QEMU so the image is quiescent, then compare.
			r.virsh(t, r.uriB, "destroy", name)
			hs, err := vmtest.HashFile(srcImg)
			if err != nil {
				t.Fatal(err)
			}
			hd, err := vmtest.HashFile(dstImg)
			if err != nil {
				t.Fatal(err)
			}
			if hs != hd {
				t.Fatalf("disks differ after migration: source sha256 %s, destination %s", hs, hd)
			}
			t.Logf("disks identical: sha256 %s", hs)
			for _, h := range []string{"a", "b"} {
				if left, _ := os.ReadDir(r.hostPath(h, "/run/migtun/")); len(left) > 0 {
					t.Errorf("host %s: %d session sockets left in /run/migtun", h, len(left))
				}
			}
		})
	}
}

// domainXML is a minimal domain with one disk and no OS: it sits in the
// firmware, which is enough for QEMU to run and migrate its RAM and disk.
const domainXML = `<domain type='%s'>
  <name>%s</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>%s</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='%s'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
`

// prepareLibvirt runs "migtun session prepare --libvirt" on the source and
// returns the session and the virsh command it printed after the JSON.
func (r *libvirtRig) prepareLibvirt(t *testing.T, channels ...string) (control.SessionInfo, string) {
	t.Helper()
	args := []string{"session", "prepare", "--control", r.srcCtl, "--peer", r.dstAddr, "--libvirt"}
	for _, c := range channels {
		args = append(args, "--channel", c)
	}
	out, err := migtun(t, args...)
	if err != nil {
		t.Fatalf("session prepare: %v\n%s", err, out)
	}
	sr := strings.NewReader(out)
	dec := json.NewDecoder(sr)
	var info control.SessionInfo
	if err := dec.Decode(&info); err != nil {
		t.Fatalf("session prepare printed %q: %v", out, err)
	}
	rest, _ := io.ReadAll(io.MultiReader(dec.Buffered(), sr))
	return info, string(bytes.TrimSpace(rest))
}

func (r *libvirtRig) finish(t *testing.T, id string) control.FinishReport {
	t.Helper()
	return finishSession(t, r.srcCtl, id)
}
