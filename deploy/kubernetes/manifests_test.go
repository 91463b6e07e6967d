package kubernetes

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	monv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"

	"github.com/migtun/migtun/deploy/internal/testbin"
)

func TestMain(m *testing.M) {
	code := m.Run()
	testbin.Cleanup()
	os.Exit(code)
}

// kustomization is the part of kustomize's Kustomization these manifests
// use; decoding it strictly refuses any other field.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Namespace  string   `json:"namespace"`
	Resources  []string `json:"resources"`
	Images     []struct {
		Name    string `json:"name"`
		NewName string `json:"newName"`
		NewTag  string `json:"newTag"`
	} `json:"images"`
}

// objects are the decoded manifests, by kind.
type objects struct {
	namespaces      []*corev1.Namespace
	serviceAccounts []*corev1.ServiceAccount
	services        []*corev1.Service
	daemonSets      []*appsv1.DaemonSet
	issuers         []*cmapi.Issuer
	certificates    []*cmapi.Certificate
	podMonitors     []*monv1.PodMonitor
	all             []metav1.Object
}

// decode decodes one manifest strictly into the API type its apiVersion
// and kind name: an unknown field, a duplicate key or a wrong type fails.
func (o *objects) decode(name string, doc []byte) error {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return err
	}
	var obj metav1.Object
	switch tm.APIVersion + "/" + tm.Kind {
	case "v1/Namespace":
		v := &corev1.Namespace{}
		o.namespaces, obj = append(o.namespaces, v), v
	case "v1/ServiceAccount":
		v := &corev1.ServiceAccount{}
		o.serviceAccounts, obj = append(o.serviceAccounts, v), v
	case "v1/Service":
		v := &corev1.Service{}
		o.services, obj = append(o.services, v), v
	case "apps/v1/DaemonSet":
		v := &appsv1.DaemonSet{}
		o.daemonSets, obj = append(o.daemonSets, v), v
	case "cert-manager.io/v1/Issuer":
		v := &cmapi.Issuer{}
		o.issuers, obj = append(o.issuers, v), v
	case "cert-manager.io/v1/Certificate":
		v := &cmapi.Certificate{}
		o.certificates, obj = append(o.certificates, v), v
	case "monitoring.coreos.com/v1/PodMonitor":
		v := &monv1.PodMonitor{}
		o.podMonitors, obj = append(o.podMonitors, v), v
	default:
		return fmt.Errorf("%s: no API type known for apiVersion %q kind %q", name, tm.APIVersion, tm.Kind)
	}
	if err := yaml.UnmarshalStrict(doc, obj); err != nil {
		return fmt.Errorf("%s %s: %w", tm.Kind, obj.GetName(), err)
	}
	o.all = append(o.all, obj)
	return nil
}

