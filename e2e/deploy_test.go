//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// ns is the namespace of the README's quick start.
const ns = "store"

// TestDeploy is one bring-up and the subtests in order; each starts by
// waiting for the state the previous one promised, so a failure is
// reported where it happens.
func TestDeploy(t *testing.T) {
	e := startCluster(t)
	if !t.Run("QuickStart", e.quickStart) {
		t.FailNow()
	}
	t.Run("LeaderAndPeers", e.leaderAndPeers)
	t.Run("PortForward", e.portForward)
	t.Run("DeleteLeader", func(t *testing.T) { e.deleteLeader(t, false) })
	t.Run("ForceDeleteLeader", func(t *testing.T) { e.deleteLeader(t, true) })
	t.Run("RolloutRestart", e.rolloutRestart)
	t.Run("Scale", e.scale)
	t.Run("PDBRefusesSecondEviction", e.pdb)
	t.Run("MemoryLimitHolds", e.memoryLimit)
	t.Run("CutOffPodGoesUnready", e.cutOff)
	t.Run("Ledger", func(t *testing.T) {
		e.waitFor(t, 2*time.Minute, "3 pods Ready", e.allReady(3))
		verifyLedger(t, e.serviceURL(t), e.ledger)
	})
}

// quickStart is the README's "On Kubernetes" section, line by line, with
// the image already imported by the bring-up.
func (e *env) quickStart(t *testing.T) {
	begin := time.Now()
	e.mustKubectl(t, "create", "namespace", ns)
	token := make([]byte, 32)
	_, _ = rand.Read(token)
	e.mustKubectl(t, "-n", ns, "create", "secret", "generic", "store-peer-token", "--from-literal=token="+base64.StdEncoding.EncodeToString(token))
	e.mustKubectl(t, "apply", "-n", ns, "-k", "deploy/")
	e.mustKubectl(t, "-n", ns, "rollout", "status", "statefulset/store", "--timeout=150s")
	e.waitFor(t, 2*time.Minute, "3 pods Ready with one leader and all members live", e.allReady(3))
	t.Logf("3/3 pods Ready, one leader, all members live %s after kubectl apply", time.Since(begin).Round(100*time.Millisecond))
}

func (e *env) leaderAndPeers(t *testing.T) {
	ctx := context.Background()
	e.waitFor(t, time.Minute, "3 pods Ready", e.allReady(3))
	leader, err := e.leaderPod(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pods, err := e.storePods(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range pods {
		names = append(names, p.Name)
		st, err := podStatus(ctx, p)
		if err != nil {
			t.Fatal(err)
		}
		if st.Leader != leader {
			t.Errorf("%s says the leader is %q, the Lease says %q", p.Name, st.Leader, leader)
		}
		if wantRole := map[bool]string{true: "leader", false: "follower"}[p.Name == leader]; st.Role != wantRole {
			t.Errorf("%s has role %q, want %q", p.Name, st.Role, wantRole)
		}
	}
	if !strings.Contains(strings.Join(names, ","), leader) {
		t.Fatalf("the Lease holder %q is not one of the pods %v", leader, names)
	}
	// The peers find each other by these names; the cluster DNS on the
	// bridge must give every pod's own address.
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, "10.88.0.1:53")
	}}
	for _, p := range pods {
		name := p.Name + ".store-peers." + ns + ".svc.cluster.local"
		addrs, err := r.LookupHost(ctx, name)
		if err != nil || len(addrs) != 1 || addrs[0] != p.Status.PodIP {
			t.Errorf("%s resolves to %v (%v), want [%s]", name, addrs, err, p.Status.PodIP)
		}
	}
	t.Logf("leader %s (Lease and /v1/status agree); %v resolve through store-peers and see each other live", leader, names)
}

