package testbin

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"time"
)

// CheckServeArgs checks that args parse with `migtun serve`'s own flag
// parser and checks, by running `bin serve ARGS --print-config`, which
// parses every flag, opens nothing, and prints the effective settings as
// JSON; it returns those settings.
func CheckServeArgs(bin string, args []string) (map[string]any, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append(append([]string{"serve"}, args...), "--print-config")...)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("migtun serve %q --print-config: %v\n%s", args, err, stderr.Bytes())
	}
	settings := map[string]any{}
	if err := json.Unmarshal(out.Bytes(), &settings); err != nil {
		return nil, fmt.Errorf("migtun serve %q --print-config printed no JSON object: %v\n%s", args, err, out.Bytes())
	}
	return settings, nil
}
