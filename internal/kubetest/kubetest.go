// Package kubetest starts the real Kubernetes control plane (kube-apiserver
// backed by etcd) that the integration tests run against.
//
// The binaries are built from the Go module proxy by hack/controlplane.sh
// (`make controlplane`) and cached outside the checkout. When they are
// missing, Start fails the test with a message that says to run
// `make controlplane`; it never skips, so CI cannot go green without them.
//
// It is a test helper: only _test.go files import it.
package kubetest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"
)

// DirEnv overrides where the control plane binaries are looked up.
const DirEnv = "STATEFULKV_CONTROLPLANE_DIR"

// ControlPlane is a running kube-apiserver + etcd for one test.
type ControlPlane struct {
	// Config is an admin (system:masters) REST config.
	Config *rest.Config
	// Client is an admin clientset.
	Client kubernetes.Interface
	// Env is the underlying envtest environment, for adding users.
	Env *envtest.Environment
}

// Start launches a fresh control plane and stops it when the test ends.
func Start(t testing.TB) *ControlPlane {
	t.Helper()
	dir, err := BinDir()
	if err != nil {
		t.Fatalf("kubetest: %v", err)
	}
	for _, bin := range []string{"kube-apiserver", "etcd"} {
		if _, err := os.Stat(filepath.Join(dir, bin)); err != nil {
			t.Fatalf("kubetest: %s is missing from %s: run make controlplane (it builds the control plane from the Go module proxy and caches it)", bin, dir)
		}
	}
	env := &envtest.Environment{
		BinaryAssetsDirectory: dir,
		// Two cores shared with a parallel `go test ./...` under -race make the
		// default 20s too tight for a cold apiserver.
		ControlPlaneStartTimeout: 90 * time.Second,
		ControlPlaneStopTimeout:  30 * time.Second,
	}
	// envtest lets KUBEBUILDER_ASSETS override BinaryAssetsDirectory; make
	// sure a stray value from a developer's shell cannot pick other binaries.
	t.Setenv("KUBEBUILDER_ASSETS", dir)
	// controller-runtime prints a stack trace warning when no logger is set.
	ctrllog.SetLogger(logr.Discard())
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("kubetest: start control plane from %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := env.Stop(); err != nil {
			t.Errorf("kubetest: stop control plane: %v", err)
		}
	})
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatalf("kubetest: client: %v", err)
	}
	return &ControlPlane{Config: cfg, Client: client, Env: env}
}

// BinDir returns the folder holding kube-apiserver and etcd: $DirEnv if set,
// else the cache folder hack/controlplane.sh reports.
func BinDir() (string, error) {
	if d := os.Getenv(DirEnv); d != "" {
		return d, nil
	}
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	var out, errb bytes.Buffer
	cmd := exec.Command("bash", filepath.Join(root, "hack", "controlplane.sh"), "--dir")
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("hack/controlplane.sh --dir: %w: %s", err, errb.String())
	}
	return strings.TrimSpace(out.String()), nil
}

// ModuleRoot finds the repository root (the folder with the product go.mod)
// from the test's working directory.
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && bytes.HasPrefix(b, []byte("module github.com/statefulkv/store\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("kubetest: not inside the github.com/statefulkv/store module")
		}
		dir = parent
	}
}

// Kubeconfig writes a kubeconfig file for a user the apiserver authenticates
// by client certificate with the given name and groups, and returns its path.
// Name a ServiceAccount as "system:serviceaccount:<ns>:<name>" to act as it.
func (cp *ControlPlane) Kubeconfig(t testing.TB, name string, groups ...string) string {
	t.Helper()
	u, err := cp.Env.AddUser(envtest.User{Name: name, Groups: groups}, nil)
	if err != nil {
		t.Fatalf("kubetest: add user %s: %v", name, err)
	}
	kc, err := u.KubeConfig()
	if err != nil {
		t.Fatalf("kubetest: kubeconfig for %s: %v", name, err)
	}
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(path, kc, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
