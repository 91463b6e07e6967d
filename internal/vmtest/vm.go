package vmtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/migtun/migtun/qmp"
)

// Defaults for [Options].
const (
	DefaultRAM  = 512 << 20
	DefaultDisk = 256 << 20
	DefaultName = "vm"
)

// ramDir is where RAM backing files are created.
const ramDir = "/dev/shm"

// ErrNoQEMU means qemu-system-x86_64 is not installed.
var ErrNoQEMU = errors.New("vmtest: qemu-system-x86_64 not found")

// Options configure a VM. The zero value of each field means its default.
type Options struct {
	// Dir holds the QMP socket, the disk image and QEMU's log. Required.
	// UNIX socket paths are limited to 108 bytes, so keep it short.
	Dir string
	// Name prefixes the files in Dir and the RAM file; default "vm". Two
	// VMs sharing a Dir need different names.
	Name string
	// RAM is the guest RAM size in bytes, a multiple of 1 MiB; default 512 MiB.
	RAM int64
	// Disk is the disk size in bytes, a multiple of 512; default 256 MiB.
	Disk int64
	// Incoming starts a migration destination (-incoming defer).
	Incoming bool
	// Random fills RAM and disk with random bytes before QEMU starts (a
	// migration source). Otherwise both start as zeros.
	Random bool
	// Compressible, with Random, makes three quarters of each page a
	// repeated text (see FillCompressible).
	Compressible bool
	// Seed makes the random content reproducible; 0 picks a random seed.
	Seed uint64
	// QEMU is the generation to run (see [FindGeneration]); the zero
	// value is the system's qemu-system-x86_64 (or Binary).
	QEMU QEMU
	// Binary is the QEMU binary; default QEMU.Binary, else [QEMUBinary].
	Binary string
	// Accel is "kvm" or "tcg"; default kvm when [KVMAvailable], else tcg.
	Accel string
}

// VM is a running, paused QEMU.
type VM struct {
	// QMP is connected to the VM's monitor.
	QMP *qmp.Client
	// RAMPath opens the guest RAM file. The file itself is unlinked once
	// QEMU has mapped it, so RAMPath is a /proc/<pid>/fd path of this
	// process, valid until Close.
	RAMPath string
	// DiskPath is the raw disk image (node name "disk0").
	DiskPath string
	// LogPath is QEMU's stdout and stderr.
	LogPath string
	// QMPPath is the monitor's UNIX socket.
	QMPPath string
	// Options are the options the VM was started with, defaults filled in.
	Options Options

	cmd      *exec.Cmd
	ram      *os.File // keeps the unlinked RAM file alive
	shmPath  string   // RAM file name in /dev/shm until unlinked
	log      *os.File
	exited   chan struct{} // closed once cmd.Wait returned
	waitErr  error         // cmd.Wait's result, valid after exited
	closeMu  sync.Mutex
	closed   bool
	closeErr error
}

// QEMUBinary finds qemu-system-x86_64 on PATH.
func QEMUBinary() (string, error) {
	p, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrNoQEMU, err)
	}
	return p, nil
}

