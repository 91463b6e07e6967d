// Package leaktest checks that a test leaves no goroutine behind.
package leaktest

import (
	"runtime"
	"strings"
	"testing"
	"time"
)

// Check records the goroutines running now and, when the test ends, fails
// it if others are still running after a grace period. Call it first in a
// test, before anything that starts goroutines, so its cleanup runs last.
func Check(t testing.TB) {
	t.Helper()
	before := map[string]bool{}
	for _, g := range goroutines() {
		before[g.id] = true
	}
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			var leaked []string
			for _, g := range goroutines() {
				if !before[g.id] && !ignored(g.stack) {
					leaked = append(leaked, g.stack)
				}
			}
			if len(leaked) == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("%d goroutines leaked:\n\n%s", len(leaked), strings.Join(leaked, "\n\n"))
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

type goroutine struct{ id, stack string }

func goroutines() []goroutine {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var out []goroutine
	for _, g := range strings.Split(string(buf), "\n\n") {
		header, _, _ := strings.Cut(g, "\n")
		id, _, _ := strings.Cut(strings.TrimPrefix(header, "goroutine "), " ")
		out = append(out, goroutine{id: id, stack: g})
	}
	return out
}

// ignored reports goroutines that belong to the runtime or the test
// framework rather than to the code under test.
func ignored(stack string) bool {
	for _, s := range []string{
		"testing.tRunner(",
		"testing.(*T).Run(",
		"testing.(*M).",
		"testing.runFuzzing(",
		"os/signal.signal_recv",
		"leaktest.goroutines",
	} {
		if strings.Contains(stack, s) {
			return true
		}
	}
	return false
}
