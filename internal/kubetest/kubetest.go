// Package kubetest starts the real Kubernetes control plane (kube-apiserver
// backed by etcd) that the integration tests and the local cluster
// (`make cluster`) run against.
//
// The binaries are built from the Go module proxy by hack/controlplane.sh
// (`make controlplane`) and cached outside the checkout. When they are
// missing, Start fails the test with a message that says to run
// `make controlplane`; it never skips, so CI cannot go green without them.
//
// Tests use Start, which ties the control plane to the test; the local
// cluster uses StartControlPlane and stops it itself.
package kubetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/yaml"
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
	// envtest lets KUBEBUILDER_ASSETS override BinaryAssetsDirectory; make
	// sure a stray value from a developer's shell cannot pick other binaries.
	t.Setenv("KUBEBUILDER_ASSETS", "")
	cp, err := StartControlPlane()
	if err != nil {
		t.Fatalf("kubetest: %v", err)
	}
	t.Cleanup(func() {
		if err := cp.Stop(); err != nil {
			t.Errorf("kubetest: stop control plane: %v", err)
		}
	})
	return cp
}

// ErrMissingBinaries means the control plane has not been built.
var ErrMissingBinaries = errors.New("control plane binaries missing: run make controlplane (it builds them from the Go module proxy and caches them)")

// StartControlPlane launches kube-apiserver and etcd; the caller must Stop.
func StartControlPlane() (*ControlPlane, error) {
	dir, err := BinDir()
	if err != nil {
		return nil, err
	}
	for _, bin := range []string{"kube-apiserver", "etcd"} {
		if _, err := os.Stat(filepath.Join(dir, bin)); err != nil {
			return nil, fmt.Errorf("%s is not in %s: %w", bin, dir, ErrMissingBinaries)
		}
	}
	// controller-runtime prints a stack trace warning when no logger is set.
	ctrllog.SetLogger(logr.Discard())
	if err := os.Setenv("KUBEBUILDER_ASSETS", dir); err != nil {
		return nil, err
	}
	env := &envtest.Environment{
		BinaryAssetsDirectory: dir,
		// Two cores shared with a parallel `go test ./...` under -race make the
		// default 20s too tight for a cold apiserver.
		ControlPlaneStartTimeout: 90 * time.Second,
		ControlPlaneStopTimeout:  30 * time.Second,
	}
	cfg, err := env.Start()
	if err != nil {
		return nil, fmt.Errorf("start control plane from %s: %w", dir, err)
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		_ = env.Stop()
		return nil, fmt.Errorf("client: %w", err)
	}
	return &ControlPlane{Config: cfg, Client: client, Env: env}, nil
}

// Stop stops kube-apiserver and etcd and removes their temporary files.
func (cp *ControlPlane) Stop() error { return cp.Env.Stop() }

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
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := cp.WriteKubeconfig(path, name, groups...); err != nil {
		t.Fatalf("kubetest: %v", err)
	}
	return path
}

// WriteKubeconfig is Kubeconfig for callers outside tests.
func (cp *ControlPlane) WriteKubeconfig(path, name string, groups ...string) error {
	u, err := cp.Env.AddUser(envtest.User{Name: name, Groups: groups}, nil)
	if err != nil {
		return fmt.Errorf("add user %s: %w", name, err)
	}
	kc, err := u.KubeConfig()
	if err != nil {
		return fmt.Errorf("kubeconfig for %s: %w", name, err)
	}
	return os.WriteFile(path, kc, 0o600)
}

// ApplyRBAC creates namespace and the objects of deploy/rbac.yaml in it,
// exactly as written (the tests and the local cluster run the store with
// this Role and nothing more).
func (cp *ControlPlane) ApplyRBAC(ctx context.Context, namespace string) error {
	root, err := ModuleRoot()
	if err != nil {
		return err
	}
	raw, err := os.ReadFile(filepath.Join(root, "deploy", "rbac.yaml"))
	if err != nil {
		return err
	}
	if _, err := cp.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace}}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create namespace %s: %w", namespace, err)
	}
	for _, doc := range bytes.Split(raw, []byte("\n---\n")) {
		var meta metav1.TypeMeta
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			return fmt.Errorf("deploy/rbac.yaml: %w", err)
		}
		switch meta.Kind {
		case "ServiceAccount":
			var o corev1.ServiceAccount
			if err = yaml.UnmarshalStrict(doc, &o); err == nil {
				_, err = cp.Client.CoreV1().ServiceAccounts(namespace).Create(ctx, &o, metav1.CreateOptions{})
			}
		case "Role":
			var o rbacv1.Role
			if err = yaml.UnmarshalStrict(doc, &o); err == nil {
				_, err = cp.Client.RbacV1().Roles(namespace).Create(ctx, &o, metav1.CreateOptions{})
			}
		case "RoleBinding":
			var o rbacv1.RoleBinding
			if err = yaml.UnmarshalStrict(doc, &o); err == nil {
				_, err = cp.Client.RbacV1().RoleBindings(namespace).Create(ctx, &o, metav1.CreateOptions{})
			}
		default:
			err = fmt.Errorf("unexpected kind %q", meta.Kind)
		}
		if err != nil {
			return fmt.Errorf("deploy/rbac.yaml %s: %w", meta.Kind, err)
		}
	}
	return nil
}
