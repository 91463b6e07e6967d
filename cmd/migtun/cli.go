package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
)

// The command tree, for shell completion and man pages. The commands run
// as they always do (run dispatches them and each parses its own flags);
// the tree is built from the same flag sets (describeFlags), so what the
// completion offers and the man pages list is what the commands take.

// command is one command of the tree.
type command struct {
	name, short string
	run         func([]string, io.Writer, io.Writer) error
	args        []string // what run is given to describe its flags
	subs        []command
}

// commands lists migtun's commands.
func commands() []command {
	return []command{
		{name: "certs", short: "make a certificate authority and host certificates", subs: []command{
			{name: "init", short: "create a certificate authority", run: runCerts, args: []string{"init"}},
			{name: "issue", short: "issue a host certificate", run: runCerts, args: []string{"issue"}},
		}},
		{name: "serve", short: "run the sidecar: the tunnel port, routes, forwards, sessions, the control endpoint", run: runServe},
		{name: "session", short: "manage migration sessions", subs: []command{
			{name: "prepare", short: "prepare a session with a peer", run: runSession, args: []string{"prepare"}},
			{name: "show", short: "show a session", run: runSession, args: []string{"show"}},
			{name: "list", short: "list sessions", run: runSession, args: []string{"list"}},
			{name: "finish", short: "finish a session, comparing both hosts' counts", run: runSession, args: []string{"finish"}},
			{name: "abort", short: "abort a session on both hosts", run: runSession, args: []string{"abort"}},
		}},
		{name: "migrate", short: "live-migrate a QEMU VM, disks included, through a peer", run: runMigrate},
		{name: "vm", short: "the VMs a destination's peers may migrate into", subs: []command{
			{name: "list", short: "list the registered VMs", run: runVM, args: []string{"list"}},
			{name: "add", short: "register a VM", run: runVM, args: []string{"add"}},
			{name: "remove", short: "forget a VM", run: runVM, args: []string{"remove"}},
		}},
		{name: "bench", short: "measure throughput and CPU per path", run: runBench},
		{name: "version", short: "print the version", run: runVersion},
		{name: "man", short: "write the man pages to a directory", run: runMan},
	}
}

// rootCommand builds the command tree.
func rootCommand(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{Use: "migtun", Short: "carry live QEMU migrations through one encrypted port",
		Long: strings.TrimSpace(usage), SilenceUsage: true, SilenceErrors: true}
	root.SetOut(stdout)
	root.SetErr(stderr)
	for _, c := range commands() {
		root.AddCommand(c.cobra())
	}
	return root
}

// cobra returns c as a cobra command: its flags are the command's own,
// and it is run with its arguments as they are.
func (c command) cobra() *cobra.Command {
	cc := &cobra.Command{Use: c.name, Short: c.short, DisableFlagParsing: true}
	for _, s := range c.subs {
		cc.AddCommand(s.cobra())
	}
	if c.run == nil {
		return cc
	}
	run, args := c.run, c.args
	if fs := describeFlags(run, args...); fs != nil {
		cc.Flags().AddGoFlagSet(fs)
	}
	cc.RunE = func(cmd *cobra.Command, rest []string) error {
		return run(append(append([]string{}, args...), rest...), cmd.OutOrStdout(), cmd.ErrOrStderr())
	}
	// cobra completes the flags (registered above); values are files.
	cc.ValidArgsFunction = func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		return nil, cobra.ShellCompDirectiveDefault
	}
	return cc
}

// runCobra runs the completion commands through the command tree:
// "completion bash|zsh|fish|powershell" prints the script, and "__complete"
// is what those scripts call.
func runCobra(args []string, stdout, stderr io.Writer) error {
	root := rootCommand(stdout, stderr)
	root.SetArgs(args)
	return root.Execute()
}

// runMan writes a man page per command into a directory.
func runMan(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("man", "man --dir DIR", stderr)
	dir := fs.String("dir", "", "directory to write migtun.1, migtun-serve.1, … into (created if missing)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required("man", map[string]string{"dir": *dir}, "dir"); err != nil {
		return err
	}
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		return fmt.Errorf("man: %w", err)
	}
	root := rootCommand(stdout, stderr)
	root.DisableAutoGenTag = true
	header := &doc.GenManHeader{Title: "MIGTUN", Section: "1", Source: "migtun " + versionString(), Manual: "migtun manual"}
	if err := doc.GenManTree(root, header, *dir); err != nil {
		return fmt.Errorf("man: %w", err)
	}
	fmt.Fprintf(stdout, "wrote the man pages to %s (man %s)\n", *dir, filepath.Join(*dir, "migtun.1"))
	return nil
}

// suggest returns "Did you mean …?" for a mistyped command, or "".
func suggest(typed string) string {
	var names []string
	for _, c := range commands() {
		names = append(names, c.name)
	}
	names = append(names, "completion", "help")
	if s := closest(typed, names); s != "" {
		return fmt.Sprintf(" (did you mean %q?)", s)
	}
	return ""
}

func runVersion(args []string, stdout, _ io.Writer) error {
	fmt.Fprintln(stdout, "migtun", versionString())
	return nil
}
