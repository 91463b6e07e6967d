package main

import (
	"fmt"
	"io"
	"path/filepath"

	"github.com/migtun/migtun/certs"
)

func runCerts(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("certs: want a subcommand: init or issue")
	}
	switch args[0] {
	case "init":
		fs := newFlagSet("certs init", "certs init --dir DIR", stderr)
		dir := fs.String("dir", "", "directory for ca.crt and ca.key (created if missing)")
		if err := parse(fs, args[1:]); err != nil {
			return err
		}
		if err := required("certs init", map[string]string{"dir": *dir}, "dir"); err != nil {
			return err
		}
		if err := certs.InitCA(*dir); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "created %s and %s\n", filepath.Join(*dir, "ca.crt"), filepath.Join(*dir, "ca.key"))
		return nil
	case "issue":
		fs := newFlagSet("certs issue", "certs issue --dir DIR --name NAME [--san HOST_OR_IP]...", stderr)
		dir := fs.String("dir", "", "directory holding ca.crt and ca.key; NAME.crt and NAME.key are written there")
		name := fs.String("name", "", "host name: the certificate's common name and first DNS name")
		var sans listFlag
		fs.Var(&sans, "san", "another DNS name or IP address the host is reached by (repeatable)")
		if err := parse(fs, args[1:]); err != nil {
			return err
		}
		if err := required("certs issue", map[string]string{"dir": *dir, "name": *name}, "dir", "name"); err != nil {
			return err
		}
		if err := certs.Issue(*dir, *name, sans); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "created %s and %s\n", filepath.Join(*dir, *name+".crt"), filepath.Join(*dir, *name+".key"))
		return nil
	}
	return fmt.Errorf("certs: unknown subcommand %q (want init or issue)", args[0])
}
