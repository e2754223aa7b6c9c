package main

import (
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

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

	// Each key is on exactly its owners among the followers, at the
	// acknowledged version; the leader keeps every key (it persists every
	// write and is the source of repair).
	followers := slices.DeleteFunc(c.ids(), func(id string) bool { return id == leader })
	var misplaced []string
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
				misplaced = append(misplaced, fmt.Sprintf("%s held by non-owner %s", key, id))
			}
			mu.Unlock()
		}
	})
	if len(misplaced) > 0 {
		t.Fatalf("%d placement errors, first: %v", len(misplaced), misplaced[:min(5, len(misplaced))])
	}

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