// serviceURL is the store Service's VIP, which kube-proxy routes from the
// host to ready pods only: the path the load takes.
func (e *env) serviceURL(t *testing.T) string {
	t.Helper()
	svc, err := e.client.CoreV1().Services(ns).Get(context.Background(), "store", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return "http://" + svc.Spec.ClusterIP + ":8080"
}

// portForward is the README's client workflow: kubectl port-forward
// svc/store, then curl's requests, then a short storeload run.
func (e *env) portForward(t *testing.T) {
	e.waitFor(t, time.Minute, "3 pods Ready", e.allReady(3))
	base := e.startPortForward(t)
	ctx := context.Background()

	body, code, err := httpDo(ctx, "PUT", base+"/v1/kv/hello", `{"from":"port-forward"}`, nil)
	if err != nil || code != http.StatusCreated {
		t.Fatalf("PUT hello: %d %v %s", code, err, body)
	}
	var put struct {
		Version string `json:"version"`
	}
	_ = json.Unmarshal([]byte(body), &put)
	if body, code, err := httpDo(ctx, "GET", base+"/v1/kv/hello", "", nil); err != nil || code != 200 || body != `{"from":"port-forward"}` {
		t.Fatalf("GET hello: %d %v %q", code, err, body)
	}
	// Compare-and-set: the right version wins, a stale one gets 412.
	cas := http.Header{"If-Match": {`"` + put.Version + `"`}}
	if body, code, err := httpDo(ctx, "PUT", base+"/v1/kv/hello", `{"from":"cas"}`, cas); err != nil || code != 200 {
		t.Fatalf("CAS with the current version %s: %d %v %s", put.Version, code, err, body)
	}
	if body, code, err := httpDo(ctx, "PUT", base+"/v1/kv/hello", `{"from":"stale"}`, cas); err != nil || code != http.StatusPreconditionFailed {
		t.Fatalf("CAS with a stale version: %d %v %s, want 412", code, err, body)
	}
	e.ledger.add("hello", `{"from":"cas"}`)
	for i := range 3 {
		key := fmt.Sprintf("users/%d", i)
		if _, code, err := httpDo(ctx, "PUT", base+"/v1/kv/"+key, fmt.Sprintf(`{"id":%d}`, i), nil); err != nil || code/100 != 2 {
			t.Fatalf("PUT %s: %d %v", key, code, err)
		}
		e.ledger.add(key, fmt.Sprintf(`{"id":%d}`, i))
	}
	body, code, err = httpDo(ctx, "GET", base+"/v1/kv?prefix=users/&limit=2", "", nil)
	var page struct {
		Items []struct{ Key string } `json:"items"`
		Next  string                 `json:"next"`
	}
	if err != nil || code != 200 || json.Unmarshal([]byte(body), &page) != nil || len(page.Items) != 2 || page.Items[0].Key != "users/0" || page.Next == "" {
		t.Fatalf("list prefix=users/ limit=2: %d %v %s", code, err, body)
	}

	report := e.storeload(t, "-targets", base, "-duration", "5s", "-concurrency", "8", "-put-ratio", "0.5",
		"-keys", "1000", "-value-size", "256", "-key-prefix", "e2e-load/", "-timeout", "10s")
	t.Logf("storeload through kubectl port-forward svc/store (5s, 8 clients, 50%% PUT, 256 B):\n%s", report)
}

// startPortForward runs `kubectl port-forward svc/store :8080` (a free
// local port) until the test ends and returns its local URL.
func (e *env) startPortForward(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, e.cluster.Kubectl(), "-n", ns, "port-forward", "svc/store", ":8080")
	cmd.Env = append(os.Environ(), "KUBECONFIG="+e.cluster.Kubeconfig())
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); _ = cmd.Wait() })
	port := make(chan string, 1)
	go func() {
		re := regexp.MustCompile(`Forwarding from 127\.0\.0\.1:(\d+)`)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				select {
				case port <- m[1]:
				default:
				}
			}
		}
	}()
	select {
	case p := <-port:
		return "http://127.0.0.1:" + p
	case <-time.After(30 * time.Second):
		t.Fatalf("kubectl port-forward svc/store printed no local port in 30s\n%s", e.diagnose())
		return ""
	}
}

