package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/statefulkv/store/internal/kubetest"
	"github.com/statefulkv/store/internal/transport"
)

// Test timings: short enough for a quick suite, with the same ratios the
// defaults keep (renew < lease, retry × 1.2 < renew).
const (
	testLease = 4 * time.Second
	testRenew = 3 * time.Second
	testRetry = 500 * time.Millisecond
	testNS    = "store-test"
)

// cluster is a real control plane plus store processes on 127.0.0.N, each
// authenticating as the store's ServiceAccount with deploy/rbac.yaml's Role.
type cluster struct {
	t          *testing.T
	cp         *kubetest.ControlPlane
	kubeconfig string
	tokenFile  string
	memberIDs  []string
	port       int
	nodes      map[string]*proc // by id: store-1 .. store-N
	dirs       map[string]string
	extraArgs  []string
	// statefulSet, when set, makes the nodes learn their members from that
	// StatefulSet (--statefulset) instead of --members.
	statefulSet string
	// opts are the build and environment every node runs with.
	opts storeOptions
}

func startCluster(t *testing.T, n int, extraArgs ...string) *cluster {
	t.Helper()
	return startClusterWith(t, storeOptions{}, n, extraArgs...)
}

// startClusterWith is startCluster with a chosen build and environment for
// the nodes.
func startClusterWith(t *testing.T, opts storeOptions, n int, extraArgs ...string) *cluster {
	t.Helper()
	cp := kubetest.Start(t)
	c := &cluster{t: t, cp: cp, nodes: map[string]*proc{}, dirs: map[string]string{}, extraArgs: extraArgs, opts: opts}
	if err := cp.ApplyRBAC(context.Background(), testNS); err != nil {
		t.Fatal(err)
	}
	c.kubeconfig = c.serviceAccountKubeconfig()
	c.tokenFile = filepath.Join(t.TempDir(), "peer-token")
	if err := os.WriteFile(c.tokenFile, []byte("cluster-test-token-0123456789\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c.port = freePort(t, n)
	for i := 1; i <= n; i++ {
		c.memberIDs = append(c.memberIDs, fmt.Sprintf("store-%d", i))
	}
	for _, id := range c.memberIDs {
		c.dirs[id] = t.TempDir()
		c.start(id)
	}
	return c
}

// serviceAccountKubeconfig is a kubeconfig for the user the apiserver sees
// as the store ServiceAccount, and nothing more privileged.
func (c *cluster) serviceAccountKubeconfig() string {
	return c.cp.Kubeconfig(c.t, "system:serviceaccount:"+testNS+":store",
		"system:serviceaccounts", "system:serviceaccounts:"+testNS)
}

// freePort finds a port free on 127.0.0.0..n (store-0 of a StatefulSet
// lives on 127.0.0.0, which Linux binds like any loopback address).
func freePort(t *testing.T, n int) int {
	t.Helper()
	for range 50 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		_ = ln.Close()
		ok := true
		for i := 0; i <= n; i++ {
			if i == 1 {
				continue
			}
			l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.%d:%d", i, port))
			if err != nil {
				ok = false
				break
			}
			_ = l.Close()
		}
		if ok {
			return port
		}
	}
	t.Fatal("no port free on every loopback address")
	return 0
}

func (c *cluster) addr(id string) string {
	ord := strings.TrimPrefix(id, "store-")
	return fmt.Sprintf("127.0.0.%s:%d", ord, c.port)
}

// start (re)starts node id on its address and data directory.
func (c *cluster) start(id string) *proc {
	args := append([]string{
		"--listen", c.addr(id),
		"--data-dir", c.dirs[id],
		"--node-id", id,
		"--kubeconfig", c.kubeconfig,
		"--namespace", testNS,
		"--lease-duration", testLease.String(),
		"--renew-deadline", testRenew.String(),
		"--retry-period", testRetry.String(),
		"--peer-address-template", fmt.Sprintf("127.0.0.{ordinal}:%d", c.port),
		"--peer-token-file", c.tokenFile,
	}, c.extraArgs...)
	if c.statefulSet != "" {
		args = append(args, "--statefulset", c.statefulSet)
	} else {
		args = append(args, "--members", strings.Join(c.memberIDs, ","))
	}
	p := startStoreWith(c.t, c.opts, args...)
	c.nodes[id] = p
	return p
}

// nodeStatus is what the tests read of GET /v1/status: the node's role and
// the leader it knows, and replication's members, queues and lag.
type nodeStatus struct {
	Node        string `json:"node"`
	Role        string `json:"role"`
	Leader      string `json:"leader"`
	Epoch       uint64 `json:"epoch"`
	LastSeq     uint64 `json:"last_seq"`
	DataBytes   int64  `json:"data_bytes"`
	Replication struct {
		Members []struct {
			ID          string `json:"id"`
			Live        bool   `json:"live"`
			Queued      int    `json:"queued"`
			QueuedBytes int64  `json:"queued_bytes"`
		} `json:"members"`
		Behind               []string   `json:"behind"`
		LastRepair           *time.Time `json:"last_repair"`
		CatchingUpPartitions int        `json:"catching_up_partitions"`
	} `json:"replication"`
}

var shortClient = &http.Client{Timeout: 2 * time.Second}

// metric reads one unlabelled sample from a node's /metrics (-1 if absent).
func (c *cluster) metric(id, name string) float64 {
	c.t.Helper()
	return metricAt(c.t, c.addr(id), name)
}

// metricAt reads one unlabelled sample from /metrics at addr (-1 if absent).
func metricAt(t *testing.T, addr, name string) float64 {
	t.Helper()
	resp, err := shortClient.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("metrics of %s: %v", addr, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err == nil {
				return f
			}
		}
	}
	return -1
}

