package vmtest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"runtime"
	"sync"
)

// fillChunk is the region each FillRandom worker generates per seed; it
// fixes the output for a given seed regardless of the number of workers.
const fillChunk = 8 << 20

// FillRandom overwrites the first size bytes of f with pseudo-random bytes
// from ChaCha8 seeded by seed, using all CPUs. The content depends only on
// seed and size.
func FillRandom(ctx context.Context, f *os.File, size int64, seed uint64) error {
	return fill(ctx, f, size, seed, false)
}

// FillCompressible is FillRandom with only the first quarter of each 4 KiB
// page random and the rest a repeated text, as pages of code and text are:
// such content compresses about fourfold, and has no page of zeros.
func FillCompressible(ctx context.Context, f *os.File, size int64, seed uint64) error {
	return fill(ctx, f, size, seed, true)
}

// compressibleText repeats in the compressible part of each page.
const compressibleText = "migtun moves live virtual machines between hosts over one encrypted port. "

func fill(ctx context.Context, f *os.File, size int64, seed uint64, compressible bool) error {
	var text []byte
	for len(text) < 3<<10 {
		text = append(text, compressibleText...)
	}
	chunks := (size + fillChunk - 1) / fillChunk
	workers := int64(runtime.GOMAXPROCS(0))
	var wg sync.WaitGroup
	errs := make([]error, workers)
	for w := range workers {
		wg.Go(func() {
			buf := make([]byte, fillChunk)
			for c := w; c < chunks; c += workers {
				if err := ctx.Err(); err != nil {
					errs[w] = err
					return
				}
				var key [32]byte
				for i := range 8 {
					key[i] = byte(seed >> (8 * i))
					key[8+i] = byte(uint64(c) >> (8 * i))
				}
				rand.NewChaCha8(key).Read(buf)
				if compressible {
					for p := 0; p < len(buf); p += 4 << 10 {
						copy(buf[p+1<<10:p+4<<10], text)
					}
				}
				off := c * fillChunk
				n := min(int64(fillChunk), size-off)
				if _, err := f.WriteAt(buf[:n], off); err != nil {
					errs[w] = fmt.Errorf("vmtest: fill %s: %w", f.Name(), err)
					return
				}
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// HashFile returns the hex SHA-256 of the file at path, read in a stream.
func HashFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("vmtest: hash: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.CopyBuffer(h, f, make([]byte, 1<<20)); err != nil {
		return "", fmt.Errorf("vmtest: hash %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// ErrMismatch means two images that should be equal differ.
var ErrMismatch = errors.New("vmtest: images differ")

// CompareImages checks that src and dst have identical RAM and disk
// content. The error names what differs and wraps [ErrMismatch].
func CompareImages(src, dst *VM) error {
	var errs []error
	for _, p := range []struct{ what, a, b string }{
		{"RAM", src.RAMPath, dst.RAMPath},
		{"disk", src.DiskPath, dst.DiskPath},
	} {
		if err := compareFiles(p.a, p.b); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", p.what, err))
		}
	}
	return errors.Join(errs...)
}

// CompareRAM checks that src and dst have identical RAM, for migrations
// that move no disk. The error wraps [ErrMismatch].
func CompareRAM(src, dst *VM) error {
	if err := compareFiles(src.RAMPath, dst.RAMPath); err != nil {
		return fmt.Errorf("RAM: %w", err)
	}
	return nil
}

// compareFiles compares two files by hash, hashing both at once, and
// locates the first difference on mismatch.
func compareFiles(a, b string) error {
	var ha, hb string
	var ea, eb error
	var wg sync.WaitGroup
	wg.Go(func() { ha, ea = HashFile(a) })
	hb, eb = HashFile(b)
	wg.Wait()
	if err := errors.Join(ea, eb); err != nil {
		return err
	}
	if ha == hb {
		return nil
	}
	where := firstDiff(a, b)
	return fmt.Errorf("%w: %s (sha256 %.12s) vs %s (sha256 %.12s)%s", ErrMismatch, a, ha, b, hb, where)
}

// firstDiff describes where two files first differ, best effort.
func firstDiff(a, b string) string {
	fa, err := os.Open(a)
	if err != nil {
		return ""
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return ""
	}
	defer fb.Close()
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); ; off += 1 << 20 {
		na, ea := io.ReadFull(fa, ba)
		nb, eb := io.ReadFull(fb, bb)
		if na != nb {
			return fmt.Sprintf("; sizes differ near offset %d", off+int64(min(na, nb)))
		}
		for i := range na {
			if ba[i] != bb[i] {
				return fmt.Sprintf("; first difference at offset %d", off+int64(i))
			}
		}
		if ea != nil || eb != nil {
			return ""
		}
	}
}
