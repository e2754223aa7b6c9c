// Command pause packs the pause binary (./cmd/pause) into a one-layer image
// and writes it as a docker-archive tarball that `ctr images import` loads.
// It is the local cluster's pinned sandbox image: containerd never pulls it.
//
// Usage (see hack/kube.sh): pause -binary pause -tag statefulkv.local/pause:1 -out pause-image.tar
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

// nobody is the uid/gid upstream's pause image runs as: the sandbox needs
// no privilege at all.
const nobody = "65535:65535"

func main() {
	binary := flag.String("binary", "pause", "static pause binary to put in the image")
	tag := flag.String("tag", "statefulkv.local/pause:1", "image reference to record in the tarball")
	out := flag.String("out", "pause-image.tar", "docker-archive tarball to write")
	flag.Parse()
	if err := build(*binary, *tag, *out); err != nil {
		fmt.Fprintln(os.Stderr, "pause:", err)
		os.Exit(1)
	}
}

func build(binary, tag, out string) error {
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
		return fmt.Errorf("rootfs: %w", err)
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	})
	if err != nil {
		return fmt.Errorf("layer: %w", err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return fmt.Errorf("append layer: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Created = v1.Time{Time: time.Unix(0, 0).UTC()} // reproducible
	cf.Config.Entrypoint = []string{"/pause"}
	cf.Config.User = nobody
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return fmt.Errorf("config: %w", err)
	}
	if err := tarball.WriteToFile(out, ref, img); err != nil {
		return fmt.Errorf("write %s: %w", out, err)
	}
	return nil
}

// rootfs is the image's only layer: /pause and nothing else.
func rootfs(bin []byte) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	hdr := tar.Header{Name: "pause", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(bin)), ModTime: time.Unix(0, 0)}
	if err := tw.WriteHeader(&hdr); err != nil {
		return nil, err
	}
	if _, err := tw.Write(bin); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
