package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/migtun/migtun/control"
)

const sessionUsage = `session prepare --control unix:PATH --peer HOST:PORT --channel NAME [--channel NAME]... [--libvirt]
       migtun session show|finish|abort --control unix:PATH ID
       migtun session list --control unix:PATH`

// sessionArgs are the flags and arguments of one session subcommand.
type sessionArgs struct {
	sub       string
	control   string
	tokenFile string
	peer      string
	channels  listFlag
	listen    string
	libvirt   bool
	grace     time.Duration
	reason    string
	id        string
}

func runSession(args []string, stdout, stderr io.Writer) error {
	a, err := parseSession(args, stderr)
	if err != nil {
		return err
	}
	opts := &control.Options{Timeout: 10 * time.Minute}
	if a.tokenFile != "" {
		if opts.Token, err = control.ReadTokenFile(a.tokenFile); err != nil {
			return fmt.Errorf("session %s: --control-token-file: %w", a.sub, err)
		}
	}
	c, err := control.NewClient(a.control, opts)
	if err != nil {
		return fmt.Errorf("session %s: --control: %w", a.sub, err)
	}
	defer c.Close()
	out, err := a.do(context.Background(), c, stdout)
	if err != nil {
		return fmt.Errorf("session %s: %w", a.sub, err)
	}
	if out != nil {
		return printJSON(stdout, out)
	}
	return nil
}

// parseSession reads the subcommand, its flags and the session ID; flags
// may come before or after the ID.
func parseSession(args []string, stderr io.Writer) (*sessionArgs, error) {
	if len(args) == 0 {
		fmt.Fprintf(stderr, "Usage: migtun %s\n", sessionUsage)
		return nil, errors.New("session: want a subcommand: prepare, show, list, finish or abort")
	}
	a := &sessionArgs{sub: args[0]}
	args = args[1:]
	fs := newFlagSet("session "+a.sub, sessionUsage, stderr)
	fs.StringVar(&a.control, "control", "", "the local migtun's control endpoint: unix:PATH or tcp:HOST:PORT")
	fs.StringVar(&a.tokenFile, "control-token-file", "", "the TCP control endpoint's token, in a file (serve's --control-token-file)")
	switch a.sub {
	case "prepare":
		fs.StringVar(&a.peer, "peer", "", "host:port of the destination's migtun")
		fs.Var(&a.channels, "channel", "a channel the migration needs: main, nbd, libvirt, … (repeatable)")
		fs.StringVar(&a.listen, "listen", "unix", "local listeners: unix, sockets in serve's --socket-dir (the only kind)")
		fs.BoolVar(&a.libvirt, "libvirt", false, "also print the virsh migrate arguments for the session's URIs")
	case "finish":
		fs.DurationVar(&a.grace, "grace", 0, "how long streams in flight may take to end before they are aborted (default: serve's --finish-grace)")
	case "abort":
		fs.StringVar(&a.reason, "reason", "", "why, for the logs of both hosts")
	case "show", "list":
	default:
		fmt.Fprintf(stderr, "Usage: migtun %s\n", sessionUsage)
		return nil, fmt.Errorf("session: unknown subcommand %q", a.sub)
	}
	positional, err := parseInterleaved(fs, args)
	if err != nil {
		return nil, err
	}
	if a.control == "" {
		return nil, fmt.Errorf("session %s: --control is required", a.sub)
	}
	needID := a.sub == "show" || a.sub == "finish" || a.sub == "abort"
	switch {
	case needID && len(positional) != 1:
		return nil, fmt.Errorf("session %s: want exactly one session ID", a.sub)
	case !needID && len(positional) > 0:
		return nil, fmt.Errorf("session %s: unexpected argument %q", a.sub, positional[0])
	case needID:
		a.id = positional[0]
	}
	if a.sub == "prepare" && a.peer == "" {
		return nil, errors.New("session prepare: --peer is required")
	}
	if a.sub == "prepare" && len(a.channels) == 0 {
		return nil, errors.New("session prepare: give at least one --channel")
	}
	return a, nil
}

// do runs the subcommand and returns what to print as JSON.
func (a *sessionArgs) do(ctx context.Context, c *control.Client, stdout io.Writer) (any, error) {
	switch a.sub {
	case "prepare":
		info, err := c.Prepare(ctx, control.PrepareRequest{Peer: a.peer, Channels: a.channels, Listen: a.listen})
		if err != nil {
			return nil, err
		}
		if err := printJSON(stdout, info); err != nil {
			return nil, err
		}
		if a.libvirt {
			fmt.Fprintln(stdout, virshArgs(*info))
		}
		return nil, nil
	case "list":
		return c.Sessions(ctx)
	case "show":
		return c.Session(ctx, a.id)
	case "finish":
		rep, err := c.Finish(ctx, a.id, a.grace)
		if err != nil {
			return nil, err
		}
		if err := printJSON(stdout, rep); err != nil {
			return nil, err
		}
		if len(rep.Mismatch) > 0 {
			return nil, fmt.Errorf("the hosts disagree: %s", strings.Join(rep.Mismatch, "; "))
		}
		return nil, nil
	default: // abort
		return c.Abort(ctx, a.id, a.reason)
	}
}

// virshArgs returns the virsh migrate command line for a session's URIs.
// With a libvirt channel it is the peer-to-peer flow (the source daemon
// reaches the destination daemon through the session); without one, the
// managed direct flow, where virsh itself connects to the destination
// daemon (DESTURI).
func virshArgs(info control.SessionInfo) string {
	var b strings.Builder
	if info.Channel("libvirt") != nil {
		b.WriteString("virsh migrate --live --p2p --copy-storage-all DOMAIN")
	} else {
		b.WriteString("virsh migrate --live --copy-storage-all DOMAIN --desturi DESTURI")
	}
	for _, c := range info.Channels {
		switch c.Name {
		case "libvirt":
			fmt.Fprintf(&b, " --desturi '%s'", c.LibvirtURI)
		case "main":
			fmt.Fprintf(&b, " --migrateuri %s", c.LibvirtURI)
		case "nbd":
			fmt.Fprintf(&b, " --disks-uri %s", c.LibvirtURI)
		}
	}
	return b.String()
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