func (c *cluster) status(id string) (nodeStatus, error) {
	var st nodeStatus
	resp, err := shortClient.Get("http://" + c.addr(id) + "/v1/status")
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	return st, json.NewDecoder(resp.Body).Decode(&st)
}

// waitFor polls cond every 50ms until it holds or the timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// leader waits until exactly one of the given nodes reports role=leader and
// returns it.
func (c *cluster) leader(timeout time.Duration, among ...string) string {
	c.t.Helper()
	if len(among) == 0 {
		for id := range c.nodes {
			among = append(among, id)
		}
	}
	var leader string
	waitFor(c.t, timeout, "exactly one leader", func() bool {
		var leaders []string
		for _, id := range among {
			if st, err := c.status(id); err == nil && st.Role == "leader" {
				leaders = append(leaders, id)
			}
		}
		if len(leaders) == 1 {
			leader = leaders[0]
		}
		return len(leaders) == 1
	})
	return leader
}

// awaitLeaderKnown waits until every given node names leader in its status.
func (c *cluster) awaitLeaderKnown(leader string, ids ...string) {
	c.t.Helper()
	waitFor(c.t, 5*time.Second, "nodes to know the leader "+leader, func() bool {
		for _, id := range ids {
			if st, err := c.status(id); err != nil || st.Leader != leader {
				return false
			}
		}
		return true
	})
}

// followerOf returns the lowest-numbered node that is not leader, once it
// knows the leader.
func (c *cluster) followerOf(leader string) string {
	c.t.Helper()
	for _, id := range c.ids() {
		if id != leader {
			c.awaitLeaderKnown(leader, id)
			return id
		}
	}
	c.t.Fatal("no follower")
	return ""
}

// except returns the node identities other than id, sorted.
func (c *cluster) except(id string) []string {
	return slices.DeleteFunc(c.ids(), func(x string) bool { return x == id })
}

// ids returns the node identities, sorted.
func (c *cluster) ids() []string {
	var out []string
	for id := range c.nodes {
		out = append(out, id)
	}
	slices.Sort(out)
	return out
}

