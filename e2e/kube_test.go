//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/statefulkv/store/hack/kubecluster"
)

// env is the cluster the subtests share: one bring-up per run.
type env struct {
	root    string // the checkout
	cluster *kubecluster.Cluster
	client  *kubernetes.Clientset
	ledger  *ledger
}

// startCluster brings the local cluster up (after tearing down whatever an
// earlier run left), and registers a cleanup that tears it down and checks
// that the machine is as it was: no process, mount, bridge, veth, rule,
// cgroup, and the same sysctls and iptables rules as before.
func startCluster(t *testing.T) *env {
	t.Helper()
	ctx := context.Background()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	cpDir := scriptDir(t, root, "hack/controlplane.sh")
	kubeDir := scriptDir(t, root, "hack/kube.sh")
	image := filepath.Join(root, "bin", "store-image.tar")
	if _, err := os.Stat(image); err != nil {
		t.Fatalf("store image: %v (make e2e builds it with make image)", err)
	}
	cfg := kubecluster.Config{State: filepath.Join(root, ".kube-local"), ControlPlaneBin: cpDir, KubeBin: kubeDir, StoreImage: image}
	c, err := kubecluster.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	// Whatever an earlier run or a `make kube-up` left is torn down first,
	// so that the "before" below is the machine without any cluster.
	if err := c.Down(ctx); err != nil {
		t.Fatalf("teardown of an earlier cluster: %v", err)
	}
	beforeSysctls := kubecluster.Sysctls()
	beforeRules := kubecluster.IPTablesRules(ctx)

	begin := time.Now()
	upErr := c.Up(ctx)
	t.Cleanup(func() {
		begin := time.Now()
		if err := c.Down(context.Background()); err != nil {
			t.Errorf("kube down: %v", err)
		}
		t.Logf("teardown took %s", time.Since(begin).Round(100*time.Millisecond))
		if left := c.Leftovers(context.Background()); len(left) > 0 {
			t.Errorf("left behind after teardown:\n  %s", strings.Join(left, "\n  "))
		}
		if after := kubecluster.Sysctls(); !maps.Equal(after, beforeSysctls) {
			t.Errorf("sysctls differ after teardown:\n before %v\n after  %v", beforeSysctls, after)
		}
		if after := kubecluster.IPTablesRules(context.Background()); !slices.Equal(after, beforeRules) {
			t.Errorf("iptables rules differ after teardown:\n before %q\n after  %q", beforeRules, after)
		}
		if _, err := os.Stat("/sys/class/net/cni0"); err == nil {
			t.Errorf("the bridge cni0 is still there")
		}
	})
	if upErr != nil {
		t.Fatalf("kube up: %v", upErr)
	}
	t.Logf("bring-up took %s", time.Since(begin).Round(100*time.Millisecond))
	cs, err := c.Client()
	if err != nil {
		t.Fatal(err)
	}
	return &env{root: root, cluster: c, client: cs, ledger: newLedger()}
}

// scriptDir asks a build script where its cache is; the Makefile has
// built it already (make e2e depends on make kube).
func scriptDir(t *testing.T, root, script string) string {
	t.Helper()
	out, err := exec.Command("bash", filepath.Join(root, script), "--dir").Output()
	if err != nil {
		t.Fatalf("%s --dir: %v", script, err)
	}
	return strings.TrimSpace(string(out))
}

// kubectl runs the cluster's kubectl from the checkout (so -k deploy/ is the
// user's path) and returns its combined output.
func (e *env) kubectl(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, e.cluster.Kubectl(), args...)
	cmd.Dir = e.root
	cmd.Env = append(os.Environ(), "KUBECONFIG="+e.cluster.Kubeconfig())
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

func (e *env) mustKubectl(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := e.kubectl(ctx, args...)
	if err != nil {
		t.Fatalf("%v\n%s", err, e.diagnose())
	}
	return out
}