// storeload builds cmd/storeload once and runs it with args.
func (e *env) storeload(t *testing.T, args ...string) string {
	t.Helper()
	bin := filepath.Join(e.cluster.State(), "storeload")
	if _, err := os.Stat(bin); err != nil {
		build := exec.Command("go", "build", "-o", bin, "./cmd/storeload")
		build.Dir = e.root
		if out, err := build.CombinedOutput(); err != nil {
			t.Fatalf("build storeload: %v\n%s", err, out)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("storeload %v: %v\n%s", args, err, out)
	}
	return strings.TrimSpace(string(out))
}

// startLoad starts the writers through the Service and returns once they
// have a baseline of acknowledged writes, so a gap measured after it is the
// disruption's and not the load's start.
func (e *env) startLoad(t *testing.T, phase string) *load {
	t.Helper()
	ld := startLoad(e.serviceURL(t), phase, e.ledger)
	t.Cleanup(func() { ld.cancel(); ld.wg.Wait() }) // a failed subtest leaves no writers behind
	e.waitFor(t, 30*time.Second, "a baseline of 20 acknowledged writes", func(context.Context) error {
		if n := ld.acked(); n < 20 {
			return fmt.Errorf("%d acknowledged (%s)", n, ld.summary())
		}
		return nil
	})
	return ld
}

// deleteLeader deletes the Lease holder's pod under load, gracefully or
// with --grace-period=0 --force, and measures the longest time without an
// acknowledged write until the StatefulSet is whole again.
func (e *env) deleteLeader(t *testing.T, force bool) {
	ctx := context.Background()
	e.waitFor(t, 2*time.Minute, "3 pods Ready", e.allReady(3))
	leader, err := e.leaderPod(ctx)
	if err != nil {
		t.Fatal(err)
	}
	phase, args := "delete", []string{"-n", ns, "delete", "pod", leader}
	if force {
		phase, args = "force-delete", append(args, "--grace-period=0", "--force")
	}
	ld := e.startLoad(t, phase)
	from := time.Now()
	e.mustKubectl(t, args...)
	e.waitFor(t, 2*time.Minute, "3 pods Ready after deleting the leader "+leader, e.allReady(3))
	to := time.Now()
	gap, _ := ld.stop(from, to)
	newLeader, _ := e.leaderPod(ctx)
	t.Logf("GAP %s of leader %s: longest write gap %s; whole again after %s; leader now %s; load: %s",
		phase, leader, gap.Round(time.Millisecond), to.Sub(from).Round(100*time.Millisecond), newLeader, ld.summary())
	if gap > 3*time.Second {
		t.Logf("a long gap; the cluster after it:\n%s", e.diagnose())
	}
	verifyLedger(t, e.serviceURL(t), e.ledger)
}

func (e *env) rolloutRestart(t *testing.T) {
	e.waitFor(t, 2*time.Minute, "3 pods Ready", e.allReady(3))
	ld := e.startLoad(t, "rollout")
	from := time.Now()
	e.mustKubectl(t, "-n", ns, "rollout", "restart", "statefulset/store")
	e.mustKubectl(t, "-n", ns, "rollout", "status", "statefulset/store", "--timeout=5m")
	e.waitFor(t, 2*time.Minute, "3 pods Ready after the rollout", e.allReady(3))
	to := time.Now()
	gap, _ := ld.stop(from, to)
	t.Logf("GAP rollout restart: longest write gap %s; rollout took %s; load: %s",
		gap.Round(time.Millisecond), to.Sub(from).Round(100*time.Millisecond), ld.summary())
	verifyLedger(t, e.serviceURL(t), e.ledger)
}

// scale goes 3 → 5 → 3 under load; every pod's member list must follow.
func (e *env) scale(t *testing.T) {
	e.waitFor(t, 2*time.Minute, "3 pods Ready", e.allReady(3))
	ld := e.startLoad(t, "scale")
	from := time.Now()
	e.mustKubectl(t, "-n", ns, "scale", "statefulset/store", "--replicas=5")
	e.waitFor(t, 3*time.Minute, "5 pods Ready, each seeing 5 live members", e.allReady(5))
	t.Logf("scaled to 5: every pod sees 5 live members after %s", time.Since(from).Round(100*time.Millisecond))
	mid := time.Now()
	e.mustKubectl(t, "-n", ns, "scale", "statefulset/store", "--replicas=3")
	e.waitFor(t, 3*time.Minute, "3 pods Ready, each seeing 3 live members", e.allReady(3))
	to := time.Now()
	gap, _ := ld.stop(from, to)
	t.Logf("scaled back to 3 after %s; longest write gap over 3→5→3 %s; load: %s",
		to.Sub(mid).Round(100*time.Millisecond), gap.Round(time.Millisecond), ld.summary())
	verifyLedger(t, e.serviceURL(t), e.ledger)
}

// pdb evicts two pods at once through the Eviction API: the budget
// (maxUnavailable 1) admits the first and refuses the second.
func (e *env) pdb(t *testing.T) {
	ctx := context.Background()
	e.waitFor(t, 2*time.Minute, "3 pods Ready", e.allReady(3))
	e.waitFor(t, time.Minute, "the PDB allows one disruption", func(ctx context.Context) error {
		p, err := e.client.PolicyV1().PodDisruptionBudgets(ns).Get(ctx, "store", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if p.Status.DisruptionsAllowed != 1 {
			return fmt.Errorf("disruptionsAllowed = %d", p.Status.DisruptionsAllowed)
		}
		return nil
	})
	evict := func(pod string) error {
		return e.client.PolicyV1().Evictions(ns).Evict(ctx, &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Name: pod, Namespace: ns}})
	}
	if err := evict("store-1"); err != nil {
		t.Fatalf("first eviction (store-1) refused: %v", err)
	}
	err := evict("store-2")
	if !apierrors.IsTooManyRequests(err) {
		t.Fatalf("second eviction (store-2) while store-1 is disrupted: %v, want 429 from the PDB", err)
	}
	t.Logf("store-1 evicted; store-2 refused: %v", err)
	e.waitFor(t, 2*time.Minute, "3 pods Ready after the eviction", e.allReady(3))
}

