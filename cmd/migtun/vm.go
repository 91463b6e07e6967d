package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/migtun/migtun/control"
)

const vmUsage = `vm list --control unix:PATH
       migtun vm add --control unix:PATH NAME unix:QMP_PATH [--peer NAME]...
       migtun vm remove --control unix:PATH NAME`

// runVM registers, lists and removes the VMs a destination's peers may
// migrate into, on its running migtun serve.
func runVM(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprintf(stderr, "Usage: migtun %s\n", vmUsage)
		return errors.New("vm: want a subcommand: list, add or remove")
	}
	sub := args[0]
	fs := newFlagSet("vm "+sub, vmUsage, stderr)
	ctl := fs.String("control", "", "the local migtun's control endpoint: unix:PATH or tcp:HOST:PORT")
	tokenFile := fs.String("control-token-file", "", "the TCP control endpoint's token, in a file")
	var peers listFlag
	if sub == "add" {
		fs.Var(&peers, "peer", "the certificate name of a peer that may migrate into the VM (repeatable; default: any peer serve accepts)")
	}
	want := map[string]int{"list": 0, "add": 2, "remove": 1}
	n, ok := want[sub]
	if !ok {
		fmt.Fprintf(stderr, "Usage: migtun %s\n", vmUsage)
		return fmt.Errorf("vm: unknown subcommand %q", sub)
	}
	pos, err := parseInterleaved(fs, args[1:])
	if err != nil {
		return err
	}
	if *ctl == "" {
		return fmt.Errorf("vm %s: --control is required", sub)
	}
	if len(pos) != n {
		return fmt.Errorf("vm %s: want %d arguments, got %d (usage: migtun %s)", sub, n, len(pos), vmUsage)
	}
	opts := &control.Options{Timeout: time.Minute}
	if *tokenFile != "" {
		if opts.Token, err = control.ReadTokenFile(*tokenFile); err != nil {
			return fmt.Errorf("vm %s: --control-token-file: %w", sub, err)
		}
	}
	c, err := control.NewClient(*ctl, opts)
	if err != nil {
		return fmt.Errorf("vm %s: --control: %w", sub, err)
	}
	defer c.Close()
	ctx := context.Background()
	switch sub {
	case "list":
		list, err := c.VMs(ctx)
		if err != nil {
			return fmt.Errorf("vm list: %w", err)
		}
		return printJSON(stdout, list)
	case "add":
		info := control.VMInfo{Name: pos[0], QMP: pos[1], Peers: peers}
		if err := c.RegisterVM(ctx, info); err != nil {
			return fmt.Errorf("vm add: %w", err)
		}
		return printJSON(stdout, info)
	default:
		if err := c.RemoveVM(ctx, pos[0]); err != nil {
			return fmt.Errorf("vm remove: %w", err)
		}
		return nil
	}
}
