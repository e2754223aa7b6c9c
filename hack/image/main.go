// Command image builds the store's container image without a Docker daemon
// or network: it puts a static store binary on an empty base (nothing else
// in the image: no shell, no package manager) with a non-root user, and
// writes a docker-archive tarball that `docker load -i`, `kind load
// image-archive` or `crane push` accept.
//
// Usage (see `make image`): image -binary bin/store-linux -tag statefulkv/store:dev -out bin/store-image.tar
//
// It lives in its own module so the product's go.mod stays free of
// go-containerregistry.
package main

import (
	"archive/tar"
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// nonroot is the uid/gid distroless uses for its "nonroot" user; the
// StatefulSet's securityContext runs as the same.
const nonroot = "65532:65532"

func main() {
	binary := flag.String("binary", "bin/store-linux", "static store binary (CGO_ENABLED=0) to put in the image")
	tag := flag.String("tag", "statefulkv/store:dev", "image reference to record in the tarball")
	out := flag.String("out", "bin/store-image.tar", "docker-archive tarball to write")
	version := flag.String("version", "dev", "version label")
	flag.Parse()
	if err := build(*binary, *tag, *out, *version); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
	fmt.Printf("wrote %s (%s); load it with: docker load -i %s\n", *out, *tag, *out)
}

func build(binary, tag, out, version string) error {
	ref, err := name.ParseReference(tag)
	if err != nil {
		return fmt.Errorf("-tag %q: %w", tag, err)
	}
	bin, err := os.ReadFile(binary)
	if err != nil {
		return fmt.Errorf("-binary: %w", err)
	}
	layerTar, err := rootfs(bin)
	if err != nil {
		return err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	})
	if err != nil {
		return fmt.Errorf("layer: %w", err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Created = v1.Time{Time: time.Unix(0, 0).UTC()} // reproducible
	cf.Config.Entrypoint = []string{"/store"}
	cf.Config.User = nonroot
	cf.Config.WorkingDir = "/"
	cf.Config.ExposedPorts = map[string]struct{}{"8080/tcp": {}}
	cf.Config.Labels = map[string]string{"org.opencontainers.image.version": version}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return err
	}
	return tarball.WriteToFile(out, ref, img)
}

// rootfs is the image's only layer: /store, and /data owned by the nonroot
// user for a run without a mounted volume.
func rootfs(bin []byte) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	epoch := time.Unix(0, 0)
	entries := []struct {
		hdr  tar.Header
		body []byte
	}{
		{tar.Header{Name: "data/", Typeflag: tar.TypeDir, Mode: 0o750, Uid: 65532, Gid: 65532, ModTime: epoch}, nil},
		{tar.Header{Name: "store", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(bin)), ModTime: epoch}, bin},
	}
	for _, e := range entries {
		if err := tw.WriteHeader(&e.hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write(e.body); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
