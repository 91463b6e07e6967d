// Package testlog collects, for tests, the logs of the code they run.
package testlog

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
)

// Buffer holds log lines written by any number of goroutines.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

// Write appends p.
func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

// String returns everything written so far.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// Line returns the first line holding every fragment, without its
// newline, or "" if none does.
func (b *Buffer) Line(fragments ...string) string {
next:
	for line := range strings.Lines(b.String()) {
		for _, f := range fragments {
			if !strings.Contains(line, f) {
				continue next
			}
		}
		return strings.TrimSuffix(line, "\n")
	}
	return ""
}

// Logger returns a logger writing text lines of every level to b.
func (b *Buffer) Logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug}))
}
