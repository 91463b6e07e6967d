// Command migtun-image builds migtun's OCI image from a static migtun
// binary, without a container daemon, as an OCI layout and an OCI archive.
//
//	go run ./cmd/migtun-image --binary ../bin/migtun-static --version v1 \
//	    --layout ../bin/migtun-image --archive ../bin/migtun-image.tar
//
// Load the archive with `podman load -i bin/migtun-image.tar`, or copy the
// layout to a registry with any OCI tool (skopeo copy oci:bin/migtun-image …).
package main

import (
	"flag"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"time"

	"github.com/migtun/migtun/deploy/image"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "migtun-image:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("migtun-image", flag.ContinueOnError)
	binary := fs.String("binary", "", "the static migtun binary (built with CGO_ENABLED=0)")
	version := fs.String("version", "dev", "the image's version label and name in the layout")
	arch := fs.String("arch", runtime.GOARCH, "the binary's GOARCH")
	created := fs.String("created", "0", "creation time, Unix seconds (for example the commit's time)")
	source := fs.String("source", "", "the org.opencontainers.image.source label")
	layoutDir := fs.String("layout", "", "write an OCI image layout into this directory (replaced)")
	archive := fs.String("archive", "", "also write the layout as an OCI archive (tar) here")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *binary == "" || *layoutDir == "" {
		return fmt.Errorf("--binary and --layout are required")
	}
	secs, err := strconv.ParseInt(*created, 10, 64)
	if err != nil {
		return fmt.Errorf("--created: %w", err)
	}
	img, err := image.Build(image.Options{Binary: *binary, Version: *version, Arch: *arch,
		Created: time.Unix(secs, 0), Source: *source})
	if err != nil {
		return err
	}
	if err := image.WriteLayout(img, *layoutDir, *version); err != nil {
		return err
	}
	if *archive != "" {
		if err := image.WriteArchive(*layoutDir, *archive); err != nil {
			return err
		}
	}
	digest, err := img.Digest()
	if err != nil {
		return err
	}
	fmt.Printf("%s %s in %s\n", image.RefName(*version), digest, *layoutDir)
	return nil
}
