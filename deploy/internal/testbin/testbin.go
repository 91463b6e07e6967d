// Package testbin builds the migtun binary of the enclosing repository for
// the deployment tests, and finds the tools they run.
package testbin

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
)

// RepoRoot returns the root of the migtun repository holding this module.
func RepoRoot(t testing.TB) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("testbin: no caller information")
	}
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", "..", ".."))
}

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
	buildOut  []byte
)

// Migtun builds ./cmd/migtun of the repository, statically (CGO_ENABLED=0),
// once per test binary, and returns the binary's path.
func Migtun(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "migtun-deploy-test-")
		if buildErr != nil {
			return
		}
		// Tests may run the binary as another user.
		if buildErr = os.Chmod(buildDir, 0o755); buildErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-X main.version=deploy-test",
			"-o", filepath.Join(buildDir, "migtun"), "./cmd/migtun")
		cmd.Dir = RepoRoot(t)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		buildOut, buildErr = cmd.CombinedOutput()
	})
	if buildErr != nil {
		t.Fatalf("building migtun: %v\n%s", buildErr, buildOut)
	}
	return filepath.Join(buildDir, "migtun")
}

// Cleanup removes the built binary; call it from TestMain after the tests.
func Cleanup() {
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
}

// NeedTool returns the path of the named program. When it is missing the
// test fails under CI=true (deploy/deps.sh installs it) and is skipped
// otherwise, saying so.
func NeedTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s not found (deploy/deps.sh installs it): %v", name, err)
	}
	t.Skipf("%s not found; run deploy/deps.sh to install it", name)
	return ""
}
