package main

import (
	"context"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/statefulkv/store/internal/kubetest"
	"github.com/statefulkv/store/internal/replication"
)

// testToken is what startCluster writes to the peer token file.
const testToken = "cluster-test-token-0123456789"

// version is a key's state as one node holds it ("" when absent).
type replica struct {
	status  int
	version string
	body    string
}

// local reads key from node id's own replica, as a peer would: a forwarded
// stale read is answered by that node from its own data.
func (c *cluster) local(client *http.Client, id, key string) (replica, error) {
	req, err := http.NewRequest(http.MethodGet, "http://"+c.addr(id)+"/v1/kv/"+key+"?consistency=stale", nil)
	if err != nil {
		return replica{}, err
	}
	req.Header.Set("X-Store-Forwarded-By", "test")
	req.Header.Set("X-Store-Peer-Token", testToken)
	resp, err := client.Do(req)
	if err != nil {
		return replica{}, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return replica{status: resp.StatusCode, version: strings.Trim(resp.Header.Get("ETag"), `"`), body: string(b)}, nil
}

// putAck writes key=value with an ack level and returns the status and the
// version assigned.
func (c *cluster) putAck(client *http.Client, id, key, value, ack string) (int, string, error) {
	req, err := http.NewRequest(http.MethodPut, "http://"+c.addr(id)+"/v1/kv/"+key+"?ack="+ack, strings.NewReader(value))
	if err != nil {
		return 0, "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode >= 300 {
		c.t.Logf("PUT %s via %s: %d %s", key, id, resp.StatusCode, strings.TrimSpace(string(b)))
	}
	return resp.StatusCode, strings.Trim(resp.Header.Get("ETag"), `"`), nil
}

// ring is the placement every node computes from the same member list.
func (c *cluster) ring(t *testing.T) *replication.Ring {
	t.Helper()
	r, err := replication.NewRing(replication.RingConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Set(c.memberIDs); err != nil {
		t.Fatal(err)
	}
	return r
}

// parallel runs f(i) for i in [0, n) on workers goroutines.
func parallel(n, workers int, f func(i int)) {
	var wg sync.WaitGroup
	next := make(chan int)
	for range workers {
		wg.Go(func() {
			for i := range next {
				f(i)
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
}

// convergeBound is how long a restarted owner may take to hold every key it
// owns at its latest version: one repair interval (2s) to notice, the
// transfer, and slack for a loaded CI machine.
const convergeBound = 15 * time.Second

func TestReplication_10kKeys_OnTheirOwners_OwnerKilled_Converges(t *testing.T) {
	c := startCluster(t, 3)
	leader := c.leader(30 * time.Second)
	c.awaitLeaderKnown(leader, c.ids()...)
	ring := c.ring(t)
	client := &http.Client{Timeout: 30 * time.Second}

	const n = 10000
	var mu sync.Mutex
	latest := map[string]string{} // key → version acknowledged last
	write := func(via, key, value string) {
		code, v, err := c.putAck(client, via, key, value, "quorum")
		if err != nil || (code != http.StatusOK && code != http.StatusCreated) || v == "" {
			t.Errorf("PUT %s via %s: %d %v", key, via, code, err)
			return
		}
		mu.Lock()
		latest[key] = v
		mu.Unlock()
	}
	parallel(n, 32, func(i int) { write(leader, fmt.Sprintf("k/%05d", i), fmt.Sprintf(`{"i":%d}`, i)) })
	if t.Failed() {
		t.FailNow()
	}

	// Each key is on its owners among the followers, at the acknowledged
	// version; the leader keeps every key (it persists every write and is
	// the source of repair). A non-owner holds a key only as a stand-in,
	// which the leader counts: an entry that took longer than 500 ms to
	// commit (a loaded machine) got one.
	followers := c.except(leader)
	standIns := c.metric(leader, "store_replication_stand_in_copies_total")
	var misplaced []string
	nonOwnerCopies := 0
	everyone := append(slices.Clone(followers), leader)
	parallel(n, 16, func(i int) {
		key := fmt.Sprintf("k/%05d", i)
		owners, _ := ring.Owners(key, 2)
		for _, id := range everyone {
			got, err := c.local(client, id, key)
			if err != nil {
				t.Errorf("read %s at %s: %v", key, id, err)
				return
			}
			wantHere := id == leader || slices.Contains(owners, id)
			mu.Lock()
			switch {
			case wantHere && got.version != latest[key]:
				misplaced = append(misplaced, fmt.Sprintf("%s missing at owner %s (%d %s, want %s)", key, id, got.status, got.version, latest[key]))
			case !wantHere && got.status != http.StatusNotFound:
				nonOwnerCopies++
			}
			mu.Unlock()
		}
	})
	if len(misplaced) > 0 {
		t.Fatalf("%d placement errors, first: %v", len(misplaced), misplaced[:min(5, len(misplaced))])
	}
	if float64(nonOwnerCopies) > standIns {
		t.Fatalf("%d copies on non-owners, but the leader sent only %.0f stand-in copies", nonOwnerCopies, standIns)
	}
	t.Logf("%d of %d keys also on a stand-in (entries slow to commit)", nonOwnerCopies, n)

	// Kill an owner; writes keep succeeding at ack=quorum (live non-owners
	// stand in) and reads keep working.
	victim := followers[0]
	if err := c.nodes[victim].cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-c.nodes[victim].done
	parallel(2000, 16, func(i int) {
		key := fmt.Sprintf("k/%05d", i*5) // overwrite every fifth key
		if i%4 == 0 {
			key = fmt.Sprintf("new/%05d", i)
		}
		write(leader, key, fmt.Sprintf(`{"after":%d}`, i))
	})
	if t.Failed() {
		t.FailNow()
	}

	// Restart it: within convergeBound it holds every key it owns at the
	// latest acknowledged version.
	restarted := time.Now()
	c.start(victim)
	var owned []string
	for key := range latest {
		if owners, _ := ring.Owners(key, 2); slices.Contains(owners, victim) {
			owned = append(owned, key)
		}
	}
	var lagging []string
	waitFor(t, convergeBound, victim+" to converge", func() bool {
		lagging = lagging[:0]
		var lmu sync.Mutex
		parallel(len(owned), 16, func(i int) {
			got, err := c.local(client, victim, owned[i])
			if err != nil || got.version != latest[owned[i]] {
				lmu.Lock()
				lagging = append(lagging, owned[i])
				lmu.Unlock()
			}
		})
		return len(lagging) == 0
	})
	t.Logf("%s converged on %d owned keys %s after restart (bound %s)", victim, len(owned), time.Since(restarted).Round(time.Millisecond), convergeBound)
}

// startStatefulSetCluster creates the StatefulSet "store" (no controller
// runs, so it only carries spec.replicas) and starts its pods store-0 ..
// store-(replicas-1) as processes on 127.0.0.<ordinal>, following it, each
// with extraArgs.
func startStatefulSetCluster(t *testing.T, replicas, maxReplicas int, extraArgs ...string) *cluster {
	t.Helper()
	cp := kubetest.Start(t)
	c := &cluster{t: t, cp: cp, nodes: map[string]*proc{}, dirs: map[string]string{}, statefulSet: "store", extraArgs: extraArgs}
	if err := cp.ApplyRBAC(context.Background(), testNS); err != nil {
		t.Fatal(err)
	}
	n := int32(replicas)
	labels := map[string]string{"app.kubernetes.io/name": "store"}
	sts := &appsv1.StatefulSet{
		ObjectMeta: metav1.ObjectMeta{Name: "store", Namespace: testNS},
		Spec: appsv1.StatefulSetSpec{
			Replicas:    &n,
			ServiceName: "store-peers",
			Selector:    &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "store", Image: "statefulkv/store"}}},
			},
		},
	}
	if _, err := cp.Client.AppsV1().StatefulSets(testNS).Create(context.Background(), sts, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	c.kubeconfig = c.serviceAccountKubeconfig()
	c.tokenFile = filepath.Join(t.TempDir(), "peer-token")
	if err := os.WriteFile(c.tokenFile, []byte(testToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c.port = freePort(t, maxReplicas-1)
	for i := range maxReplicas {
		c.memberIDs = append(c.memberIDs, fmt.Sprintf("store-%d", i))
	}
	for _, id := range c.memberIDs[:replicas] {
		c.dirs[id] = t.TempDir()
		c.start(id)
	}
	return c
}

// scale sets the StatefulSet's replicas, as `kubectl scale` does.
func (c *cluster) scale(replicas int) {
	c.t.Helper()
	ctx := context.Background()
	sts, err := c.cp.Client.AppsV1().StatefulSets(testNS).Get(ctx, "store", metav1.GetOptions{})
	if err != nil {
		c.t.Fatal(err)
	}
	n := int32(replicas)
	sts.Spec.Replicas = &n
	if _, err := c.cp.Client.AppsV1().StatefulSets(testNS).Update(ctx, sts, metav1.UpdateOptions{}); err != nil {
		c.t.Fatal(err)
	}
}

// awaitMembers waits until every given node reports exactly want as its
// member set.
func (c *cluster) awaitMembers(want []string, ids ...string) {
	c.t.Helper()
	waitFor(c.t, 10*time.Second, fmt.Sprintf("nodes %v to see members %v", ids, want), func() bool {
		for _, id := range ids {
			st, err := c.status(id)
			if err != nil || len(st.Replication.Members) != len(want) {
				return false
			}
			for i, m := range st.Replication.Members {
				if m.ID != want[i] {
					return false
				}
			}
		}
		return true
	})
}

// awaitOnOwners waits until every key sits on each of its owners under
// ring at the version in want.
func (c *cluster) awaitOnOwners(client *http.Client, ring *replication.Ring, want map[string]string, bound time.Duration) {
	c.t.Helper()
	keys := make([]string, 0, len(want))
	for k := range want {
		keys = append(keys, k)
	}
	var missing []string
	start := time.Now()
	waitFor(c.t, bound, "keys on their new owners", func() bool {
		var mu sync.Mutex
		missing = missing[:0]
		parallel(len(keys), 16, func(i int) {
			owners, _ := ring.Owners(keys[i], 2)
			for _, o := range owners {
				if got, err := c.local(client, o, keys[i]); err != nil || got.version != want[keys[i]] {
					mu.Lock()
					missing = append(missing, keys[i]+"@"+o)
					mu.Unlock()
				}
			}
		})
		return len(missing) == 0
	})
	c.t.Logf("%d keys on their owners %s after the ring changed", len(keys), time.Since(start).Round(time.Millisecond))
}

func TestReplication_Scale3To5To3_UnderWrites_NothingLost_DataOnNewOwners(t *testing.T) {
	c := startStatefulSetCluster(t, 3, 5)
	leader := c.leader(30 * time.Second)
	base := []string{"store-0", "store-1", "store-2"}
	c.awaitLeaderKnown(leader, base...)
	client := &http.Client{Timeout: 30 * time.Second}

	// Writers keep going through the three pods that stay.
	var (
		mu    sync.Mutex
		acked = map[string]string{} // key → version
		stop  = make(chan struct{})
		wg    sync.WaitGroup
	)
	for w := range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				key := fmt.Sprintf("scale/%d/%05d", w, i)
				code, v, err := c.putAck(client, base[(w+i)%3], key, fmt.Sprintf(`{"w":%d,"i":%d}`, w, i), "quorum")
				if err == nil && code/100 == 2 {
					mu.Lock()
					acked[key] = v
					mu.Unlock()
				} else {
					time.Sleep(20 * time.Millisecond)
				}
			}
		})
	}
	snapshot := func() map[string]string {
		mu.Lock()
		defer mu.Unlock()
		return maps.Clone(acked)
	}
	waitFor(t, 30*time.Second, "writes before scaling", func() bool { return len(snapshot()) >= 300 })

	// 3 → 5: the new pods start, the StatefulSet says 5, every node moves
	// to the 5-member ring, and the keys written so far reach their new
	// owners.
	for _, id := range c.memberIDs[3:] {
		c.dirs[id] = t.TempDir()
		c.start(id)
	}
	c.scale(5)
	c.awaitMembers(c.memberIDs, c.memberIDs...)
	five := c.ring(t) // memberIDs is now all five
	c.awaitOnOwners(client, five, snapshot(), convergeBound)

	// 5 → 3: the StatefulSet says 3, the nodes shrink the ring, and the
	// two pods are stopped as the controller would (SIGTERM).
	c.scale(3)
	c.awaitMembers(base, c.memberIDs...)
	for _, id := range c.memberIDs[3:] {
		if err := c.nodes[id].cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		<-c.nodes[id].done
		delete(c.nodes, id)
	}
	c.memberIDs = base
	n := len(snapshot())
	waitFor(t, 30*time.Second, "writes after scaling down", func() bool { return len(snapshot()) >= n+200 })
	close(stop)
	wg.Wait()

	// Nothing acknowledged was lost, and every key sits on its owners in
	// the 3-member ring.
	final := snapshot()
	var lost []string
	var lmu sync.Mutex
	keys := slices.Collect(maps.Keys(final))
	parallel(len(keys), 16, func(i int) {
		resp, err := client.Get("http://" + c.addr(base[i%3]) + "/v1/kv/" + keys[i])
		if err == nil {
			resp.Body.Close()
		}
		if err != nil || resp.StatusCode != http.StatusOK || strings.Trim(resp.Header.Get("ETag"), `"`) != final[keys[i]] {
			lmu.Lock()
			lost = append(lost, keys[i])
			lmu.Unlock()
		}
	})
	if len(lost) > 0 {
		t.Fatalf("%d of %d acknowledged writes not readable after 3→5→3, e.g. %v", len(lost), len(final), lost[:min(5, len(lost))])
	}
	c.awaitOnOwners(client, c.ring(t), final, convergeBound)
	t.Logf("%d acknowledged writes across 3→5→3, all readable and on their owners", len(final))
}
