package migrate

import (
	"fmt"
	"log/slog"
	"maps"
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

// registry is the VMs a destination knows, by name.
type registry struct {
	mu  sync.RWMutex
	vms map[string]VMConfig
}

// lookup returns the VM of that name.
func (r *registry) lookup(name string) (VMConfig, error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	cfg, ok := r.vms[name]
	if !ok {
		return VMConfig{}, control.Errorf(control.CodeNotFound, "unknown VM %q on this host", name)
	}
	return cfg, nil
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
	c.reg.vms = maps.Clone(vms)
	if c.reg.vms == nil {
		c.reg.vms = map[string]VMConfig{}
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
