// Command image builds the store's container image without a Docker daemon
// or network: it puts a static store binary on an empty base (nothing else
// in the image: no shell, no package manager) with a non-root user, and
// writes a docker-archive tarball that `docker load -i`, `kind load
// image-archive` or `crane push` accept.
//
// Usage (see `make image`): image -binary bin/store-linux -tag statefulkv/store:dev -out bin/store-image.tar
//
// It packs the local Kubernetes' pause image the same way (hack/kube.sh):
// image -name pause -user 65535:65535 -data=false -port 0 -binary pause ...
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

// spec is what goes into the image besides the binary.
type spec struct {
	// name is the binary's file name at the root and the entrypoint.
	name string
	// user runs the entrypoint (uid:gid).
	user string
	// data adds /data owned by user, for a run without a mounted volume.
	data bool
	// port, if not 0, is exposed over TCP.
	port int
	// version labels the image.
	version string
}

func main() {
	binary := flag.String("binary", "bin/store-linux", "static binary (CGO_ENABLED=0) to put in the image")
	tag := flag.String("tag", "statefulkv/store:dev", "image reference to record in the tarball")
	out := flag.String("out", "bin/store-image.tar", "docker-archive tarball to write")
	var sp spec
	flag.StringVar(&sp.version, "version", "dev", "version label")
	flag.StringVar(&sp.name, "name", "store", "file name of the binary at the image's root, and its entrypoint")
	flag.StringVar(&sp.user, "user", nonroot, "uid:gid the entrypoint runs as")
	flag.BoolVar(&sp.data, "data", true, "add /data owned by -user")
	flag.IntVar(&sp.port, "port", 8080, "TCP port to expose (0: none)")
	flag.Parse()
	if err := build(*binary, *tag, *out, sp); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
	fmt.Printf("wrote %s (%s); load it with: docker load -i %s\n", *out, *tag, *out)
}

func build(binary, tag, out string, sp spec) error {
	ref, err := name.ParseReference(tag)
	if err != nil {
		return fmt.Errorf("-tag %q: %w", tag, err)
	}
	var uid, gid int
	if _, err := fmt.Sscanf(sp.user, "%d:%d", &uid, &gid); err != nil {
		return fmt.Errorf("-user %q is not uid:gid: %w", sp.user, err)
	}
	bin, err := os.ReadFile(binary)
	if err != nil {
		return fmt.Errorf("-binary: %w", err)
	}
	layerTar, err := rootfs(bin, sp, uid, gid)
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
	cf.Config.Entrypoint = []string{"/" + sp.name}
	cf.Config.User = sp.user
	cf.Config.WorkingDir = "/"
	if sp.port != 0 {
		cf.Config.ExposedPorts = map[string]struct{}{fmt.Sprintf("%d/tcp", sp.port): {}}
	}
	cf.Config.Labels = map[string]string{"org.opencontainers.image.version": sp.version}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return err
	}
	return tarball.WriteToFile(out, ref, img)
}

// rootfs is the image's only layer: the binary, and with sp.data /data
// owned by the user for a run without a mounted volume.
func rootfs(bin []byte, sp spec, uid, gid int) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	epoch := time.Unix(0, 0)
	type entry struct {
		hdr  tar.Header
		body []byte
	}
	var entries []entry
	if sp.data {
		entries = append(entries, entry{tar.Header{Name: "data/", Typeflag: tar.TypeDir, Mode: 0o750, Uid: uid, Gid: gid, ModTime: epoch}, nil})
	}
	entries = append(entries, entry{tar.Header{Name: sp.name, Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(bin)), ModTime: epoch}, bin})
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
