package vmtest

import (
	"errors"
	"os"
)

// Signal sends sig to the VM's QEMU process, for tests that stop
// (SIGSTOP) and continue (SIGCONT) a QEMU to play a hung one.
func (v *VM) Signal(sig os.Signal) error {
	if v.cmd == nil || v.cmd.Process == nil {
		return errors.New("vmtest: the VM has no process")
	}
	return v.cmd.Process.Signal(sig)
}
