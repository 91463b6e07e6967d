package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"sync"
)

// newLogger returns the logger of --log-format and --log-level: text
// (logfmt), json, or journal (JSON records behind the "<N>" priority prefix
// systemd-journald reads from a service's output, without a time, which
// the journal adds).
func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	case "journal":
		pw := &priorityWriter{w: w}
		opts.ReplaceAttr = func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		}
		return slog.New(journalHandler{Handler: slog.NewJSONHandler(pw, opts), pw: pw}), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text, json or journal", format)
}

// journalHandler writes each record behind the syslog priority of its
// level.
type journalHandler struct {
	slog.Handler
	pw *priorityWriter
}

func (h journalHandler) Handle(ctx context.Context, r slog.Record) error {
	h.pw.mu.Lock()
	defer h.pw.mu.Unlock()
	h.pw.prefix = "<" + strconv.Itoa(priority(r.Level)) + ">"
	return h.Handler.Handle(ctx, r)
}

func (h journalHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return journalHandler{Handler: h.Handler.WithAttrs(attrs), pw: h.pw}
}

func (h journalHandler) WithGroup(name string) slog.Handler {
	return journalHandler{Handler: h.Handler.WithGroup(name), pw: h.pw}
}

// priority is the syslog priority of a level: debug 7, info 6, warn 4,
// error 3.
func priority(l slog.Level) int {
	switch {
	case l >= slog.LevelError:
		return 3
	case l >= slog.LevelWarn:
		return 4
	case l >= slog.LevelInfo:
		return 6
	}
	return 7
}

// priorityWriter puts prefix before each write: slog's handlers write a
// record in one call.
type priorityWriter struct {
	mu     sync.Mutex
	w      io.Writer
	prefix string
}

func (p *priorityWriter) Write(b []byte) (int, error) {
	if _, err := io.WriteString(p.w, p.prefix); err != nil {
		return 0, err
	}
	return p.w.Write(b)
}
