package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync/atomic"
)

// newFlagSet returns a flag set that reports errors instead of exiting and
// prints its usage, grouped by purpose, to stderr.
func newFlagSet(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: migtun %s\n", synopsis)
		printFlags(stderr, fs)
	}
	return fs
}

// flagGroups sorts the flags of a command into groups by purpose, in the
// order shown; a flag not listed is shown under "Other flags".
var flagGroups = map[string][]struct {
	title string
	flags []string
}{
	"serve": {
		{"The tunnel port", []string{"listen", "transport", "cert", "key", "ca", "allow-peer", "insecure-plaintext", "tcp-congestion", "tcp-buffer", "stripes"}},
		{"Where streams go", []string{"route", "forward", "socket-dir"}},
		{"VMs peers may migrate into", []string{"qmp", "qmp-dir"}},
		{"Control and metrics", []string{"control", "control-listen", "control-token-file", "metrics-listen", "print-config"}},
		{"Timeouts and limits", []string{"dial-timeout", "handshake-timeout", "idle-timeout", "drain-timeout", "session-ttl", "finish-grace",
			"max-sessions", "max-peer-sessions", "max-session-streams", "max-control-requests", "max-peer-control-requests"}},
		{"Logging", []string{"log-format", "log-level"}},
	},
	"migrate": {
		{"Where", []string{"control", "control-token-file", "peer", "qmp", "dest-vm"}},
		{"What is copied", []string{"copy-storage", "disks", "mirror-buffer", "multifd", "multifd-compression"}},
		{"Postcopy", []string{"postcopy", "postcopy-start", "postcopy-bandwidth", "postcopy-preempt", "recover-timeout"}},
		{"Limits and the end", []string{"max-bandwidth", "downtime", "timeout", "paused", "quit-source"}},
		{"Output", []string{"json"}},
	},
}

// printFlags writes fs's flags as they are typed (--name VALUE), grouped
// by purpose where the command has groups.
func printFlags(w io.Writer, fs *flag.FlagSet) {
	shown := map[string]bool{}
	byName := map[string]*flag.Flag{}
	fs.VisitAll(func(f *flag.Flag) { byName[f.Name] = f })
	cmd, _, _ := strings.Cut(fs.Name(), " ")
	for _, g := range flagGroups[cmd] {
		var fl []*flag.Flag
		for _, n := range g.flags {
			if f := byName[n]; f != nil {
				fl = append(fl, f)
				shown[n] = true
			}
		}
		writeGroup(w, g.title, fl)
	}
	var rest []*flag.Flag
	for n, f := range byName {
		if !shown[n] {
			rest = append(rest, f)
		}
	}
	sort.Slice(rest, func(i, j int) bool { return rest[i].Name < rest[j].Name })
	title := "Flags"
	if len(shown) > 0 {
		title = "Other flags"
	}
	writeGroup(w, title, rest)
}

func writeGroup(w io.Writer, title string, fl []*flag.Flag) {
	if len(fl) == 0 {
		return
	}
	fmt.Fprintf(w, "\n%s:\n", title)
	for _, f := range fl {
		value, usage := flag.UnquoteUsage(f)
		spec := "--" + f.Name
		if value != "" && !isBool(f) {
			spec += " " + placeholder(value)
		}
		def := ""
		if f.DefValue != "" && f.DefValue != "false" && f.DefValue != "0" && f.DefValue != "[]" && f.DefValue != "0s" {
			def = fmt.Sprintf(" (default %s)", f.DefValue)
		}
		fmt.Fprintf(w, "  %s\n      %s%s\n", spec, usage, def)
	}
}

// placeholder names a flag's value in the help.
func placeholder(kind string) string {
	switch kind {
	case "int", "int64", "uint", "uint64":
		return "N"
	case "duration":
		return "DURATION"
	}
	return "VALUE"
}

func isBool(f *flag.Flag) bool {
	b, ok := f.Value.(interface{ IsBoolFlag() bool })
	return ok && b.IsBoolFlag()
}

// parse parses args and refuses positional arguments that are left over.
func parse(fs *flag.FlagSet, args []string) error {
	if caught(fs) {
		return errDescribed
	}
	if err := fs.Parse(args); err != nil {
		return flagError(fs, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%s: unexpected argument %q (flags are written --name value)", fs.Name(), fs.Arg(0))
	}
	return nil
}

// parseInterleaved parses flags that may come before, between or after the
// positional arguments, and returns those.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	if caught(fs) {
		return nil, errDescribed
	}
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, flagError(fs, err)
		}
		if fs.NArg() == 0 {
			return positional, nil
		}
		positional = append(positional, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

// flagError turns a parse error (already printed with the usage by the
// flag package) into what the command returns, suggesting the flag meant
// when one was mistyped.
func flagError(fs *flag.FlagSet, err error) error {
	if errors.Is(err, flag.ErrHelp) {
		return err
	}
	if name, ok := strings.CutPrefix(err.Error(), "flag provided but not defined: -"); ok {
		name = strings.TrimLeft(name, "-")
		var names []string
		fs.VisitAll(func(f *flag.Flag) { names = append(names, f.Name) })
		if s := closest(name, names); s != "" {
			fmt.Fprintf(fs.Output(), "Did you mean --%s?\n", s)
		}
	}
	return errReported
}

// closest returns the candidate nearest to typed (at most two edits, or
// one that starts with it), or "".
func closest(typed string, candidates []string) string {
	best, bestD := "", 3
	for _, c := range candidates {
		d := editDistance(typed, c)
		if strings.HasPrefix(c, typed) && len(typed) >= 3 {
			d = min(d, 1)
		}
		if d < bestD {
			best, bestD = c, d
		}
	}
	return best
}

// editDistance is the Levenshtein distance of a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}

// Describing a command: the completion and the man pages are made from the
// very flag sets the commands parse. describeFlags runs a command with its
// flag parsing caught: the first flag set it parses is returned, and the
// command stops there (errDescribed), having done nothing else.
var (
	catching     atomic.Bool
	caughtFlags  atomic.Pointer[flag.FlagSet]
	errDescribed = errors.New("described")
)

func caught(fs *flag.FlagSet) bool {
	if !catching.Load() {
		return false
	}
	caughtFlags.CompareAndSwap(nil, fs)
	return true
}

// describeFlags returns the flag set of the command run(args) would parse.
// It is called only while building the command tree of the completion and
// man commands, in their own process.
func describeFlags(run func([]string, io.Writer, io.Writer) error, args ...string) *flag.FlagSet {
	catching.Store(true)
	caughtFlags.Store(nil)
	defer catching.Store(false)
	run(args, io.Discard, io.Discard)
	return caughtFlags.Load()
}
