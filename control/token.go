package control

import (
	"fmt"
	"os"
	"strings"
)

// MinTokenLen is the shortest bearer token taken, in bytes.
const MinTokenLen = 16

// ReadTokenFile reads the bearer token of a TCP control endpoint from a
// file that only its owner may read (mode 0600 or 0400): the first line,
// without surrounding space, at least MinTokenLen bytes.
func ReadTokenFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("token file: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("token file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return "", fmt.Errorf("token file %s: mode %04o lets others read it; chmod 600 it", path, fi.Mode().Perm())
	}
	b := make([]byte, 4096)
	n, _ := f.Read(b)
	tok, _, _ := strings.Cut(string(b[:n]), "\n")
	tok = strings.TrimSpace(tok)
	if len(tok) < MinTokenLen {
		return "", fmt.Errorf("token file %s: the token has %d bytes, want at least %d (e.g. openssl rand -hex 32)", path, len(tok), MinTokenLen)
	}
	return tok, nil
}