// write is one PUT; it returns the status and the headers. Error bodies are
// logged so a failing test shows what the store said.
func (c *cluster) write(client *http.Client, id, key, value string) (int, http.Header, error) {
	req, err := http.NewRequest(http.MethodPut, "http://"+c.addr(id)+"/v1/kv/"+key, strings.NewReader(value))
	if err != nil {
		return 0, nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode >= 500 {
		c.t.Logf("PUT %s via %s: %d %s", key, id, resp.StatusCode, bytes.TrimSpace(b))
	}
	return resp.StatusCode, resp.Header, nil
}

func TestCluster_OneLeader_LeaseNamesIt_AllAgree(t *testing.T) {
	c := startCluster(t, 3)
	leader := c.leader(30 * time.Second)

	lease, err := c.cp.Client.CoordinationV1().Leases(testNS).Get(context.Background(), "store-leader", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if lease.Spec.HolderIdentity == nil || *lease.Spec.HolderIdentity != leader {
		t.Fatalf("Lease holder %v, nodes say %s", lease.Spec.HolderIdentity, leader)
	}
	// Followers learn the holder at their next poll of the Lease: within one
	// retry period, stretched by client-go's jitter (factor 1.2).
	bound := time.Duration(float64(testRetry)*2.2) + 500*time.Millisecond
	agreeStart := time.Now()
	waitFor(t, bound, "all nodes to agree on the leader", func() bool {
		for id := range c.nodes {
			st, err := c.status(id)
			if err != nil || st.Leader != leader || st.Epoch == 0 {
				return false
			}
		}
		return true
	})
	t.Logf("leader %s; all nodes agreed %s after it was seen (bound %s)", leader, time.Since(agreeStart).Round(time.Millisecond), bound)
}

// Both peer carriers (the default multiplexed stream, and unencrypted
// HTTP/2) carry forwarded writes, replication and handed-off reads.
func TestCluster_WritesToEveryNode_LandOnLeaderExactlyOnce(t *testing.T) {
	for _, carrier := range []string{"stream", "h2c"} {
		t.Run("peer-carrier="+carrier, func(t *testing.T) {
			c := startCluster(t, 3, "--peer-carrier="+carrier)
			leader := c.leader(30 * time.Second)
			ids := c.ids()
			c.awaitLeaderKnown(leader, ids...)
			before, _ := c.status(leader)
			const perNode = 30
			client := &http.Client{Timeout: 30 * time.Second}
			var wg sync.WaitGroup
			for _, via := range ids {
				wg.Go(func() {
					for i := range perNode {
						code, h, err := c.write(client, via, fmt.Sprintf("via-%s/%d", via, i), strconv.Itoa(i))
						if err != nil || code != http.StatusCreated {
							t.Errorf("PUT via %s: %d %v", via, code, err)
							return
						}
						if h.Get("X-Store-Leader") != leader {
							t.Errorf("PUT via %s applied by %q, want the leader %s", via, h.Get("X-Store-Leader"), leader)
							return
						}
					}
				})
			}
			wg.Wait()
			after, _ := c.status(leader)
			if got, want := after.LastSeq-before.LastSeq, uint64(perNode*len(ids)); got != want {
				t.Fatalf("leader applied %d writes, want exactly %d", got, want)
			}
			// Followers hold replicas now, but never assign versions of their own:
			// their counters follow the leader's.
			for _, id := range ids {
				if st, _ := c.status(id); st.LastSeq > after.LastSeq {
					t.Fatalf("follower %s is at seq %d, beyond the leader's %d", id, st.LastSeq, after.LastSeq)
				}
			}
			// Every key is readable through every node.
			for _, via := range ids {
				for _, from := range ids {
					resp, err := client.Get("http://" + c.addr(via) + "/v1/kv/via-" + from + "/7")
					if err != nil {
						t.Fatal(err)
					}
					b, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 || string(b) != "7" {
						t.Fatalf("GET via %s of a write via %s: %d %s", via, from, resp.StatusCode, b)
					}
				}
			}
		})
	}
}

// A forwarded write is never forwarded again, ?redirect=true answers 307 to
// the leader, and a retried request id is applied once.
func TestCluster_Routing_NoLoops_Redirect_Idempotent(t *testing.T) {
	c := startCluster(t, 2)
	leader := c.leader(30 * time.Second)
	follower := c.followerOf(leader)
	noRedirect := &http.Client{Timeout: 10 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

	token, err := os.ReadFile(c.tokenFile)
	if err != nil {
		t.Fatal(err)
	}
	asPeer := func(withToken bool) (int, string) {
		req, _ := http.NewRequest(http.MethodPut, "http://"+c.addr(follower)+"/v1/kv/loop", strings.NewReader("1"))
		req.Header.Set("X-Store-Forwarded-By", "store-9")
		if withToken {
			req.Header.Set("X-Store-Peer-Token", strings.TrimSpace(string(token)))
		}
		resp, err := noRedirect.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, string(body)
	}
	if code, body := asPeer(false); code != 401 || !strings.Contains(body, `"peer_unauthenticated"`) {
		t.Fatalf("peer header without the token: %d %s", code, body)
	}
	if code, body := asPeer(true); code != 503 || !strings.Contains(body, `"not_leader"`) {
		t.Fatalf("forwarded request at a follower: %d %s", code, body)
	}
	// The replication endpoints refuse a caller without the cluster token,
	// or with a wrong one, and change nothing.
	forged := `{"epoch":99,"leader":"intruder","entries":[{"key":"injected","version":"99.1","value":1}]}`
	for _, id := range []string{leader, follower} {
		for _, tok := range []string{"", "wrong-token-wrong-token"} {
			for _, path := range []string{"/internal/v1/replicate", "/internal/v1/digests", "/internal/v1/entries"} {
				if code, body := c.peerPost(id, path, forged, tok); code != 401 || !strings.Contains(body, "peer_unauthenticated") {
					t.Fatalf("%s at %s with token %q: %d %s, want 401", path, id, tok, code, body)
				}
			}
		}
		if got, err := c.local(shortClient, id, "injected"); err != nil || got.status != http.StatusNotFound {
			t.Fatalf("after refused injections %s holds injected: %+v %v", id, got, err)
		}
	}

	req, _ := http.NewRequest(http.MethodPut, "http://"+c.addr(follower)+"/v1/kv/r?redirect=true", strings.NewReader("1"))
	resp, err := noRedirect.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if want := "http://" + c.addr(leader) + "/v1/kv/r?redirect=true"; resp.StatusCode != 307 || resp.Header.Get("Location") != want {
		t.Fatalf("redirect: %d Location %q, want 307 %q", resp.StatusCode, resp.Header.Get("Location"), want)
	}

	before, _ := c.status(leader)
	for range 3 {
		req, _ := http.NewRequest(http.MethodPut, "http://"+c.addr(follower)+"/v1/kv/once", strings.NewReader(`"x"`))
		req.Header.Set("X-Request-Id", "client-retry-1")
		resp, err := noRedirect.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode/100 != 2 {
			t.Fatalf("retry with same request id: %d", resp.StatusCode)
		}
	}
	if after, _ := c.status(leader); after.LastSeq != before.LastSeq+1 {
		t.Fatalf("three sends of one request id applied %d times", after.LastSeq-before.LastSeq)
	}
}

// steadyWriter writes through the given nodes in turn until stopped, and
// records every acknowledged write's time and applying leader.
type steadyWriter struct {
	mu    sync.Mutex
	acks  []ack
	stop  chan struct{}
	done  chan struct{}
	fails map[int]int
}

type ack struct {
	sent   time.Time // when the request was sent
	at     time.Time // when its acknowledgement arrived
	key    string
	leader string
	epoch  string
}

func (c *cluster) startWriter(via func() []string) *steadyWriter {
	w := &steadyWriter{stop: make(chan struct{}), done: make(chan struct{}), fails: map[int]int{}}
	client := &http.Client{Timeout: 30 * time.Second}
	go func() {
		defer close(w.done)
		for i := 0; ; i++ {
			select {
			case <-w.stop:
				return
			default:
			}
			nodes := via()
			node := nodes[i%len(nodes)]
			key := fmt.Sprintf("steady/%06d", i)
			sent := time.Now()
			code, h, err := c.write(client, node, key, strconv.Itoa(i))
			w.mu.Lock()
			if err == nil && code/100 == 2 {
				w.acks = append(w.acks, ack{sent: sent, at: time.Now(), key: key, leader: h.Get("X-Store-Leader"), epoch: h.Get("X-Store-Epoch")})
			} else {
				w.fails[code]++
				time.Sleep(20 * time.Millisecond) // a refused write: don't spin
			}
			w.mu.Unlock()
		}
	}()
	return w
}

func (w *steadyWriter) halt() []ack {
	close(w.stop)
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.acks
}

func (w *steadyWriter) count() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.acks)
}

// longestGap is the longest time between two consecutive acknowledgements
// after since.
func longestGap(acks []ack, since time.Time) time.Duration {
	var gap time.Duration
	prev := since
	for _, a := range acks {
		if a.at.Before(since) {
			continue
		}
		gap = max(gap, a.at.Sub(prev))
		prev = a.at
	}
	return gap
}

func TestCluster_SIGKILLLeader_NewLeaderWithinLeasePlusRetry_AckedWritesReadable(t *testing.T) {
	c := startCluster(t, 3)
	leader := c.leader(30 * time.Second)
	survivors := c.except(leader)
	w := c.startWriter(func() []string { return survivors })
	waitFor(t, 30*time.Second, "steady writes", func() bool { return w.count() >= 20 })
	killedAt := time.Now()
	if err := c.nodes[leader].cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	newLeader := c.leader(testLease+10*time.Second, survivors...)
	n := w.count()
	waitFor(t, 10*time.Second, "writes under the new leader", func() bool { return w.count() >= n+20 })
	acks := w.halt()
	// The successor did not wait for its next poll of the Lease: it took
	// the Lease over the moment it expired (election.takeOverIfExpired).
	if got := c.metric(newLeader, "store_election_expiry_takeovers_total"); got != 1 {
		t.Errorf("new leader %s counts %v expiry takeovers, want 1", newLeader, got)
	}

	gap := longestGap(acks, killedAt.Add(-time.Second))
	bound := testLease + testRetry*22/10 + 2*time.Second // lease + jittered retry + process/apiserver slack
	t.Logf("SIGKILL of leader %s: new leader %s; longest gap between acknowledged writes %s (bound %s)", leader, newLeader, gap.Round(time.Millisecond), bound)
	if gap > bound {
		t.Fatalf("write gap %s exceeds lease + retry bound %s", gap, bound)
	}
	// A write sent after the kill cannot have been applied by the dead
	// process. (One sent before may be acknowledged a moment after the kill:
	// its answer was already on the wire.)
	for _, a := range acks {
		if a.sent.After(killedAt) && a.leader == leader {
			t.Fatalf("write %s, sent after the kill, acknowledged by the killed leader", a.key)
		}
	}
	// Every acknowledged write, before and after the kill, is readable
	// (consistency=strong) through the survivors.
	client := &http.Client{Timeout: 10 * time.Second}
	for i, a := range acks {
		resp, err := client.Get("http://" + c.addr(survivors[i%2]) + "/v1/kv/" + a.key)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if want := strings.TrimPrefix(a.key, "steady/"); resp.StatusCode != http.StatusOK || strings.TrimLeft(want, "0") != strings.TrimLeft(string(b), "0") {
			t.Fatalf("acknowledged write %s (by %s) read via %s after the leader's SIGKILL: %d %s", a.key, a.leader, survivors[i%2], resp.StatusCode, b)
		}
	}
	t.Logf("all %d acknowledged writes readable after the leader's SIGKILL", len(acks))
}

func TestCluster_SIGTERMLeader_HandsOverWithinAboutARetryPeriod(t *testing.T) {
	c := startCluster(t, 3)
	var gaps []time.Duration
	for round := range 5 {
		leader := c.leader(30 * time.Second)
		others := c.except(leader)
		c.awaitLeaderKnown(leader, others...)
		w := c.startWriter(func() []string { return others })
		waitFor(t, 30*time.Second, "steady writes", func() bool { return w.count() >= 10 })
		termAt := time.Now()
		p := c.nodes[leader]
		if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		<-p.done
		n := w.count()
		waitFor(t, testLease+10*time.Second, "writes after the handoff", func() bool { return w.count() >= n+10 })
		acks := w.halt()
		gap := longestGap(acks, termAt)
		gaps = append(gaps, gap)
		t.Logf("round %d: SIGTERM of %s, gap %s", round, leader, gap.Round(time.Millisecond))
		c.start(leader) // back as a follower for the next round
	}
	slices.Sort(gaps)
	median := gaps[len(gaps)/2]
	bound := time.Duration(float64(testRetry)*2.2) + time.Second
	t.Logf("graceful handoff gaps %v; median %s (bound %s: one jittered retry period + slack)", gaps, median.Round(time.Millisecond), bound)
	if median > bound {
		t.Fatalf("median handoff gap %s exceeds %s", median, bound)
	}
}

// A leader paused past its lease must not acknowledge one write after its
// gate closed, and must come back as a follower.
func TestCluster_SIGSTOPLeader_NoAckAfterGateClosed_RejoinsAsFollower_Fenced(t *testing.T) {
	c := startCluster(t, 3)
	old := c.leader(30 * time.Second)
	others := c.except(old)
	c.awaitLeaderKnown(old, others...)
	if code, _, err := c.write(shortClient, old, "fenced", `"old"`); err != nil || code/100 != 2 {
		t.Fatalf("write before the pause: %d %v", code, err)
	}
	oldSt, _ := c.status(old)
	p := c.nodes[old]
	if err := p.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stoppedAt := time.Now()
	// Clients keep sending to the paused node; their requests queue in its
	// listen backlog and are read only after SIGCONT.
	type result struct {
		code   int
		leader string
	}
	results := make(chan result, 10)
	for i := range 10 {
		go func() {
			code, h, err := c.write(&http.Client{Timeout: 60 * time.Second}, old, fmt.Sprintf("paused/%d", i), "1")
			if err != nil {
				code = -1
			}
			results <- result{code, h.Get("X-Store-Leader")}
		}()
	}
	newLeader := c.leader(testLease+10*time.Second, others...)
	if elapsed := time.Since(stoppedAt); elapsed < testRenew {
		t.Fatalf("new leader after %s, before the old gate could close", elapsed)
	}
	before, _ := c.status(newLeader)
	if err := p.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	codes := map[int]int{}
	for range 10 {
		r := <-results
		codes[r.code]++
		if r.code/100 == 2 && r.leader != newLeader {
			t.Fatalf("write acknowledged by %q after the old leader's gate closed (new leader %s)", r.leader, newLeader)
		}
	}
	st, err := c.status(old)
	if err != nil || st.Role != "follower" {
		t.Fatalf("old leader after SIGCONT: %+v %v", st, err)
	}
	waitFor(t, 5*time.Second, "the old leader to follow the new one", func() bool {
		st, err := c.status(old)
		return err == nil && st.Leader == newLeader && st.Role == "follower"
	})
	after, _ := c.status(newLeader)
	t.Logf("old leader %s paused; %s took over; the 10 writes queued at the old leader got %v; %d were applied by the new leader", old, newLeader, codes, after.LastSeq-before.LastSeq)

	// Fencing: a replication batch of the old term (as the resumed leader
	// would send, with the real cluster token) is refused by the followers,
	// and no stale value becomes visible anywhere.
	if code, _, err := c.write(shortClient, newLeader, "fenced", `"new"`); err != nil || code/100 != 2 {
		t.Fatalf("write under the new leader: %d %v", code, err)
	}
	forger, err := transport.NewHTTP(transport.HTTPConfig{Addr: func(id string) (string, error) { return c.addr(id), nil }, Token: testToken})
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range others {
		_, err := forger.Replicate(context.Background(), id, transport.Batch{
			Envelope: transport.Envelope{Epoch: oldSt.Epoch, Leader: old},
			Entries:  []transport.Entry{{Key: "fenced", Value: []byte(`"old"`), Version: transport.Version{Epoch: oldSt.Epoch, Seq: 999999}}},
		})
		if te, ok := errors.AsType[*transport.Error](err); !ok || te.Status != http.StatusConflict || te.Code != "stale_epoch" {
			t.Fatalf("old-term batch at %s: %v, want 409 stale_epoch", id, err)
		}
	}
	for _, id := range c.ids() {
		for _, q := range []string{"", "?consistency=stale"} {
			resp, err := shortClient.Get("http://" + c.addr(id) + "/v1/kv/fenced" + q)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(b) != `"new"` && q == "" {
				t.Fatalf("strong read via %s after the fence: %d %s", id, resp.StatusCode, b)
			}
			if string(b) == `"old"` || string(b) == "old" {
				t.Fatalf("read%s via %s shows the fenced value %s", q, id, b)
			}
		}
	}
}

// peerPost sends a peer call with the given token and returns the status
// and body.
func (c *cluster) peerPost(id, path, body, token string) (int, string) {
	c.t.Helper()
	req, err := http.NewRequest(http.MethodPost, "http://"+c.addr(id)+path, strings.NewReader(body))
	if err != nil {
		c.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if token != "" {
		req.Header.Set("X-Store-Peer-Token", token)
	}
	resp, err := shortClient.Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// apiserverPID finds the control plane's kube-apiserver process by its
// secure port (envtest does not expose the PID).
func (c *cluster) apiserverPID() int {
	c.t.Helper()
	port := strconv.Itoa(c.cp.Env.ControlPlane.APIServer.SecurePort)
	dirs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, f := range dirs {
		raw, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		args := strings.Split(string(raw), "\x00")
		if !strings.HasSuffix(args[0], "kube-apiserver") {
			continue
		}
		for _, a := range args {
			if a == "--secure-port="+port {
				pid, _ := strconv.Atoi(strings.Split(f, "/")[2])
				return pid
			}
		}
	}
	c.t.Fatalf("kube-apiserver with --secure-port=%s not found", port)
	return 0
}

// The Kubernetes API is the lock: while it is paused the leader's gate
// closes and writes are refused with 503, none acknowledged after the close;
// once it resumes, writes flow again within about a retry period.
func TestCluster_APIServerPaused_GateClosesCleanly_WritesResume(t *testing.T) {
	c := startCluster(t, 3)
	leader := c.leader(30 * time.Second)
	ids := []string{"store-1", "store-2", "store-3"}

	type attempt struct {
		sent, done time.Time
		code       int
		by         string
	}
	var (
		mu       sync.Mutex
		attempts []attempt
		stop     = make(chan struct{})
		wg       sync.WaitGroup
	)
	client := &http.Client{Timeout: 30 * time.Second}
	for w := range 3 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				a := attempt{sent: time.Now()}
				code, h, err := c.write(client, ids[(w+i)%3], fmt.Sprintf("pause/%d/%d", w, i), "1")
				a.done, a.code = time.Now(), code
				if err != nil {
					a.code = -1
				} else {
					a.by = h.Get("X-Store-Leader")
				}
				mu.Lock()
				attempts = append(attempts, a)
				mu.Unlock()
				if a.code/100 != 2 {
					time.Sleep(50 * time.Millisecond)
				}
			}
		})
	}
	acked := func(after time.Time) int {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, a := range attempts {
			if a.code/100 == 2 && a.done.After(after) {
				n++
			}
		}
		return n
	}
	waitFor(t, 30*time.Second, "steady writes", func() bool { return acked(time.Time{}) >= 20 })

	pid := c.apiserverPID()
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	paused := time.Now()
	resumed := false
	defer func() {
		if !resumed {
			_ = syscall.Kill(pid, syscall.SIGCONT)
		}
	}()
	var gateClosed time.Time
	waitFor(t, testRenew+5*time.Second, "the leader's write gate to close", func() bool {
		st, err := c.status(leader)
		if err == nil && st.Role != "leader" {
			gateClosed = time.Now()
			return true
		}
		return false
	})
	// Without a leader, stale reads are still served by every node, saying
	// how long ago their replica heard from a leader; strong reads and
	// tight max_stale bounds are refused with 503.
	c.checkReadsWithoutLeader(t, "pause/0/0", "1")
	// Keep the apiserver down past the renew deadline and past the time a
	// node waits for a leader on a client's behalf (forwardTimeout), so
	// clients are refused with 503, then bring it back.
	time.Sleep(max(0, testRenew+forwardTimeout(testLease, testRetry)+2*time.Second-time.Since(paused)))
	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	resumed = true
	resumedAt := time.Now()
	waitFor(t, testLease+10*time.Second, "writes to flow again", func() bool { return acked(resumedAt) >= 10 })
	close(stop)
	wg.Wait()

	var refused int
	firstAfter := time.Time{}
	// While the apiserver is paused no node can hold an open gate, so no
	// acknowledgement may arrive between the gate closing and the resume.
	// (A write may be *sent* in that window and acknowledged after the
	// resume: the forwarding node rides out the outage, which is the point.)
	// The 100ms allows for a response already on the wire when the status
	// poll saw the gate closed.
	for _, a := range attempts {
		if a.code/100 == 2 && a.done.After(gateClosed.Add(100*time.Millisecond)) && a.done.Before(resumedAt) {
			t.Fatalf("a write was acknowledged by %s %s after the gate closed, while the apiserver was paused",
				a.by, a.done.Sub(gateClosed))
		}
		if a.code == http.StatusServiceUnavailable {
			refused++
		}
		if a.code/100 == 2 && a.done.After(resumedAt) && (firstAfter.IsZero() || a.done.Before(firstAfter)) {
			firstAfter = a.done
		}
	}
	if refused == 0 {
		t.Fatal("no write was refused with 503 while the apiserver was paused")
	}
	recovery := firstAfter.Sub(resumedAt)
	bound := time.Duration(float64(testRetry)*2.2) + testRenew/2 + time.Second // retry + an in-flight Lease call's timeout + slack
	t.Logf("gate closed %s after the pause (renew deadline %s); %d writes refused with 503; writes resumed %s after the apiserver (bound %s)",
		gateClosed.Sub(paused).Round(time.Millisecond), testRenew, refused, recovery.Round(time.Millisecond), bound)
	if gateClosed.Sub(paused) > testRenew+time.Second {
		t.Fatalf("gate closed %s after the pause, later than the renew deadline %s", gateClosed.Sub(paused), testRenew)
	}
	if recovery > bound {
		t.Fatalf("writes resumed %s after the apiserver, bound %s", recovery, bound)
	}
}

