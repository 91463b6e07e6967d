package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// TestJournalLogFormat: each record is one line, a syslog priority that
// matches its level, then a JSON object without a time.
func TestJournalLogFormat(t *testing.T) {
	var buf bytes.Buffer
	log, err := newLogger(&buf, "journal", "debug")
	if err != nil {
		t.Fatal(err)
	}
	log = log.With("peer", "host-a")
	log.Debug("d")
	log.Info("i", "n", 1)
	log.Warn("w")
	log.Error("e")
	lines := strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
	want := []string{"<7>", "<6>", "<4>", "<3>"}
	if len(lines) != len(want) {
		t.Fatalf("%d lines, want %d:\n%s", len(lines), len(want), buf.String())
	}
	for i, l := range lines {
		rest, ok := strings.CutPrefix(l, want[i])
		var rec map[string]any
		if !ok || json.Unmarshal([]byte(rest), &rec) != nil || rec["peer"] != "host-a" || rec["time"] != nil {
			t.Errorf("line %d: %q, want %s then a JSON record with peer and no time", i, l, want[i])
		}
	}
}
