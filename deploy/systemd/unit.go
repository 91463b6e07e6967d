package systemd

import (
	"bufio"
	"fmt"
	"os"
	"regexp"
	"strings"
)

// Unit is a parsed unit file: section → key → values in file order.
type Unit map[string]map[string][]string

// ParseUnit reads a unit file: sections, KEY=VALUE lines, comments, and
// lines continued with a trailing backslash.
func ParseUnit(path string) (Unit, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	u := Unit{}
	section, cont := "", ""
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := cont + strings.TrimSpace(sc.Text())
		cont = ""
		if strings.HasSuffix(line, `\`) {
			cont = strings.TrimSuffix(line, `\`) + " "
			continue
		}
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case line[0] == '[' && line[len(line)-1] == ']':
			section = line[1 : len(line)-1]
			if u[section] == nil {
				u[section] = map[string][]string{}
			}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				return nil, fmt.Errorf("%s:%d: not KEY=VALUE in a section: %q", path, n, line)
			}
			k = strings.TrimSpace(k)
			u[section][k] = append(u[section][k], strings.TrimSpace(v))
		}
	}
	return u, sc.Err()
}

// Get returns the last value of key in section, or "".
func (u Unit) Get(section, key string) string {
	vs := u[section][key]
	if len(vs) == 0 {
		return ""
	}
	return vs[len(vs)-1]
}

// ParseEnvFile reads an EnvironmentFile: KEY=VALUE lines, comments
// starting with # or ;, values optionally in double or single quotes.
func ParseEnvFile(path string) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	env := map[string]string{}
	for n, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || !envName.MatchString(k) {
			return nil, fmt.Errorf("%s:%d: not KEY=VALUE: %q", path, n+1, line)
		}
		if len(v) >= 2 && (v[0] == '"' || v[0] == '\'') && v[len(v)-1] == v[0] {
			v = v[1 : len(v)-1]
		}
		env[k] = v
	}
	return env, nil
}

var (
	envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	braced  = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)\}`)
	bare    = regexp.MustCompile(`^\$([A-Za-z_][A-Za-z0-9_]*)$`)
)

// ExpandCommand turns a command line (without quotes, as migtun.service
// writes it) into arguments the way systemd does: a word that is exactly
// $NAME becomes the value split at white space (no words if empty), and
// ${NAME} inside a word is replaced by the value as it is. A variable env
// does not define is an error, as is any other use of $.
func ExpandCommand(line string, env map[string]string) ([]string, error) {
	if strings.ContainsAny(line, `"'\`) {
		return nil, fmt.Errorf("quotes and escapes are not handled: %q", line)
	}
	var args []string
	for _, w := range strings.Fields(line) {
		if m := bare.FindStringSubmatch(w); m != nil {
			v, ok := env[m[1]]
			if !ok {
				return nil, fmt.Errorf("$%s is not defined", m[1])
			}
			args = append(args, strings.Fields(v)...)
			continue
		}
		var err error
		w = braced.ReplaceAllStringFunc(w, func(ref string) string {
			name := braced.FindStringSubmatch(ref)[1]
			v, ok := env[name]
			if !ok && err == nil {
				err = fmt.Errorf("${%s} is not defined", name)
			}
			return v
		})
		if err != nil {
			return nil, err
		}
		if strings.Contains(w, "$") {
			return nil, fmt.Errorf("unhandled $ in %q", w)
		}
		args = append(args, w)
	}
	return args, nil
}