// KVMAvailable reports whether /dev/kvm can be opened read-write.
func KVMAvailable() bool {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

// withDefaults fills in defaults and validates o.
func (o Options) withDefaults() (Options, error) {
	if o.Dir == "" {
		return o, errors.New("vmtest: Options.Dir is required")
	}
	if o.Name == "" {
		o.Name = DefaultName
	}
	if o.RAM == 0 {
		o.RAM = DefaultRAM
	}
	if o.Disk == 0 {
		o.Disk = DefaultDisk
	}
	if o.RAM <= 0 || o.RAM%(1<<20) != 0 {
		return o, fmt.Errorf("vmtest: RAM %d is not a positive multiple of 1 MiB", o.RAM)
	}
	if o.Disk <= 0 || o.Disk%512 != 0 {
		return o, fmt.Errorf("vmtest: Disk %d is not a positive multiple of 512", o.Disk)
	}
	if o.Binary == "" {
		o.Binary = o.QEMU.Binary
	}
	if o.Binary == "" {
		bin, err := QEMUBinary()
		if err != nil {
			return o, err
		}
		o.Binary = bin
	}
	if o.Accel == "" {
		o.Accel = "tcg"
		if KVMAvailable() {
			o.Accel = "kvm"
		}
	}
	if o.Seed == 0 {
		var b [8]byte
		rand.Read(b[:])
		for i, x := range b {
			o.Seed |= uint64(x) << (8 * i)
		}
		o.Seed |= 1
	}
	if p := filepath.Join(o.Dir, o.Name+".qmp"); len(p) >= 108 {
		return o, fmt.Errorf("vmtest: socket path %s is too long for a UNIX socket", p)
	}
	return o, nil
}

// Start prepares the RAM and disk files and starts a paused QEMU, returning
// once its QMP monitor is connected. ctx bounds the start only, not the
// VM's life; Close the VM when done.
func Start(ctx context.Context, opts Options) (v *VM, err error) {
	o, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	v = &VM{
		Options:  o,
		DiskPath: filepath.Join(o.Dir, o.Name+".img"),
		LogPath:  filepath.Join(o.Dir, o.Name+".log"),
		QMPPath:  filepath.Join(o.Dir, o.Name+".qmp"),
		exited:   make(chan struct{}),
	}
	defer func() {
		if err != nil {
			v.Close()
			v = nil
		}
	}()
	if err := v.prepareFiles(ctx); err != nil {
		return v, err
	}
	if err := v.startQEMU(); err != nil {
		return v, err
	}
	if err := v.connect(ctx); err != nil {
		return v, err
	}
	if n := o.QEMU.Name; n != "" && generationOf(v.QMP.Version().String()) != n {
		return v, fmt.Errorf("vmtest: %s reports QEMU %s, not %s", o.Binary, v.QMP.Version(), n)
	}
	// QEMU answers QMP only after creating its memory backend, so the RAM
	// file can go now: it lives on through QEMU's mapping and our fd.
	if err := os.Remove(v.shmPath); err != nil {
		return v, fmt.Errorf("vmtest: unlink RAM file: %w", err)
	}
	v.shmPath = ""
	return v, nil
}

// prepareFiles creates the RAM file in /dev/shm and the disk image, random
// or zero.
func (v *VM) prepareFiles(ctx context.Context) error {
	o := v.Options
	var suffix [6]byte
	rand.Read(suffix[:])
	v.shmPath = filepath.Join(ramDir, fmt.Sprintf("migtun-vmtest-%d-%s-%s.ram", os.Getpid(), o.Name, hex.EncodeToString(suffix[:])))
	ram, err := os.OpenFile(v.shmPath, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		v.shmPath = ""
		return fmt.Errorf("vmtest: create RAM file: %w", err)
	}
	v.ram = ram
	v.RAMPath = "/proc/" + strconv.Itoa(os.Getpid()) + "/fd/" + strconv.Itoa(int(ram.Fd()))

	disk, err := os.OpenFile(v.DiskPath, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("vmtest: create disk: %w", err)
	}
	defer disk.Close()

	for _, f := range []struct {
		file *os.File
		size int64
		seed uint64
	}{{ram, o.RAM, o.Seed}, {disk, o.Disk, o.Seed + 1}} {
		if err := f.file.Truncate(f.size); err != nil {
			return fmt.Errorf("vmtest: size %s: %w", f.file.Name(), err)
		}
		switch {
		case o.Random && o.Compressible:
			if err := FillCompressible(ctx, f.file, f.size, f.seed); err != nil {
				return err
			}
		case o.Random:
			if err := FillRandom(ctx, f.file, f.size, f.seed); err != nil {
				return err
			}
		}
	}
	if err := disk.Close(); err != nil {
		return fmt.Errorf("vmtest: write disk: %w", err)
	}
	return nil
}

// args is QEMU's command line.
func (v *VM) args() []string {
	o := v.Options
	size := strconv.FormatInt(o.RAM, 10)
	a := []string{
		"-name", o.Name,
		"-accel", o.Accel,
		"-cpu", "qemu64",
		"-machine", "q35,memory-backend=ram0",
		"-nodefaults", "-display", "none", "-S",
		"-m", strconv.FormatInt(o.RAM>>20, 10) + "M",
		// prealloc touches each page without changing it, so a prefilled
		// file keeps its content.
		"-object", "memory-backend-file,id=ram0,size=" + size + ",mem-path=" + v.shmPath + ",share=on,prealloc=on",
		"-blockdev", "driver=file,filename=" + v.DiskPath + ",node-name=disk0-file",
		"-blockdev", "driver=raw,file=disk0-file,node-name=disk0",
		"-device", "virtio-blk-pci,drive=disk0,id=vd0",
		"-qmp", "unix:" + v.QMPPath + ",server=on,wait=off",
	}
	if o.Incoming {
		a = append(a, "-incoming", "defer")
	}
	return a
}

// startQEMU starts the process with its output in the log file.
func (v *VM) startQEMU() error {
	os.Remove(v.QMPPath) // a stale socket would be dialled before QEMU listens
	log, err := os.Create(v.LogPath)
	if err != nil {
		return fmt.Errorf("vmtest: create log: %w", err)
	}
	v.log = log
	cmd := exec.Command(v.Options.Binary, v.args()...)
	cmd.Stdout = log
	cmd.Stderr = log
	// QEMU must not outlive the test process, even if it is killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("vmtest: start QEMU: %w", err)
	}
	v.cmd = cmd
	go v.wait()
	return nil
}

