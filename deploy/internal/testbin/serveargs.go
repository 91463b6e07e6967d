package testbin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"time"
)

// CheckServeArgs checks that args parse with `migtun serve`'s own flag
// parser and checks, by running bin.
//
// With a migtun that has --print-config it runs `serve ARGS --print-config`,
// which parses every flag and opens nothing, and returns the printed
// settings. With an older migtun it runs `serve ARGS` with a CA file that
// does not exist on this machine (the --ca argument itself, as in the
// manifests): the CA is the first file serve opens, after every flag has
// been parsed and checked, so an error naming that file and nothing else
// means the arguments were accepted; it then returns nil settings.
func CheckServeArgs(bin string, args []string) (map[string]any, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, stderr, err := runServe(ctx, bin, append(append([]string{}, args...), "--print-config"))
	if err == nil {
		settings := map[string]any{}
		if jerr := json.Unmarshal(out, &settings); jerr != nil {
			return nil, fmt.Errorf("--print-config printed no JSON object: %v\n%s", jerr, out)
		}
		return settings, nil
	}
	if !strings.Contains(stderr, "flag provided but not defined: -print-config") {
		return nil, fmt.Errorf("migtun serve %q --print-config: %v\n%s", args, err, stderr)
	}
	ca := flagValue(args, "ca")
	if ca == "" {
		return nil, errors.New("no --ca argument")
	}
	_, stderr, err = runServe(ctx, bin, args)
	if err == nil {
		return nil, fmt.Errorf("migtun serve %q exited 0", args)
	}
	if want := "ca file: open " + ca + ":"; !strings.Contains(stderr, want) {
		return nil, fmt.Errorf("migtun serve %q refused its arguments (want only a missing %s): %v\n%s", args, ca, err, stderr)
	}
	return nil, nil
}

func runServe(ctx context.Context, bin string, args []string) (stdout []byte, stderr string, err error) {
	cmd := exec.CommandContext(ctx, bin, append([]string{"serve"}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	return out.Bytes(), errb.String(), err
}

// flagValue returns the value of the last --name VALUE or --name=VALUE.
func flagValue(args []string, name string) string {
	v := ""
	for i, a := range args {
		a = strings.TrimLeft(a, "-")
		if a == name && i+1 < len(args) {
			v = args[i+1]
		} else if val, ok := strings.CutPrefix(a, name+"="); ok {
			v = val
		}
	}
	return v
}
