package main

import (
	"archive/tar"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

func TestBuild_ImageRunsStoreAsNonRoot(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "store")
	if err := os.WriteFile(bin, []byte("#!fake store binary"), 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "image.tar")
	if err := build(bin, "example.test/store:t1", out, spec{name: "store", user: nonroot, data: true, port: 8080, version: "t1"}); err != nil {
		t.Fatal(err)
	}
	img, err := tarball.ImageFromPath(out, nil)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.Config.User != "65532:65532" || len(cf.Config.Entrypoint) != 1 || cf.Config.Entrypoint[0] != "/store" || cf.OS != "linux" {
		t.Fatalf("config = %+v", cf.Config)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers: %d, %v", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	found := false
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Name == "store" {
			body, _ := io.ReadAll(tr)
			found = h.Mode == 0o755 && string(body) == "#!fake store binary"
		}
	}
	if !found {
		t.Fatal("the image has no executable /store with the binary's bytes")
	}
}
