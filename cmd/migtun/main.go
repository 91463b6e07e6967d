// Command migtun carries live migrations of QEMU virtual machines between
// hosts through one encrypted port.
//
//	migtun certs init  --dir DIR
//	migtun certs issue --dir DIR --name NAME [--san HOST_OR_IP]...
//	migtun serve --listen HOST:PORT --transport tls|quic|plain --cert FILE --key FILE --ca FILE
//	             [--route CHANNEL=unix:PATH|tcp:HOST:PORT]...
//	             [--forward unix:PATH|tcp:HOST:PORT=PEERHOST:PORT/CHANNEL]...
//	             [--insecure-plaintext]
//	migtun session prepare --control unix:PATH --peer HOST:PORT --channel NAME [--channel NAME]...
//	migtun session show|finish|abort --control unix:PATH ID
//	migtun session list --control unix:PATH
//	migtun migrate --control unix:PATH --peer HOST:PORT --qmp unix:SRC_QMP --dest-vm NAME [flags]
//	migtun vm list|add|remove --control unix:PATH [NAME [unix:QMP_PATH]] [--peer NAME]...
//	migtun bench [--transport tls,quic,plain] [--streams 1,4] [--size 4GiB] [--json] [--svg FILE]
//	migtun completion bash|zsh|fish
//	migtun man --dir DIR
//	migtun version
//
// Run "migtun COMMAND --help" for the flags of a command.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strings"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = ""

func main() {
	if len(os.Args) > 1 && os.Args[1] == "serve" {
		// Every socket and file serve creates is its user's alone, from
		// the moment it exists. (Set here, not in runServe, so that tests
		// running commands in-process keep their own umask.)
		syscall.Umask(0o077)
	}
	err := run(os.Args[1:], os.Stdout, os.Stderr)
	if err == nil {
		return
	}
	if !errors.Is(err, flag.ErrHelp) && !errors.Is(err, errReported) {
		fmt.Fprintln(os.Stderr, "migtun:", err)
	}
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0) // the one exit point
	}
	os.Exit(1) // the one exit point
}

// errReported is returned when the error was already printed (by the flag
// package, with the usage text).
var errReported = errors.New("reported")

const usage = `migtun carries live migrations of QEMU virtual machines between hosts
through one encrypted port.

Usage:
  migtun certs init  --dir DIR                  create a certificate authority
  migtun certs issue --dir DIR --name NAME ...  issue a host certificate
  migtun serve ...                              run the sidecar
  migtun session prepare|show|list|finish|abort manage migration sessions
  migtun migrate ...                            live-migrate a QEMU VM, disks included, through a peer
  migtun vm list|add|remove ...                 the VMs a destination's peers may migrate into
  migtun bench ...                              measure throughput and CPU per path
  migtun completion bash|zsh|fish               print a shell completion script
  migtun man --dir DIR                          write the man pages
  migtun version                                print the version

Run "migtun COMMAND --help" for the flags of a command.
`

// run executes the command line args and returns its error.
func run(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errors.New("no command given")
	}
	switch args[0] {
	case "certs":
		return runCerts(args[1:], stdout, stderr)
	case "serve":
		return runServe(args[1:], stdout, stderr)
	case "session":
		return runSession(args[1:], stdout, stderr)
	case "migrate":
		return runMigrate(args[1:], stdout, stderr)
	case "vm":
		return runVM(args[1:], stdout, stderr)
	case "bench":
		return runBench(args[1:], stdout, stderr)
	case "man":
		return runMan(args[1:], stdout, stderr)
	case "completion", "__complete", "__completeNoDesc":
		return runCobra(args, stdout, stderr)
	case "version", "--version", "-version":
		return runVersion(nil, stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("unknown command %q%s", args[0], suggest(args[0]))
}

func versionString() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}

// listFlag is a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }

// required returns an error naming the first of the flags whose value is empty.
func required(cmd string, flags map[string]string, order ...string) error {
	for _, name := range order {
		if flags[name] == "" {
			return fmt.Errorf("%s: --%s is required", cmd, name)
		}
	}
	return nil
}

// flagSet reports whether the flag name was given on the command line.
func flagSet(fs *flag.FlagSet, name string) bool {
	given := false
	fs.Visit(func(f *flag.Flag) { given = given || f.Name == name })
	return given
}
