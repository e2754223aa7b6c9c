// Package deploy_test checks the Kubernetes manifests against the real
// apiserver: they must be accepted as written, and the store's
// ServiceAccount must get exactly the access it needs.
package deploy_test

import (
	"context"
	"os/exec"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/statefulkv/store/internal/kubetest"
)

const ns = "store-manifests"

func kubectl(t *testing.T, kubeconfig string, args ...string) (string, error) {
	t.Helper()
	out, err := exec.Command("kubectl", append([]string{"--kubeconfig", kubeconfig}, args...)...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func TestManifests_ServerSideDryRunAndRBAC(t *testing.T) {
	if _, err := exec.LookPath("kubectl"); err != nil {
		t.Fatal("kubectl is not on PATH: install it (apt-get install -y kubectl) to run the manifest tests")
	}
	cp := kubetest.Start(t)
	if _, err := cp.Client.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	admin := cp.Kubeconfig(t, "manifest-admin", "system:masters")

	out, err := kubectl(t, admin, "apply", "--dry-run=server", "-n", ns, "-k", ".")
	if err != nil {
		t.Fatalf("kubectl apply --dry-run=server -k deploy/ failed: %v\n%s", err, out)
	}
	for _, want := range []string{
		"serviceaccount/store", "role.rbac.authorization.k8s.io/store", "rolebinding.rbac.authorization.k8s.io/store",
		"service/store-peers", "service/store", "statefulset.apps/store", "poddisruptionbudget.policy/store",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("dry run did not create %s:\n%s", want, out)
		}
	}

	// Apply the RBAC part for real, then ask the apiserver what the
	// ServiceAccount may do.
	if out, err := kubectl(t, admin, "apply", "-n", ns, "-f", "rbac.yaml"); err != nil {
		t.Fatalf("apply rbac.yaml: %v\n%s", err, out)
	}
	sa := "system:serviceaccount:" + ns + ":store"
	tests := []struct {
		verb, resource string
		allowed        bool
	}{
		{"get", "leases.coordination.k8s.io", true},
		{"create", "leases.coordination.k8s.io", true},
		{"update", "leases.coordination.k8s.io", true},
		{"delete", "leases.coordination.k8s.io", false},
		{"list", "leases.coordination.k8s.io", false},
		{"watch", "leases.coordination.k8s.io", false},
		{"get", "secrets", false},
		{"list", "secrets", false},
		{"list", "pods", false},
		{"create", "pods", false},
		{"get", "statefulsets.apps/store", true},
		{"get", "statefulsets.apps/other", false},
		{"list", "statefulsets.apps", false},
		{"update", "statefulsets.apps", false},
	}
	for _, tt := range tests {
		out, err := kubectl(t, admin, "auth", "can-i", tt.verb, tt.resource, "-n", ns, "--as", sa)
		got := err == nil && out == "yes"
		if got != tt.allowed {
			t.Errorf("can %s %s %s? got %q (%v), want allowed=%v", sa, tt.verb, tt.resource, out, err, tt.allowed)
		}
	}
	// No access outside its own namespace.
	if out, _ := kubectl(t, admin, "auth", "can-i", "get", "leases.coordination.k8s.io", "-n", "default", "--as", sa); out != "no" {
		t.Errorf("the ServiceAccount can read Leases in another namespace: %q", out)
	}
}