// wait reaps QEMU. It is owned by the VM: Close waits for exited.
func (v *VM) wait() {
	v.waitErr = v.cmd.Wait()
	close(v.exited)
}

// connect dials the monitor, giving up early if QEMU exits.
func (v *VM) connect(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		select {
		case <-v.exited:
			cancel()
		case <-stop:
		}
	})
	c, err := qmp.Dial(ctx, v.QMPPath)
	close(stop)
	wg.Wait()
	if err != nil {
		// A QEMU that fails at start may accept the QMP connection and
		// drop it as it exits, before the exit is reaped: give the exit a
		// moment to show.
		select {
		case <-v.exited:
			return fmt.Errorf("vmtest: QEMU exited (%v): %s", v.waitErr, v.logTail())
		case <-time.After(2 * time.Second):
		}
		return fmt.Errorf("vmtest: connect to QMP: %w", err)
	}
	v.QMP = c
	return nil
}

// PID is the QEMU process's ID, for reading its CPU time.
func (v *VM) PID() int { return v.cmd.Process.Pid }

// Alive reports whether the QEMU process is still running.
func (v *VM) Alive() bool {
	if v.cmd == nil {
		return false
	}
	select {
	case <-v.exited:
		return false
	default:
		return true
	}
}

// Close stops QEMU (QMP quit, then SIGKILL after a few seconds), waits for
// it to exit and releases the RAM file. It is idempotent and safe to call on
// a VM that failed to start.
func (v *VM) Close() error {
	v.closeMu.Lock()
	defer v.closeMu.Unlock()
	if v.closed {
		return v.closeErr
	}
	v.closed = true
	var errs []error
	if v.cmd != nil {
		grace := time.Duration(0) // kill at once unless quit was accepted
		if v.Alive() && v.QMP != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			if v.QMP.Quit(ctx) == nil {
				grace = 5 * time.Second
			}
			cancel()
		}
		t := time.NewTimer(grace)
		select {
		case <-v.exited:
		case <-t.C:
			v.cmd.Process.Kill()
			<-v.exited
		}
		t.Stop()
	}
	if v.QMP != nil {
		if err := v.QMP.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if v.ram != nil {
		if err := v.ram.Close(); err != nil {
			errs = append(errs, fmt.Errorf("vmtest: close RAM file: %w", err))
		}
	}
	if v.shmPath != "" {
		if err := os.Remove(v.shmPath); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("vmtest: remove RAM file: %w", err))
		}
		v.shmPath = ""
	}
	if v.log != nil {
		v.log.Close()
	}
	v.closeErr = errors.Join(errs...)
	return v.closeErr
}

// logTail returns the end of QEMU's log, for error messages.
func (v *VM) logTail() string {
	b, err := os.ReadFile(v.LogPath)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	if len(b) > 2048 {
		b = b[len(b)-2048:]
	}
	return string(b)
}