// diagnose is what a failing wait prints: pods, events, and each store
// pod's last log lines.
func (e *env) diagnose() string {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var b strings.Builder
	pods, _ := e.kubectl(ctx, "-n", ns, "get", "pods", "-o", "wide")
	b.WriteString("--- pods ---\n" + pods)
	events, _ := e.kubectl(ctx, "-n", ns, "get", "events", "--sort-by=.lastTimestamp")
	if lines := strings.Split(events, "\n"); len(lines) > 40 {
		events = strings.Join(lines[len(lines)-40:], "\n")
	}
	b.WriteString("--- events ---\n" + events)
	list, err := e.client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err == nil {
		for _, p := range list.Items {
			logs, _ := e.kubectl(ctx, "-n", ns, "logs", p.Name, "--tail=15")
			b.WriteString("--- logs " + p.Name + " ---\n" + logs)
		}
	}
	return b.String()
}

// waitFor polls cond every 200 ms until it holds or timeout passes, then
// fails with what was awaited, cond's last reason and the diagnosis.
func (e *env) waitFor(t *testing.T, timeout time.Duration, what string, cond func(ctx context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var last error
	for {
		if last = cond(ctx); last == nil {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s: not within %s: %v\n%s", what, timeout, last, e.diagnose())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// storePods lists the StatefulSet's pods by name.
func (e *env) storePods(ctx context.Context) ([]corev1.Pod, error) {
	list, err := e.client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=store"})
	if err != nil {
		return nil, err
	}
	slices.SortFunc(list.Items, func(a, b corev1.Pod) int { return strings.Compare(a.Name, b.Name) })
	return list.Items, nil
}

func podReady(p corev1.Pod) bool {
	if p.DeletionTimestamp != nil {
		return false
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// allReady holds when exactly n store pods exist, all Ready, every one of
// them names the same leader in /v1/status and sees all n as live members.
func (e *env) allReady(n int) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		pods, err := e.storePods(ctx)
		if err != nil {
			return err
		}
		if len(pods) != n {
			return fmt.Errorf("%d store pods, want %d", len(pods), n)
		}
		leaders := map[string]bool{}
		for _, p := range pods {
			if !podReady(p) {
				return fmt.Errorf("%s not Ready (%s)", p.Name, p.Status.Phase)
			}
			st, err := podStatus(ctx, p)
			if err != nil {
				return err
			}
			if st.Replication == nil || len(st.Replication.Members) != n {
				return fmt.Errorf("%s sees members %v, want %d", p.Name, st.members(), n)
			}
			for _, m := range st.Replication.Members {
				if !m.Live {
					return fmt.Errorf("%s sees %s as not live", p.Name, m.ID)
				}
			}
			leaders[st.Leader] = true
		}
		if len(leaders) != 1 || leaders[""] {
			return fmt.Errorf("pods disagree on the leader: %v", leaders)
		}
		return nil
	}
}

// leaderPod is the pod the Lease names, checked against the pods' status.
func (e *env) leaderPod(ctx context.Context) (string, error) {
	lease, err := e.client.CoordinationV1().Leases(ns).Get(ctx, "store-leader", metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("lease store-leader: %w", err)
	}
	if lease.Spec.HolderIdentity == nil || *lease.Spec.HolderIdentity == "" {
		return "", errors.New("lease store-leader has no holder")
	}
	return *lease.Spec.HolderIdentity, nil
}

// status is the part of GET /v1/status the tests read.
type status struct {
	Node        string `json:"node"`
	Role        string `json:"role"`
	Leader      string `json:"leader"`
	Ready       bool   `json:"ready"`
	Replication *struct {
		Members []struct {
			ID   string `json:"id"`
			Live bool   `json:"live"`
		} `json:"members"`
		LastContactMs int64 `json:"last_contact_ms"`
	} `json:"replication"`
}

func (s status) members() []string {
	var out []string
	if s.Replication != nil {
		for _, m := range s.Replication.Members {
			out = append(out, fmt.Sprintf("%s(live=%v)", m.ID, m.Live))
		}
	}
	return out
}

func podStatus(ctx context.Context, p corev1.Pod) (status, error) {
	var st status
	if p.Status.PodIP == "" {
		return st, fmt.Errorf("%s has no IP yet", p.Name)
	}
	body, code, err := httpDo(ctx, "GET", "http://"+p.Status.PodIP+":8080/v1/status", "", nil)
	if err != nil {
		return st, fmt.Errorf("%s /v1/status: %w", p.Name, err)
	}
	if code != 200 {
		return st, fmt.Errorf("%s /v1/status: %d %s", p.Name, code, body)
	}
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		return st, fmt.Errorf("%s /v1/status: %w", p.Name, err)
	}
	return st, nil
}
