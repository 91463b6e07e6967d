package vmtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"
)

// QEMU is one installed QEMU generation.
type QEMU struct {
	// Name is the generation, "major.minor" ("7.2", "10.0").
	Name string
	// Version is the full version QEMU reports, e.g. "10.0.2 (Debian
	// 1:10.0.2+ds-2+deb13u1~bpo12+1)".
	Version string
	// Binary is the qemu-system-x86_64 to run. For a generation unpacked
	// into a prefix it is the wrapper scripts/qemu-next.sh writes, which
	// points QEMU at the prefix's own firmware (-L) and modules
	// (QEMU_MODULE_DIR).
	Binary string
	// Prefix is the directory the generation was unpacked into ("" for
	// the system's QEMU).
	Prefix string
}

// String names the generation for test output: version and binary.
func (q QEMU) String() string {
	return fmt.Sprintf("QEMU %s (%s)", q.Version, q.Binary)
}

// KnownGenerations are the QEMU generations the tests know, oldest first:
// the system's (Debian 12's 7.2) and the one scripts/qemu-next.sh unpacks
// into NextPrefix (10.0 from bookworm-backports).
var KnownGenerations = []string{"7.2", "10.0"}

// NextPrefix is where scripts/qemu-next.sh unpacks the newer QEMU; the
// environment variable MIGTUN_QEMU_NEXT overrides it, as for the script.
func NextPrefix() string {
	if p := os.Getenv("MIGTUN_QEMU_NEXT"); p != "" {
		return p
	}
	return "/opt/migtun/qemu-10.0"
}

// SelectEnv is the environment variable that selects the QEMU generations
// the tests run against: a comma-separated list of names ("7.2,10.0", the
// default being every known generation), or "all".
const SelectEnv = "MIGTUN_QEMU"

// Selected returns the generation names the tests should run against, from
// SelectEnv, in the order of KnownGenerations.
func Selected() ([]string, error) {
	v := strings.TrimSpace(os.Getenv(SelectEnv))
	if v == "" || v == "all" {
		return KnownGenerations, nil
	}
	var out []string
	for _, n := range strings.Split(v, ",") {
		n = strings.TrimSpace(n)
		if !slices.Contains(KnownGenerations, n) {
			return nil, fmt.Errorf("vmtest: %s=%q: unknown QEMU generation %q (known: %s)", SelectEnv, v, n, strings.Join(KnownGenerations, ", "))
		}
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	slices.SortFunc(out, func(a, b string) int {
		return slices.Index(KnownGenerations, a) - slices.Index(KnownGenerations, b)
	})
	return out, nil
}

// FindGeneration returns the installed QEMU of the named generation: the
// system's qemu-system-x86_64 if its version matches, else the one in
// NextPrefix. The error wraps [ErrNoQEMU] when it is not installed.
func FindGeneration(name string) (QEMU, error) {
	var candidates []QEMU
	if p, err := exec.LookPath("qemu-system-x86_64"); err == nil {
		candidates = append(candidates, QEMU{Binary: p})
	}
	prefix := NextPrefix()
	candidates = append(candidates, QEMU{Binary: filepath.Join(prefix, "bin/qemu-system-x86_64"), Prefix: prefix})
	var seen []string
	for _, q := range candidates {
		v, err := binaryVersion(q.Binary)
		if err != nil {
			continue
		}
		q.Version = v
		q.Name = generationOf(v)
		seen = append(seen, q.Name+" at "+q.Binary)
		if q.Name == name {
			return q, nil
		}
	}
	hint := "scripts/qemu-next.sh installs 10.0 into " + prefix
	if len(seen) > 0 {
		hint = "found " + strings.Join(seen, ", ") + "; " + hint
	}
	return QEMU{}, fmt.Errorf("%w: no QEMU %s (%s)", ErrNoQEMU, name, hint)
}

var (
	versionMu    sync.Mutex
	versionCache = map[string]string{}
	versionRE    = regexp.MustCompile(`QEMU emulator version (\d+\.\d+\.\d+[^\n]*)`)
)

// binaryVersion runs "BINARY --version" once per binary and returns the
// version it reports.
func binaryVersion(bin string) (string, error) {
	versionMu.Lock()
	defer versionMu.Unlock()
	if v, ok := versionCache[bin]; ok {
		return v, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("vmtest: %s --version: %w", bin, err)
	}
	m := versionRE.FindSubmatch(out)
	if m == nil {
		return "", errors.New("vmtest: " + bin + " --version: no version in " + strings.TrimSpace(string(out)))
	}
	v := strings.TrimSpace(string(m[1]))
	versionCache[bin] = v
	return v, nil
}

// generationOf is "major.minor" of a version string.
func generationOf(version string) string {
	parts := strings.SplitN(strings.Fields(version)[0], ".", 3)
	if len(parts) < 2 {
		return version
	}
	return parts[0] + "." + parts[1]
}