// memoryLimit runs the heaviest shape the store accepts (1 MB values, all
// PUTs, 32 clients) against the Service and checks that no pod was
// OOM-killed or restarted; it reports each pod's peak memory.
func (e *env) memoryLimit(t *testing.T) {
	ctx := context.Background()
	e.waitFor(t, 2*time.Minute, "3 pods Ready", e.allReady(3))
	before := e.restarts(t)
	report := e.storeload(t, "-targets", e.serviceURL(t), "-duration", "15s", "-concurrency", "32", "-put-ratio", "1",
		"-keys", "64", "-value-size", "1000000", "-key-prefix", "e2e-big/", "-timeout", "30s")
	t.Logf("storeload through the Service (15s, 32 clients, all PUT, 1 MB values):\n%s", report)
	pods, err := e.storePods(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pods {
		for _, cs := range p.Status.ContainerStatuses {
			if cs.RestartCount != before[p.Name] {
				t.Errorf("%s restarted during the load (restartCount %d → %d, last state %+v)", p.Name, before[p.Name], cs.RestartCount, cs.LastTerminationState.Terminated)
			}
			if term := cs.LastTerminationState.Terminated; term != nil && term.Reason == "OOMKilled" {
				t.Errorf("%s was OOM-killed", p.Name)
			}
		}
		t.Logf("%s: peak memory %s of the 512Mi limit", p.Name, peakMemory(p))
	}
}

func (e *env) restarts(t *testing.T) map[string]int32 {
	pods, err := e.storePods(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int32{}
	for _, p := range pods {
		for _, cs := range p.Status.ContainerStatuses {
			out[p.Name] = cs.RestartCount
		}
	}
	return out
}

// peakMemory reads the pod cgroup's high-water mark (cgroup v1, cgroupfs).
func peakMemory(p corev1.Pod) string {
	files, _ := filepath.Glob(fmt.Sprintf("/sys/fs/cgroup/memory/kubepods/*/pod%s/memory.max_usage_in_bytes", p.UID))
	if len(files) == 0 {
		return "unknown"
	}
	b, err := os.ReadFile(files[0])
	if err != nil {
		return "unknown"
	}
	n, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return fmt.Sprintf("%d MiB", n>>20)
}

// cutOff drops, inside one follower's network namespace, every packet to
// and from the other pods: it must go unready while the others stay Ready,
// and be Ready again once the rule is gone.
func (e *env) cutOff(t *testing.T) {
	ctx := context.Background()
	e.waitFor(t, 2*time.Minute, "3 pods Ready", e.allReady(3))
	leader, err := e.leaderPod(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pods, err := e.storePods(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var victim corev1.Pod
	var others []string
	for _, p := range pods {
		if p.Name != leader && victim.Name == "" {
			victim = p
		} else {
			others = append(others, p.Name)
		}
	}
	pid := e.taskPid(t, victim)
	rules := [][]string{
		{"INPUT", "-s", "10.88.1.0/24", "-j", "DROP"},
		{"OUTPUT", "-d", "10.88.1.0/24", "-j", "DROP"},
	}
	nsIPTables := func(op string, r []string) error {
		args := append([]string{"-t", strconv.Itoa(pid), "-n", "iptables", "-w", op}, r...)
		out, err := exec.Command("nsenter", args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("nsenter %v: %w: %s", args, err, out)
		}
		return nil
	}
	ld := e.startLoad(t, "cutoff")
	from := time.Now()
	for _, r := range rules {
		if err := nsIPTables("-I", r); err != nil {
			t.Fatal(err)
		}
	}
	restored := false
	restore := func() {
		if restored {
			return
		}
		restored = true
		for _, r := range rules {
			if err := nsIPTables("-D", r); err != nil {
				t.Error(err)
			}
		}
	}
	defer restore()
	e.waitFor(t, time.Minute, victim.Name+" unready while cut off from its peers", func(ctx context.Context) error {
		p, err := e.client.CoreV1().Pods(ns).Get(ctx, victim.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if podReady(*p) {
			return fmt.Errorf("%s still Ready", victim.Name)
		}
		return nil
	})
	unready := time.Since(from)
	body, code, _ := httpDo(ctx, "GET", "http://"+victim.Status.PodIP+":8080/readyz", "", nil)
	t.Logf("%s (follower) unready %s after being cut off; its /readyz: %d %s", victim.Name, unready.Round(100*time.Millisecond), code, strings.TrimSpace(body))
	// The others stay Ready for a while the victim is out.
	for range 10 {
		for _, name := range others {
			p, err := e.client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
			if err != nil || !podReady(*p) {
				t.Errorf("%s went unready while %s was cut off (%v)", name, victim.Name, err)
			}
		}
		time.Sleep(500 * time.Millisecond)
	}
	restore()
	back := time.Now()
	e.waitFor(t, time.Minute, victim.Name+" Ready again once reachable", func(ctx context.Context) error {
		p, err := e.client.CoreV1().Pods(ns).Get(ctx, victim.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if !podReady(*p) {
			return fmt.Errorf("%s not Ready", victim.Name)
		}
		return nil
	})
	t.Logf("%s Ready again %s after the rule was removed", victim.Name, time.Since(back).Round(100*time.Millisecond))
	e.waitFor(t, time.Minute, "3 pods Ready", e.allReady(3))
	gap, _ := ld.stop(from, time.Now())
	t.Logf("writes through the Service while %s was cut off: longest gap %s; load: %s", victim.Name, gap.Round(time.Millisecond), ld.summary())
	verifyLedger(t, e.serviceURL(t), e.ledger)
}

// taskPid finds the store container's init pid from containerd's task list
// (no crictl): the pod status names the container, ctr names its pid.
func (e *env) taskPid(t *testing.T, p corev1.Pod) int {
	t.Helper()
	if len(p.Status.ContainerStatuses) == 0 {
		t.Fatalf("%s has no container status", p.Name)
	}
	id := strings.TrimPrefix(p.Status.ContainerStatuses[0].ContainerID, "containerd://")
	out, err := exec.Command(e.cluster.Ctr(), append(e.cluster.CtrArgs(), "tasks", "ls")...).CombinedOutput()
	if err != nil {
		t.Fatalf("ctr tasks ls: %v\n%s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[0] == id {
			pid, err := strconv.Atoi(f[1])
			if err == nil {
				return pid
			}
		}
	}
	t.Fatalf("container %s of %s is not in ctr tasks ls:\n%s", id, p.Name, out)
	return 0
}
