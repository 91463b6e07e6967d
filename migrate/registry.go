package migrate

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/endpoint"
)

// VMConfig is how a VM is registered on the destination: where its QMP
// socket is and which peers may migrate into it.
type VMConfig struct {
	// QMP is the path of the VM's QMP UNIX socket.
	QMP string `json:"qmp"`
	// Peers are the certificate names of the peers that may migrate into
	// the VM; empty: any peer this host accepts (see serve --allow-peer).
	Peers []string `json:"peers,omitempty"`
}

// registry is the VMs a destination knows, by name: given by flags,
// registered at run time, or found in a directory of QMP sockets.
type registry struct {
	mu     sync.RWMutex
	vms    map[string]VMConfig
	source map[string]string // "flag" or "api", by name
	// dir, when set, holds a QMP socket NAME.qmp per VM, looked up when a
	// peer names one; dirPeers bind them.
	dir      string
	dirPeers []string
}

// lookup returns the VM of that name.
func (r *registry) lookup(name string) (VMConfig, error) {
	r.mu.RLock()
	cfg, ok := r.vms[name]
	dir, peers := r.dir, r.dirPeers
	r.mu.RUnlock()
	if ok {
		return cfg, nil
	}
	if dir != "" && ValidVMName(name) {
		path := filepath.Join(dir, name+".qmp")
		if fi, err := os.Stat(path); err == nil && fi.Mode().Type() == os.ModeSocket {
			return VMConfig{QMP: path, Peers: peers}, nil
		}
	}
	return VMConfig{}, control.Errorf(control.CodeNotFound, "unknown VM %q on this host", name)
}

// SetDir makes every QMP socket NAME.qmp in dir a VM named NAME, looked up
// when a peer names it (so a VM manager only places sockets there), bound
// to peers if any are given.
func (c *Controller) SetDir(dir string, peers []string) {
	c.reg.mu.Lock()
	defer c.reg.mu.Unlock()
	c.reg.dir, c.reg.dirPeers = dir, peers
}

// VMs lists the registered VMs, and those in the QMP directory.
func (c *Controller) VMs() []control.VMInfo {
	c.reg.mu.RLock()
	out := []control.VMInfo{}
	for name, cfg := range c.reg.vms {
		out = append(out, control.VMInfo{Name: name, QMP: "unix:" + cfg.QMP, Peers: cfg.Peers, Source: c.reg.source[name]})
	}
	dir, peers := c.reg.dir, c.reg.dirPeers
	c.reg.mu.RUnlock()
	if dir != "" {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			name, ok := strings.CutSuffix(e.Name(), ".qmp")
			if ok && e.Type() == os.ModeSocket && ValidVMName(name) && !slices.ContainsFunc(out, func(v control.VMInfo) bool { return v.Name == name }) {
				out = append(out, control.VMInfo{Name: name, QMP: "unix:" + filepath.Join(dir, e.Name()), Peers: peers, Source: "dir"})
			}
		}
	}
	slices.SortFunc(out, func(a, b control.VMInfo) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// RegisterVM registers or replaces a VM at run time.
func (c *Controller) RegisterVM(info control.VMInfo) error {
	if !ValidVMName(info.Name) {
		return control.Errorf(control.CodeBadRequest, "VM name %q: want 1 to 64 letters, digits, '.', '_' and '-'", info.Name)
	}
	ep, err := endpoint.ParseUnix(info.QMP)
	if err != nil {
		return control.Errorf(control.CodeBadRequest, "VM %q: the QMP socket: %v", info.Name, err)
	}
	for _, p := range info.Peers {
		if p == "" {
			return control.Errorf(control.CodeBadRequest, "VM %q: an empty peer name", info.Name)
		}
	}
	c.mu.Lock() // held by no session while it changes
	defer c.mu.Unlock()
	if c.incoming[info.Name] != nil {
		return control.Errorf(control.CodeBusy, "VM %q is being migrated into; replace it when that ends", info.Name)
	}
	c.reg.mu.Lock()
	defer c.reg.mu.Unlock()
	c.reg.vms[info.Name] = VMConfig{QMP: ep.Address, Peers: slices.Clone(info.Peers)}
	c.reg.source[info.Name] = "api"
	return nil
}

// RemoveVM forgets a VM registered at run time or by flag; one being
// migrated into is refused.
func (c *Controller) RemoveVM(name string) error {
	c.mu.Lock() // held by no session while it changes
	defer c.mu.Unlock()
	if c.incoming[name] != nil {
		return control.Errorf(control.CodeBusy, "VM %q is being migrated into; remove it when that ends", name)
	}
	c.reg.mu.Lock()
	defer c.reg.mu.Unlock()
	if _, ok := c.reg.vms[name]; !ok {
		return control.Errorf(control.CodeNotFound, "no VM %q is registered here", name)
	}
	delete(c.reg.vms, name)
	delete(c.reg.source, name)
	return nil
}

// allow returns the VM of that name if peer may migrate into it.
func (r *registry) allow(name, peer string) (VMConfig, error) {
	cfg, err := r.lookup(name)
	if err != nil {
		return cfg, err
	}
	if len(cfg.Peers) > 0 && !slices.Contains(cfg.Peers, peer) {
		return VMConfig{}, control.Errorf(control.CodeForbidden, "VM %q does not take migrations from peer %q", name, peer)
	}
	return cfg, nil
}

// NewController returns a controller for the VMs given by name. log may
// be nil.
func NewController(vms map[string]VMConfig, log *slog.Logger) *Controller {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Controller{log: log, incoming: make(map[string]*incoming)}
	c.reg.vms, c.reg.source = map[string]VMConfig{}, map[string]string{}
	for name, cfg := range vms {
		c.reg.vms[name], c.reg.source[name] = cfg, "flag"
	}
	return c
}

// ParseVM reads a --qmp flag value: NAME=unix:PATH, then ",peer=NAME" for
// each peer that may migrate into the VM.
func ParseVM(s string) (name string, cfg VMConfig, err error) {
	name, spec, ok := strings.Cut(s, "=")
	if !ok || name == "" {
		return "", cfg, fmt.Errorf("%q: want NAME=unix:PATH[,peer=NAME]...", s)
	}
	if !ValidVMName(name) {
		return "", cfg, fmt.Errorf("%q: a VM name is 1 to 64 letters, digits, '.', '_' and '-'", s)
	}
	parts := strings.Split(spec, ",")
	ep, err := endpoint.ParseUnix(parts[0])
	if err != nil {
		return "", cfg, fmt.Errorf("%q: the QMP socket: %w", s, err)
	}
	cfg.QMP = ep.Address
	for _, p := range parts[1:] {
		peer, ok := strings.CutPrefix(p, "peer=")
		if !ok || peer == "" {
			return "", cfg, fmt.Errorf("%q: %q: want peer=NAME (a peer's certificate name)", s, p)
		}
		cfg.Peers = append(cfg.Peers, peer)
	}
	return name, cfg, nil
}

// ValidVMName checks a VM name: 1 to 64 of letters, digits, '.', '_' and
// '-', not starting with a dot.
func ValidVMName(name string) bool {
	if name == "" || len(name) > 64 || name[0] == '.' {
		return false
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("._-", r)) {
			return false
		}
	}
	return true
}