// load decodes the kustomization and every resource it lists, and checks
// that it lists every manifest in the directory.
func load(t *testing.T) (*kustomization, *objects) {
	t.Helper()
	data, err := os.ReadFile("kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	k := &kustomization{}
	if err := yaml.UnmarshalStrict(data, k); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	if k.APIVersion != "kustomize.config.k8s.io/v1beta1" || k.Kind != "Kustomization" {
		t.Fatalf("kustomization.yaml: %s %s", k.APIVersion, k.Kind)
	}
	files, err := filepath.Glob("*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	files = slices.DeleteFunc(files, func(f string) bool { return f == "kustomization.yaml" })
	if got, want := slices.Sorted(slices.Values(k.Resources)), files; !slices.Equal(got, want) {
		t.Errorf("kustomization.yaml resources %q, want every manifest here: %q", got, want)
	}
	o := &objects{}
	for _, f := range k.Resources {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(data), -1) {
			if len(bytes.TrimSpace(stripComments([]byte(doc)))) == 0 {
				continue
			}
			if err := o.decode(fmt.Sprintf("%s document %d", f, i+1), []byte(doc)); err != nil {
				t.Error(err)
			}
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	return k, o
}

func stripComments(doc []byte) []byte {
	return regexp.MustCompile(`(?m)^\s*#.*$`).ReplaceAll(doc, nil)
}

// TestManifestsDecodeStrictly decodes every manifest and checks what ties
// them together: one namespace, names that refer to existing objects.
func TestManifestsDecodeStrictly(t *testing.T) {
	k, o := load(t)
	for _, obj := range o.all {
		if _, isNS := obj.(*corev1.Namespace); isNS {
			if obj.GetName() != k.Namespace {
				t.Errorf("Namespace %s, kustomization says %s", obj.GetName(), k.Namespace)
			}
			continue
		}
		if obj.GetNamespace() != k.Namespace {
			t.Errorf("%s: namespace %q, want %q", obj.GetName(), obj.GetNamespace(), k.Namespace)
		}
	}
	if len(o.daemonSets) != 1 || len(o.certificates) < 2 || len(o.issuers) < 2 || len(o.services) != 1 || len(o.podMonitors) != 1 {
		t.Fatalf("%d DaemonSets, %d Certificates, %d Issuers, %d Services, %d PodMonitors",
			len(o.daemonSets), len(o.certificates), len(o.issuers), len(o.services), len(o.podMonitors))
	}
	issuers := map[string]*cmapi.Issuer{}
	for _, is := range o.issuers {
		issuers[is.Name] = is
	}
	secrets := map[string]*cmapi.Certificate{}
	for _, c := range o.certificates {
		secrets[c.Spec.SecretName] = c
		if c.Spec.IssuerRef.Kind != "Issuer" || issuers[c.Spec.IssuerRef.Name] == nil {
			t.Errorf("Certificate %s: issuer %s %q is not here", c.Name, c.Spec.IssuerRef.Kind, c.Spec.IssuerRef.Name)
		}
	}
	for _, is := range o.issuers {
		if is.Spec.CA != nil {
			if c := secrets[is.Spec.CA.SecretName]; c == nil || !c.Spec.IsCA {
				t.Errorf("Issuer %s: CA secret %q is no CA Certificate's", is.Name, is.Spec.CA.SecretName)
			}
		}
	}
	ds := o.daemonSets[0]
	pod := ds.Spec.Template
	if sel, err := metav1.LabelSelectorAsSelector(ds.Spec.Selector); err != nil || !sel.Matches(labels.Set(pod.Labels)) {
		t.Errorf("DaemonSet selector %v does not select its pods %v", ds.Spec.Selector, pod.Labels)
	}
	for _, v := range pod.Spec.Volumes {
		if v.Secret == nil {
			continue
		}
		c := secrets[v.Secret.SecretName]
		if c == nil || c.Spec.IsCA {
			t.Errorf("volume %s: secret %q is no host Certificate's", v.Name, v.Secret.SecretName)
			continue
		}
		for _, u := range []cmapi.KeyUsage{cmapi.UsageServerAuth, cmapi.UsageClientAuth} {
			if !slices.Contains(c.Spec.Usages, u) {
				t.Errorf("Certificate %s lacks usage %q: migtun authenticates both ends", c.Name, u)
			}
		}
	}
	if pod.Spec.ServiceAccountName != o.serviceAccounts[0].Name {
		t.Errorf("pods run as service account %q, not %q", pod.Spec.ServiceAccountName, o.serviceAccounts[0].Name)
	}
	svc := o.services[0]
	if !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(pod.Labels)) {
		t.Errorf("Service %s selector %v does not select the pods", svc.Name, svc.Spec.Selector)
	}
	pm := o.podMonitors[0]
	if sel, err := metav1.LabelSelectorAsSelector(&pm.Spec.Selector); err != nil || !sel.Matches(labels.Set(pod.Labels)) {
		t.Errorf("PodMonitor selector %v does not select the pods", pm.Spec.Selector)
	}
	if image, _, _ := strings.Cut(pod.Spec.Containers[0].Image, ":"); len(k.Images) != 1 || k.Images[0].Name != image {
		t.Errorf("kustomization images %v do not name the container's image %q", k.Images, pod.Spec.Containers[0].Image)
	}
}

// expand replaces $(NAME) in s the way the kubelet does, from env.
func expand(s string, env map[string]string) string {
	return regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`).ReplaceAllStringFunc(s, func(ref string) string {
		if v, ok := env[ref[2:len(ref)-1]]; ok {
			return v
		}
		return ref
	})
}

// TestDaemonSet checks the migtun container: arguments accepted by migtun
// serve's flag parser, probes and scraping on the metrics port it serves,
// the host's socket directory, the certificate files of the mounted
// Secret, and the security settings.
func TestDaemonSet(t *testing.T) {
	_, o := load(t)
	ds := o.daemonSets[0]
	spec := ds.Spec.Template.Spec
	if len(spec.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(spec.Containers))
	}
	c := spec.Containers[0]
	// The values the kubelet would put in the environment on a node.
	env := map[string]string{}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.hostIP":
			env[e.Name] = "10.0.0.1"
		case e.ValueFrom == nil:
			env[e.Name] = e.Value
		default:
			t.Errorf("env %s: no sample value for %v", e.Name, e.ValueFrom)
		}
	}
	if len(c.Command) != 0 {
		t.Errorf("command %q overrides the image's entrypoint", c.Command)
	}
	var args []string
	for _, a := range c.Args {
		if a = expand(a, env); strings.Contains(a, "$(") {
			t.Errorf("argument %q refers to a variable the container does not set", a)
		}
		args = append(args, a)
	}
	if len(args) == 0 || args[0] != "serve" {
		t.Fatalf("args %q, want serve first", args)
	}
	settings, err := testbin.CheckServeArgs(testbin.Migtun(t), args[1:])
	if err != nil {
		t.Fatalf("container args: %v", err)
	}
	// What serve makes of its flags, as --print-config shows it.
	flag := func(name string) string {
		v, _ := settings[strings.ReplaceAll(name, "-", "_")].(string)
		return v
	}

	if ds.Spec.UpdateStrategy.Type != appsv1.OnDeleteDaemonSetStrategyType {
		t.Errorf("update strategy %q: a rolling update restarts migtun under migrations in flight; want OnDelete", ds.Spec.UpdateStrategy.Type)
	}
	if !spec.HostNetwork {
		t.Error("not on the host network: peers reach migtun at the node's address")
	}
	// Probes and Prometheus use --metrics-listen's port.
	_, mport, err := net.SplitHostPort(flag("metrics-listen"))
	if err != nil {
		t.Fatalf("--metrics-listen %q: %v", flag("metrics-listen"), err)
	}
	ports := map[string]corev1.ContainerPort{}
	for _, p := range c.Ports {
		ports[p.Name] = p
	}
	if strconv.Itoa(int(ports["metrics"].ContainerPort)) != mport {
		t.Errorf("port metrics %d, --metrics-listen port %s", ports["metrics"].ContainerPort, mport)
	}
	_, lport, _ := net.SplitHostPort(flag("listen"))
	if strconv.Itoa(int(ports["tunnel"].ContainerPort)) != lport {
		t.Errorf("port tunnel %d, --listen port %s", ports["tunnel"].ContainerPort, lport)
	}
	for name, p := range map[string]*corev1.Probe{"readiness": c.ReadinessProbe, "liveness": c.LivenessProbe} {
		if p == nil || p.HTTPGet == nil {
			t.Errorf("%s probe: want an HTTP GET of /healthz", name)
			continue
		}
		if p.HTTPGet.Path != "/healthz" || p.HTTPGet.Port.String() != "metrics" {
			t.Errorf("%s probe: GET %s on port %s, want /healthz on metrics", name, p.HTTPGet.Path, p.HTTPGet.Port.String())
		}
	}
	for _, ann := range []map[string]string{ds.Spec.Template.Annotations, o.services[0].Annotations} {
		if ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/port"] != mport || ann["prometheus.io/path"] != "/metrics" {
			t.Errorf("scrape annotations %v, want port %s", ann, mport)
		}
	}
	if got := o.podMonitors[0].Spec.PodMetricsEndpoints; len(got) != 1 || got[0].Port == nil || *got[0].Port != "metrics" {
		t.Errorf("PodMonitor endpoints %+v, want port metrics", got)
	}

	// Mounts: the host's socket directory, the Secret's files.
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m
	}
	vols := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		vols[v.Name] = v
	}
	sockDir := flag("socket-dir")
	if v := vols[mounts[sockDir].Name]; v.HostPath == nil || v.HostPath.Path != sockDir {
		t.Errorf("--socket-dir %s is not the host's %s through a hostPath: %+v", sockDir, sockDir, v)
	}
	if ctl := strings.TrimPrefix(flag("control"), "unix:"); filepath.Dir(ctl) != sockDir {
		t.Errorf("--control %s is not in the socket directory", ctl)
	}
	for _, f := range []string{"cert", "key", "ca"} {
		path := flag(f)
		m, ok := mounts[filepath.Dir(path)]
		v := vols[m.Name]
		if !ok || v.Secret == nil || !m.ReadOnly {
			t.Errorf("--%s %s is not in a read-only Secret mount", f, path)
			continue
		}
		// cert-manager's Secret keys; a subPath mount would never see renewals.
		if base := filepath.Base(path); !slices.Contains([]string{"tls.crt", "tls.key", "ca.crt"}, base) || m.SubPath != "" {
			t.Errorf("--%s %s: not a key of a kubernetes.io/tls Secret mounted whole", f, path)
		}
	}

	// Security: non-root, nothing to escalate to, no capabilities.
	psc, sc := spec.SecurityContext, c.SecurityContext
	if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.RunAsUser == nil || *psc.RunAsUser == 0 {
		t.Error("pods may run as root")
	}
	if psc == nil || psc.FSGroup == nil || psc.RunAsGroup == nil || *psc.FSGroup != *psc.RunAsGroup {
		t.Error("the Secret's files (mode 0440) are not in migtun's group")
	}
	if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
		sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem || sc.Privileged != nil && *sc.Privileged ||
		sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) != 0 {
		t.Errorf("container security context %+v: want no escalation, a read-only root, all capabilities dropped and none added", sc)
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() {
		t.Error("no CPU and memory requests")
	}

	// SIGTERM drains for --drain-timeout; the kubelet must wait longer.
	drain, err := time.ParseDuration(flag("drain-timeout"))
	if err != nil {
		t.Fatalf("--drain-timeout: %v", err)
	}
	if g := spec.TerminationGracePeriodSeconds; g == nil || time.Duration(*g)*time.Second < drain+5*time.Second {
		t.Errorf("terminationGracePeriodSeconds %v leaves less than 5s beyond --drain-timeout %v", g, drain)
	}
}
