package vmtest

import (
	"os"
	"testing"
)

// Each runs f as a subtest "qemu-NAME" for each selected QEMU generation
// (see [Selected]), logging the version it runs. A selected generation that
// is not installed fails its subtest under CI=true and skips it otherwise.
func Each(t *testing.T, f func(t *testing.T, q QEMU)) {
	t.Helper()
	names, err := Selected()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		t.Run("qemu-"+name, func(t *testing.T) {
			f(t, Require(t, name))
		})
	}
}

// One returns the first selected QEMU generation for a test that runs on
// one generation only, logging its version; like Each, it fails under
// CI=true and skips otherwise when that generation is not installed.
func One(t *testing.T) QEMU {
	t.Helper()
	names, err := Selected()
	if err != nil {
		t.Fatal(err)
	}
	return Require(t, names[0])
}

// Require returns the named generation, logging its version, or fails the
// test (under CI=true) or skips it when it is not installed.
func Require(t *testing.T, name string) QEMU {
	t.Helper()
	q, err := FindGeneration(name)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%v (required when CI=true; run make deps)", err)
		}
		t.Skipf("%v; skipping (run make deps)", err)
	}
	t.Logf("running against %s", q)
	return q
}
