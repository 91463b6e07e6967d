// Package deptest checks that imports between migtun's packages point one
// way, as ../shared/DESIGN.md and docs/architecture.md say: cmd → migrate,
// bench → proxy → tunnel, certs; migrate → qmp; everything → control →
// endpoint.
package deptest

import (
	"encoding/json"
	"io"
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/migtun/migtun/"

// forbidden lists, per package, the migtun packages it must not import.
var forbidden = map[string][]string{
	"endpoint": {"control", "proxy", "qmp", "migrate", "tunnel", "certs", "bench", "cmd/migtun"},
	"control":  {"proxy", "qmp", "migrate", "tunnel", "certs", "bench", "cmd/migtun"},
	"tunnel":   {"control", "endpoint", "proxy", "qmp", "migrate", "certs", "bench", "cmd/migtun"},
	"certs":    {"proxy", "qmp", "migrate", "tunnel", "bench", "cmd/migtun"},
	"qmp":      {"proxy", "tunnel", "migrate", "certs", "bench", "cmd/migtun"},
	"proxy":    {"qmp", "migrate", "bench", "cmd/migtun"},
	// migrate may import proxy, qmp and tunnel.
	"migrate": {"certs", "bench", "cmd/migtun"},
}

func TestImportsPointOneWay(t *testing.T) {
	out, err := exec.Command("go", "list", "-json", module+"...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	seen := 0
	for {
		var p struct {
			ImportPath string
			Imports    []string
		}
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		seen++
		rel := strings.TrimPrefix(p.ImportPath, module)
		for _, imp := range p.Imports {
			if !strings.HasPrefix(imp, module) {
				continue
			}
			dep := strings.TrimPrefix(imp, module)
			if dep == "cmd/migtun" || strings.HasPrefix(dep, "cmd/") {
				t.Errorf("%s imports %s: nothing may import cmd", rel, dep)
			}
			for _, f := range forbidden[rel] {
				if dep == f {
					t.Errorf("%s imports %s, against the package layering", rel, dep)
				}
			}
			// bench is a harness itself: it runs real QEMU through
			// internal/vmtest, as the end-to-end tests do.
			harness := rel == "bench" && dep == "internal/vmtest"
			if strings.HasPrefix(dep, "internal/") && !strings.HasPrefix(rel, "internal/") && !strings.HasPrefix(rel, "cmd/") &&
				dep != "internal/leaktest" && dep != "internal/testpki" && dep != "internal/testlog" && !harness {
				t.Errorf("%s imports %s: library packages use only test helpers from internal/", rel, dep)
			}
		}
	}
	if seen < 5 {
		t.Fatalf("go list reported only %d packages", seen)
	}
}
