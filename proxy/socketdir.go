package proxy

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/migtun/migtun/control"
)

// DefaultSocketDir is the socket directory when none is configured: the
// first runtime directory systemd gives the service ($RUNTIME_DIRECTORY),
// else /run/migtun for root, else migtun in the user's runtime directory
// ($XDG_RUNTIME_DIR). A shared temporary directory is never a default:
// another local user could create it first.
func DefaultSocketDir() (string, error) {
	if d, _, _ := strings.Cut(os.Getenv("RUNTIME_DIRECTORY"), ":"); d != "" {
		return d, nil
	}
	if os.Geteuid() == 0 {
		return "/run/migtun", nil
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "migtun"), nil
	}
	return "", errors.New("no socket directory: give one with --socket-dir (a directory only migtun's user can write)")
}

// ensureSocketDir creates the socket directory 0700 if it is missing, and
// checks one that exists: it must be a directory, not a symlink, owned by
// this process's user and writable by no one else, or a local user could
// put their own socket where QEMU connects.
func (s *Server) ensureSocketDir() error {
	return checkSocketDir(s.cfg.SocketDir)
}

func checkSocketDir(dir string) error {
	if !filepath.IsAbs(dir) {
		return control.Errorf(control.CodeBadRequest, "socket directory %q: want an absolute path", dir)
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return fmt.Errorf("socket directory: %w", err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("socket directory: %w", err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("socket directory: %w", err)
	}
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		return fmt.Errorf("socket directory %s is a symlink; give the directory itself", dir)
	case !fi.IsDir():
		return fmt.Errorf("socket directory %s is not a directory", dir)
	case fi.Mode().Perm()&0o022 != 0:
		return fmt.Errorf("socket directory %s is writable by others (mode %04o); migtun wants it 0700 (chmod 700 it, or remove it and let migtun create it)", dir, fi.Mode().Perm())
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("socket directory %s is owned by uid %d, not by migtun's user (uid %d)", dir, st.Uid, os.Geteuid())
	}
	return nil
}
