package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"strings"
	"time"

	"github.com/migtun/migtun/proxy"
)

const sessionUsage = `migtun session prepare --control unix:PATH --peer HOST:PORT --channel NAME [--channel NAME]... [--listen unix|tcp] [--libvirt]
       migtun session show|finish|abort --control unix:PATH ID
       migtun session list --control unix:PATH`

func runSession(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprintf(stderr, "Usage: %s\n", sessionUsage)
		return errors.New("session: want a subcommand: prepare, show, list, finish or abort")
	}
	sub, args := args[0], args[1:]
	fs := newFlagSet("session "+sub, sessionUsage, stderr)
	control := fs.String("control", "", "the local migtun's control endpoint: unix:PATH or tcp:HOST:PORT")
	var (
		peer     *string
		channels listFlag
		listen   *string
		libvirt  *bool
		grace    *time.Duration
		reason   *string
	)
	switch sub {
	case "prepare":
		peer = fs.String("peer", "", "host:port of the destination's migtun")
		fs.Var(&channels, "channel", "a channel the migration needs: main, nbd, libvirt, … (repeatable)")
		listen = fs.String("listen", "unix", "local listeners: unix (sockets under serve's --socket-dir) or tcp (127.0.0.1)")
		libvirt = fs.Bool("libvirt", false, "also print the virsh migrate arguments for the session's URIs")
	case "finish":
		grace = fs.Duration("grace", 0, "how long streams in flight may take to end before they are aborted (default: serve's --finish-grace)")
	case "abort":
		reason = fs.String("reason", "", "why, for the logs of both hosts")
	case "show", "list":
	default:
		fmt.Fprintf(stderr, "Usage: %s\n", sessionUsage)
		return fmt.Errorf("session: unknown subcommand %q", sub)
	}
	// Flags may come before or after the session ID.
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return err
			}
			return errReported
		}
		if fs.NArg() == 0 {
			break
		}
		positional = append(positional, fs.Arg(0))
		args = fs.Args()[1:]
	}
	if *control == "" {
		return fmt.Errorf("session %s: --control is required", sub)
	}
	c, err := newControlClient(*control)
	if err != nil {
		return fmt.Errorf("session %s: --control: %w", sub, err)
	}
	needID := sub == "show" || sub == "finish" || sub == "abort"
	switch {
	case needID && len(positional) != 1:
		return fmt.Errorf("session %s: want exactly one session ID", sub)
	case !needID && len(positional) > 0:
		return fmt.Errorf("session %s: unexpected argument %q", sub, positional[0])
	}
	ctx := context.Background()
	switch sub {
	case "prepare":
		if *peer == "" {
			return errors.New("session prepare: --peer is required")
		}
		if len(channels) == 0 {
			return errors.New("session prepare: give at least one --channel")
		}
		var info proxy.SessionInfo
		if err := c.do(ctx, "POST", "/v1/sessions", proxy.PrepareRequest{Peer: *peer, Channels: channels, Listen: *listen}, &info); err != nil {
			return fmt.Errorf("session prepare: %w", err)
		}
		if err := printJSON(stdout, info); err != nil {
			return err
		}
		if *libvirt {
			fmt.Fprintln(stdout, virshArgs(info))
		}
		return nil
	case "list":
		var list []proxy.SessionInfo
		if err := c.do(ctx, "GET", "/v1/sessions", nil, &list); err != nil {
			return fmt.Errorf("session list: %w", err)
		}
		return printJSON(stdout, list)
	case "show":
		var info proxy.SessionInfo
		if err := c.do(ctx, "GET", "/v1/sessions/"+url.PathEscape(positional[0]), nil, &info); err != nil {
			return fmt.Errorf("session show: %w", err)
		}
		return printJSON(stdout, info)
	case "finish":
		path := "/v1/sessions/" + url.PathEscape(positional[0]) + "/finish"
		if *grace > 0 {
			path += "?grace=" + grace.String()
		}
		var rep proxy.FinishReport
		if err := c.do(ctx, "POST", path, nil, &rep); err != nil {
			return fmt.Errorf("session finish: %w", err)
		}
		if err := printJSON(stdout, rep); err != nil {
			return err
		}
		if len(rep.Mismatch) > 0 {
			return fmt.Errorf("session finish: the hosts disagree: %s", strings.Join(rep.Mismatch, "; "))
		}
		return nil
	default: // abort
		var info proxy.SessionInfo
		if err := c.do(ctx, "POST", "/v1/sessions/"+url.PathEscape(positional[0])+"/abort", map[string]string{"reason": *reason}, &info); err != nil {
			return fmt.Errorf("session abort: %w", err)
		}
		return printJSON(stdout, info)
	}
}

// virshArgs returns the virsh migrate command line for a session's URIs.
// With a libvirt channel it is the peer-to-peer flow (the source daemon
// reaches the destination daemon through the session); without one, the
// managed direct flow, where virsh itself connects to the destination
// daemon (DESTURI).
func virshArgs(info proxy.SessionInfo) string {
	var b strings.Builder
	p2p := false
	for _, c := range info.Channels {
		p2p = p2p || c.Name == "libvirt"
	}
	if p2p {
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

// controlClient speaks to a local migtun's control endpoint.
type controlClient struct{ *proxy.Client }

func newControlClient(spec string) (*controlClient, error) {
	c, err := proxy.NewClient(spec, 10*time.Minute)
	if err != nil {
		return nil, err
	}
	return &controlClient{c}, nil
}

func (c *controlClient) do(ctx context.Context, method, path string, body, out any) error {
	return c.Do(ctx, method, path, body, out)
}
