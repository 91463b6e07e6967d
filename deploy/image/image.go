// Package image builds migtun's OCI image without a container daemon: one
// layer holding the static migtun binary, a passwd entry for its user, and
// the directories it writes to, written as an OCI image layout and as an
// OCI archive (the layout in a tar file, which podman loads). migtun needs
// no CA bundle: peers are verified against the CA given with --ca.
package image

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Paths and identity inside the image.
const (
	// BinaryPath is where the image holds migtun; it is the entrypoint.
	BinaryPath = "/usr/local/bin/migtun"
	// UID and GID are the user migtun runs as (not root).
	UID, GID = 65532, 65532
	// User is the image config's user.
	User = "65532:65532"
)

// Options says what to build.
type Options struct {
	// Binary is the path of a static migtun binary (CGO_ENABLED=0).
	Binary string
	// Version labels the image (org.opencontainers.image.version) and
	// names it in the layout (org.opencontainers.image.ref.name).
	Version string
	// Arch is the GOARCH the binary was built for; default amd64.
	Arch string
	// Created is the image's creation time, for reproducible builds (for
	// example the commit's time); zero means the Unix epoch.
	Created time.Time
	// Source is the org.opencontainers.image.source label; optional.
	Source string
}

// Build makes the image.
func Build(o Options) (v1.Image, error) {
	bin, err := os.ReadFile(o.Binary)
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	if o.Arch == "" {
		o.Arch = "amd64"
	}
	if o.Created.IsZero() {
		o.Created = time.Unix(0, 0)
	}
	layerTar, err := rootfs(bin, o.Created)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, fmt.Errorf("image: layer: %w", err)
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	if img, err = mutate.AppendLayers(img, layer); err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", o.Arch
	cf.Created = v1.Time{Time: o.Created.UTC()}
	labels := map[string]string{
		"org.opencontainers.image.title":       "migtun",
		"org.opencontainers.image.description": "carries live migrations of QEMU virtual machines between hosts through one encrypted port",
		"org.opencontainers.image.version":     o.Version,
	}
	if o.Source != "" {
		labels["org.opencontainers.image.source"] = o.Source
	}
	cf.Config = v1.Config{
		Entrypoint: []string{BinaryPath},
		Cmd:        []string{"version"},
		User:       User,
		WorkingDir: "/",
		Env:        []string{"TMPDIR=/tmp"},
		Labels:     labels,
		ExposedPorts: map[string]struct{}{
			"7400/tcp": {}, "7400/udp": {}, "9740/tcp": {},
		},
	}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	return img, nil
}

// RefName is the layout's name of an image of version.
func RefName(version string) string { return "migtun:" + version }

// WriteLayout writes img as an OCI image layout in dir, replacing what
// dir held.
func WriteLayout(img v1.Image, dir, version string) error {
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("image: %w", err)
	}
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return fmt.Errorf("image: %w", err)
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{
		"org.opencontainers.image.ref.name": RefName(version),
	})); err != nil {
		return fmt.Errorf("image: %w", err)
	}
	return nil
}

// WriteArchive writes the OCI layout in dir as an OCI archive: a tar file
// of the layout's files, in name order.
func WriteArchive(dir, archive string) (err error) {
	var names []string
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err == nil && path != dir {
			names = append(names, path)
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("image: %w", err)
	}
	sort.Strings(names)
	f, err := os.Create(archive)
	if err != nil {
		return fmt.Errorf("image: %w", err)
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("image: %w", cerr)
		}
	}()
	tw := tar.NewWriter(f)
	for _, path := range names {
		fi, err := os.Stat(path)
		if err != nil {
			return fmt.Errorf("image: %w", err)
		}
		rel, _ := filepath.Rel(dir, path)
		h := &tar.Header{Name: filepath.ToSlash(rel), Mode: 0o644, ModTime: time.Unix(0, 0), Format: tar.FormatPAX}
		if fi.IsDir() {
			h.Typeflag, h.Name, h.Mode = tar.TypeDir, h.Name+"/", 0o755
			if err := tw.WriteHeader(h); err != nil {
				return fmt.Errorf("image: %w", err)
			}
			continue
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("image: %w", err)
		}
		h.Typeflag, h.Size = tar.TypeReg, int64(len(data))
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("image: %w", err)
		}
		if _, err := tw.Write(data); err != nil {
			return fmt.Errorf("image: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("image: %w", err)
	}
	return nil
}

// Entry is one file or directory of the image's layer.
type Entry struct {
	Name     string // path without the leading slash
	Mode     int64
	UID, GID int
	Data     []byte // nil for a directory
}

// Contents lists the image's files, with bin as migtun's binary.
func Contents(bin []byte) []Entry {
	passwd := fmt.Sprintf("root:x:0:0:root:/root:/sbin/nologin\nmigtun:x:%d:%d:migtun:/nonexistent:/sbin/nologin\n", UID, GID)
	group := fmt.Sprintf("root:x:0:\nmigtun:x:%d:\n", GID)
	return []Entry{
		{Name: "etc/", Mode: 0o755},
		{Name: "etc/group", Mode: 0o644, Data: []byte(group)},
		{Name: "etc/passwd", Mode: 0o644, Data: []byte(passwd)},
		{Name: "run/", Mode: 0o755},
		{Name: "run/migtun/", Mode: 0o700, UID: UID, GID: GID},
		{Name: "tmp/", Mode: 0o1777},
		{Name: "usr/", Mode: 0o755},
		{Name: "usr/local/", Mode: 0o755},
		{Name: "usr/local/bin/", Mode: 0o755},
		{Name: BinaryPath[1:], Mode: 0o755, Data: bin},
	}
}

// rootfs is the layer's tar.
func rootfs(bin []byte, mtime time.Time) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range Contents(bin) {
		h := &tar.Header{Name: e.Name, Mode: e.Mode, Uid: e.UID, Gid: e.GID, ModTime: mtime, Format: tar.FormatPAX}
		if e.Data == nil {
			h.Typeflag = tar.TypeDir
		} else {
			h.Typeflag, h.Size = tar.TypeReg, int64(len(e.Data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("image: %w", err)
		}
		if _, err := tw.Write(e.Data); err != nil {
			return nil, fmt.Errorf("image: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	return buf.Bytes(), nil
}