// checkReadsWithoutLeader reads key (acknowledged as value before the
// leader was lost) through every node.
func (c *cluster) checkReadsWithoutLeader(t *testing.T, key, value string) {
	t.Helper()
	get := func(id, query string) (int, http.Header, string) {
		resp, err := shortClient.Get("http://" + c.addr(id) + "/v1/kv/" + key + query)
		if err != nil {
			t.Fatalf("GET %s%s via %s: %v", key, query, id, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, resp.Header, string(b)
	}
	for _, id := range c.ids() {
		code, h, body := get(id, "?consistency=stale")
		if code != http.StatusOK || body != value || h.Get("X-Store-Last-Contact") == "" {
			t.Fatalf("stale read via %s without a leader: %d %q, last contact %q", id, code, body, h.Get("X-Store-Last-Contact"))
		}
		if code, _, body := get(id, ""); code != http.StatusServiceUnavailable {
			t.Fatalf("strong read via %s without a leader: %d %s, want 503", id, code, body)
		}
	}
	waitFor(t, 5*time.Second, "max_stale=300ms to refuse", func() bool {
		code, _, body := get(c.ids()[0], "?consistency=stale&max_stale=300ms")
		return code == http.StatusServiceUnavailable && strings.Contains(body, "too_stale")
	})
}

// `kubectl port-forward svc/store` sends every request to one pod, which may
// be any of them. Everything must work through a single follower.
func TestCluster_SingleEntryPoint_LikePortForward(t *testing.T) {
	c := startCluster(t, 3)
	leader := c.leader(30 * time.Second)
	entry := c.followerOf(leader)
	base := "http://" + c.addr(entry)
	client := &http.Client{Timeout: 30 * time.Second}
	do := func(method, path, body string, hdr ...string) (int, http.Header, string) {
		t.Helper()
		req, _ := http.NewRequest(method, base+path, strings.NewReader(body))
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, resp.Header, string(b)
	}
	for i := range 20 {
		if code, _, body := do("PUT", fmt.Sprintf("/v1/kv/pf/%02d", i), fmt.Sprintf(`{"i":%d}`, i)); code != 201 {
			t.Fatalf("PUT pf/%02d: %d %s", i, code, body)
		}
	}
	for i := range 20 {
		if code, _, body := do("GET", fmt.Sprintf("/v1/kv/pf/%02d", i), ""); code != 200 || body != fmt.Sprintf(`{"i":%d}`, i) {
			t.Fatalf("GET pf/%02d: %d %s", i, code, body)
		}
	}
	code, h, _ := do("PUT", "/v1/kv/pf/cas", `1`)
	if code != 201 {
		t.Fatalf("create: %d", code)
	}
	if code, _, _ := do("PUT", "/v1/kv/pf/cas", `2`, "If-Match", h.Get("ETag")); code != 200 {
		t.Fatalf("compare-and-set through the entry node: %d", code)
	}
	if code, _, body := do("PUT", "/v1/kv/pf/cas", `3`, "If-Match", h.Get("ETag")); code != 412 || !strings.Contains(body, "condition_failed") {
		t.Fatalf("stale compare-and-set: %d %s", code, body)
	}
	if code, _, body := do("GET", "/v1/kv?prefix=pf/&limit=5", ""); code != 200 || !strings.Contains(body, `"next":"pf/04"`) {
		t.Fatalf("list: %d %s", code, body)
	}
	if code, _, _ := do("DELETE", "/v1/kv/pf/00", ""); code != 200 {
		t.Fatalf("DELETE: %d", code)
	}
	if code, _, body := do("GET", "/v1/kv/pf/00", ""); code != 404 || !strings.Contains(body, "key_not_found") {
		t.Fatalf("GET after DELETE: %d %s", code, body)
	}
	if code, _, body := do("PUT", "/v1/kv/pf/bad", `{`); code != 400 || !strings.Contains(body, "invalid_json") {
		t.Fatalf("bad JSON: %d %s", code, body)
	}
	// A read of a key the entry node does not own is served by an owner
	// (proxied), or redirected to one with ?redirect=true.
	ring := c.ring(t)
	var foreign string
	for i := 1; i < 20 && foreign == ""; i++ { // pf/00 was deleted above
		if k := fmt.Sprintf("pf/%02d", i); !slices.Contains(must(ring.Owners(k, 2)), entry) {
			foreign = k
		}
	}
	if foreign == "" {
		t.Fatal("the entry node owns every pf/ key")
	}
	owners := must(ring.Owners(foreign, 2))
	if code, h, _ := do("GET", "/v1/kv/"+foreign, ""); code != 200 || !slices.Contains(owners, h.Get("X-Store-Served-By")) {
		t.Fatalf("GET %s via non-owner %s: %d, served by %q, owners %v", foreign, entry, code, h.Get("X-Store-Served-By"), owners)
	}
	noRedirect := &http.Client{Timeout: 10 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noRedirect.Get(base + "/v1/kv/" + foreign + "?redirect=true")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	loc := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusTemporaryRedirect || !slices.ContainsFunc(owners, func(o string) bool {
		return loc == "http://"+c.addr(o)+"/v1/kv/"+foreign+"?redirect=true"
	}) {
		t.Fatalf("GET %s?redirect=true: %d Location %q, want 307 to one of %v", foreign, resp.StatusCode, loc, owners)
	}
	// Values come back byte for byte, whichever replica answers.
	const exact = "{ \"a\" : [1, 2,  3],\n  \"h\": \"<&>\" }"
	if code, _, body := do("PUT", "/v1/kv/pf/exact", exact); code != 201 {
		t.Fatalf("PUT exact: %d %s", code, body)
	}
	for _, id := range c.ids() {
		for _, q := range []string{"", "?consistency=stale"} {
			waitFor(t, 5*time.Second, "the exact value via "+id+q, func() bool {
				resp, err := shortClient.Get("http://" + c.addr(id) + "/v1/kv/pf/exact" + q)
				if err != nil {
					return false
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK && string(b) != exact {
					t.Fatalf("GET%s via %s changed the bytes: %q, sent %q", q, id, b, exact)
				}
				return resp.StatusCode == http.StatusOK
			})
		}
	}
}

// must returns v, panicking on err: for calls a test cannot get wrong.
func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
