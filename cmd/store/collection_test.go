package main

import (
	"context"
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/statefulkv/store/internal/replication"
)

// Collection settings for the tests: the smallest TTL the flags allow for
// the replication timeout (2×), so a version is old enough within seconds.
var collectionArgs = []string{"--tombstone-ttl=2s", "--replication-timeout=1s"}

// collectBound is how long collection may take to finish once nothing holds
// it back: the TTL, a repair interval (2 s) for a returned member to pull
// what it missed, two rounds (at most 1 s apart; a stand-in's copies are
// dropped in the first and the partition collected in the next) and slack
// for a loaded machine.
const collectBound = 20 * time.Second

// get reads key through node id and returns the status and body.
func (c *cluster) get(client *http.Client, id, key, query string) (int, string, error) {
	resp, err := client.Get("http://" + c.addr(id) + "/v1/kv/" + key + query)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// checkKeys reads every key through every node in ids, strong and stale,
// and from each node's own replica: a deleted key must be absent
// everywhere, a kept one present with its bytes (through the API; a
// node's own replica holds it only if the node owns it or leads).
func (c *cluster) checkKeys(t *testing.T, client *http.Client, ids []string, kept map[string]string, deleted []string, when string) {
	t.Helper()
	var (
		mu   sync.Mutex
		errs []string
	)
	fail := func(format string, a ...any) {
		mu.Lock()
		errs = append(errs, fmt.Sprintf(format, a...))
		mu.Unlock()
	}
	parallel(len(deleted), 16, func(i int) {
		key := deleted[i]
		for _, id := range ids {
			for _, q := range []string{"", "?consistency=stale"} {
				if code, body, err := c.get(client, id, key, q); err != nil || code != http.StatusNotFound {
					fail("deleted %s read%s via %s: %d %.80s %v", key, q, id, code, body, err)
				}
			}
			if got, err := c.local(client, id, key); err != nil || got.status != http.StatusNotFound {
				fail("deleted %s in %s's own replica: %d %s %v", key, id, got.status, got.version, err)
			}
		}
	})
	keys := slices.Sorted(func(yield func(string) bool) {
		for k := range kept {
			if !yield(k) {
				return
			}
		}
	})
	parallel(len(keys), 16, func(i int) {
		key := keys[i]
		for _, id := range ids {
			for _, q := range []string{"", "?consistency=stale"} {
				if code, body, err := c.get(client, id, key, q); err != nil || code != http.StatusOK || body != kept[key] {
					fail("kept %s read%s via %s: %d %.80s %v", key, q, id, code, body, err)
				}
			}
		}
	})
	if len(errs) > 0 {
		slices.Sort(errs)
		t.Fatalf("%s: %d wrong reads, e.g.\n%s", when, len(errs), errs[:min(8, len(errs))])
	}
	t.Logf("%s: %d deleted keys absent and %d kept keys intact through %v (strong, stale, own replica)", when, len(deleted), len(kept), ids)
}

// settle sends one write (a PUT of value, or a DELETE when value is "")
// through id and, while its outcome is unknown (504, or no answer), sends
// it again with the same request id, which waits for the first attempt
// instead of applying twice. A 1 MiB value under the race detector on a
// shared machine can miss a 1 s replication timeout; the test is about
// what collection does with the writes, not about their latency.
func (c *cluster) settle(client *http.Client, method, id, key, value string) (int, error) {
	rid := method + ":" + key
	for range 10 {
		req, err := http.NewRequest(method, "http://"+c.addr(id)+"/v1/kv/"+key, strings.NewReader(value))
		if err != nil {
			return 0, err
		}
		req.Header.Set("X-Request-Id", rid)
		resp, err := client.Do(req)
		if err != nil {
			continue
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusGatewayTimeout {
			return resp.StatusCode, nil
		}
	}
	return 0, fmt.Errorf("%s %s: outcome still unknown after 10 attempts", method, key)
}

// tombstones reads store_storage_tombstones of each node.
func (c *cluster) tombstones(ids ...string) map[string]float64 {
	out := map[string]float64{}
	for _, id := range ids {
		out[id] = c.metric(id, "store_storage_tombstones")
	}
	return out
}

// An owner misses deletes while it is down. Collection must hold back
// until it returns (it still holds the old puts), then collect every
// tombstone, on every member; and whether the returned owner rejoins as a
// follower or becomes the leader, no deleted key comes back.
func TestCollection_OwnerDownDuringDeletes_NoDeletedKeyReappears(t *testing.T) {
	start := time.Now()
	c := startCluster(t, 3, collectionArgs...)
	leader := c.leader(30 * time.Second)
	c.awaitLeaderKnown(leader, c.ids()...)
	ring := c.ring(t)
	client := &http.Client{Timeout: 30 * time.Second}

	// 600 small values and 6 of 1 MiB (escaped: the bytes must come back
	// exactly); every other key is deleted later, 1 MiB ones included.
	const small, large = 600, 6
	values := map[string]string{}
	for i := range small {
		values[fmt.Sprintf("gc/%04d", i)] = fmt.Sprintf(`{"i":%d}`, i)
	}
	for i := range large {
		values[fmt.Sprintf("gc/big/%d", i)] = escapedValue(t, i, 1<<20)
	}
	keys := slices.Sorted(func(yield func(string) bool) {
		for k := range values {
			if !yield(k) {
				return
			}
		}
	})
	parallel(len(keys), 8, func(i int) {
		if code, err := c.settle(client, http.MethodPut, leader, keys[i], values[keys[i]]); err != nil || code/100 != 2 {
			t.Errorf("PUT %s: %d %v", keys[i], code, err)
		}
	})
	if t.Failed() {
		t.FailNow()
	}

	// The victim is a follower; deleted keys it owns are the ones it will
	// come back holding as puts.
	victim := c.followerOf(leader)
	third := c.except(leader)[0]
	if third == victim {
		third = c.except(leader)[1]
	}
	kept := map[string]string{}
	var deleted []string
	victimOwns := 0
	for i, k := range keys {
		if i%2 == 1 {
			kept[k] = values[k]
			continue
		}
		deleted = append(deleted, k)
		if slices.Contains(must(ring.Owners(k, 2)), victim) {
			victimOwns++
		}
	}
	if err := c.nodes[victim].cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-c.nodes[victim].done
	waitFor(t, 10*time.Second, "the leader to see "+victim+" down", func() bool {
		st, err := c.status(leader)
		if err != nil {
			return false
		}
		for _, m := range st.Replication.Members {
			if m.ID == victim {
				return !m.Live
			}
		}
		return false
	})
	parallel(len(deleted), 8, func(i int) {
		if code, err := c.settle(client, http.MethodDelete, leader, deleted[i], ""); err != nil || code != http.StatusOK {
			t.Errorf("DELETE %s with %s down: %d %v", deleted[i], victim, code, err)
		}
	})
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("%s killed; %d of %d keys deleted, %d of them owned by %s", victim, len(deleted), len(keys), victimOwns, victim)

	// Collection holds back: once the horizon covers every delete, rounds
	// run and are blocked, and no tombstone goes anywhere.
	st, err := c.status(leader)
	if err != nil {
		t.Fatal(err)
	}
	lastDelete := float64(st.LastSeq)
	const blocked = `store_replication_collection_rounds_total{outcome="blocked"}`
	waitFor(t, 10*time.Second, "the horizon to pass the deletes", func() bool {
		return c.metric(leader, "store_replication_collection_horizon_seq") >= lastDelete
	})
	before := max(c.metric(leader, blocked), 0)
	waitFor(t, 10*time.Second, "two blocked rounds past the deletes", func() bool {
		return c.metric(leader, blocked) >= before+2
	})
	downTombs := c.tombstones(leader, third)
	if got := c.metric(leader, "store_replication_tombstones_collected_total"); got != 0 {
		t.Fatalf("%v tombstones collected while owner %s was down", got, victim)
	}
	if downTombs[leader] != float64(len(deleted)) {
		t.Fatalf("the leader keeps %v tombstones with %s down, want all %d", downTombs[leader], victim, len(deleted))
	}
	t.Logf("with %s down: %v blocked rounds past the deletes, nothing collected; tombstones %v", victim, c.metric(leader, blocked)-before, downTombs)
	c.checkKeys(t, client, []string{leader, third}, kept, deleted, "with the owner down")

	// The owner returns with its old puts: repair brings it the tombstones,
	// then collection removes every tombstone from every member.
	returned := time.Now()
	c.start(victim)
	waitFor(t, collectBound, "every tombstone collected on every member", func() bool {
		for _, n := range c.tombstones(c.ids()...) {
			if n != 0 {
				return false
			}
		}
		return true
	})
	collected := c.metric(leader, "store_replication_tombstones_collected_total")
	t.Logf("%s back: every tombstone collected %s later (leader counts %v collected, %v stand-in copies dropped, %v complete rounds)",
		victim, time.Since(returned).Round(time.Millisecond), collected,
		c.metric(leader, "store_replication_moved_copies_dropped_total"),
		c.metric(leader, `store_replication_collection_rounds_total{outcome="complete"}`))
	if collected != float64(len(deleted)) {
		t.Fatalf("the leader collected %v tombstones, want exactly the %d deletes", collected, len(deleted))
	}
	if got := c.metric(leader, "store_storage_keys"); got != float64(len(kept)) {
		t.Fatalf("the leader holds %v keys, want the %d kept", got, len(kept))
	}
	c.checkKeys(t, client, c.ids(), kept, deleted, "after collection, "+victim+" a follower")
	// The stand-ins' copies of kept keys are gone too.
	c.awaitOwnedShare(t, ring, leader, c.ids(), kept)

	// Now the owner that missed the deletes leads. The others are stopped so
	// that it is the only candidate: the third killed, the leader
	// terminated (it releases the Lease). Both return once it leads (its
	// catch-up needs one of them to answer).
	if err := c.nodes[third].cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-c.nodes[third].done
	if err := c.nodes[leader].cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	<-c.nodes[leader].done
	// The Lease names it before its gate can open (that needs one of the
	// others), so wait on the Lease, not on its status.
	waitFor(t, testLease+10*time.Second, victim+" to hold the Lease", func() bool {
		lease, err := c.cp.Client.CoordinationV1().Leases(testNS).Get(context.Background(), "store-leader", metav1.GetOptions{})
		return err == nil && lease.Spec.HolderIdentity != nil && *lease.Spec.HolderIdentity == victim
	})
	c.start(leader)
	c.start(third)
	if got := c.leader(testLease + 10*time.Second); got != victim {
		t.Fatalf("leader %s, want %s", got, victim)
	}
	c.awaitLeaderKnown(victim, c.ids()...)
	waitFor(t, collectBound, "the new leader to accept writes", func() bool {
		code, _, err := c.write(shortClient, victim, "gc/after", `"x"`)
		return err == nil && code/100 == 2
	})
	kept["gc/after"] = `"x"`
	c.checkKeys(t, client, c.ids(), kept, deleted, victim+" leading")
	for id, n := range c.tombstones(c.ids()...) {
		if n != 0 {
			t.Fatalf("%s holds %v tombstones after the leader change", id, n)
		}
	}
	// The old leader held every key; as a follower it keeps only its share.
	c.awaitOwnedShare(t, ring, victim, c.ids(), kept)
	t.Logf("test took %s", time.Since(start).Round(time.Millisecond))
}

// ackedWriters write new keys through a set of nodes until halted, keeping
// each acknowledged key's version; a write without a 2xx answer may or may
// not have been applied, and is settled by a strong read after the halt.
type ackedWriters struct {
	c       *cluster
	mu      sync.Mutex
	acked   map[string]string // key → version
	unknown []string
	stop    chan struct{}
	wg      sync.WaitGroup
}

func (c *cluster) startAckedWriters(prefix string, via []string, writers int) *ackedWriters {
	w := &ackedWriters{c: c, acked: map[string]string{}, stop: make(chan struct{})}
	client := &http.Client{Timeout: 30 * time.Second}
	for n := range writers {
		w.wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-w.stop:
					return
				default:
				}
				key := fmt.Sprintf("%s/%d/%05d", prefix, n, i)
				code, v, err := c.putAck(client, via[(n+i)%len(via)], key, fmt.Sprintf(`{"w":%d,"i":%d}`, n, i), "quorum")
				w.mu.Lock()
				if err == nil && code/100 == 2 {
					w.acked[key] = v
				} else {
					w.unknown = append(w.unknown, key)
				}
				w.mu.Unlock()
				if err != nil || code/100 != 2 {
					time.Sleep(20 * time.Millisecond) // refused: don't spin
				}
			}
		})
	}
	return w
}

func (w *ackedWriters) count() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.acked)
}

// halt stops the writers and returns every key that exists with its
// version: the acknowledged ones, and those whose outcome was unknown but
// that the leader holds (read strongly through it).
func (w *ackedWriters) halt(t *testing.T, leader string) (written map[string]string, unknown int) {
	t.Helper()
	close(w.stop)
	w.wg.Wait()
	for _, key := range w.unknown {
		code, v, err := w.c.readVersion(leader, key)
		switch {
		case err != nil:
			t.Fatalf("settling %s, written with an unknown outcome: %v", key, err)
		case code == http.StatusOK:
			w.acked[key] = v
		case code != http.StatusNotFound:
			t.Fatalf("settling %s, written with an unknown outcome: %d", key, code)
		}
	}
	return w.acked, len(w.unknown)
}

// readVersion is a strong read of key through id: its status and version.
func (c *cluster) readVersion(id, key string) (int, string, error) {
	resp, err := shortClient.Get("http://" + c.addr(id) + "/v1/kv/" + key)
	if err != nil {
		return 0, "", err
	}
	resp.Body.Close()
	return resp.StatusCode, strings.Trim(resp.Header.Get("ETag"), `"`), nil
}

// awaitOwnedShare waits until each node in ids holds exactly its share of
// the keys in written: the leader all of them, a follower those whose
// partitions it owns under ring. Collection has then dropped every copy a
// node no longer owns (moved by the ring change, or a stand-in's).
func (c *cluster) awaitOwnedShare(t *testing.T, ring *replication.Ring, leader string, ids []string, written map[string]string) {
	t.Helper()
	want := map[string]int{}
	for key := range written {
		for _, id := range ids {
			if id == leader || slices.Contains(must(ring.Owners(key, 2)), id) {
				want[id]++
			}
		}
	}
	got := map[string]float64{}
	start := time.Now()
	deadline := start.Add(collectBound)
	for {
		done := true
		for _, id := range ids {
			got[id] = c.metric(id, "store_storage_keys")
			done = done && got[id] == float64(want[id])
		}
		if done {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("key counts %v after %s, want each node's owned share %v", got, collectBound, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("each node holds exactly its owned share of %d keys (%s after this check began): %v (leader %s)", len(written), time.Since(start).Round(time.Millisecond), want, leader)
}

// lost returns the keys of written that a strong read through ids does not
// return at their version.
func (c *cluster) lost(client *http.Client, ids []string, written map[string]string) []string {
	keys := slices.Sorted(func(yield func(string) bool) {
		for k := range written {
			if !yield(k) {
				return
			}
		}
	})
	var (
		mu  sync.Mutex
		out []string
	)
	parallel(len(keys), 16, func(i int) {
		code, v, err := c.readVersion(ids[i%len(ids)], keys[i])
		if err != nil || code != http.StatusOK || v != written[keys[i]] {
			mu.Lock()
			out = append(out, fmt.Sprintf("%s (%d %s, want %s, %v)", keys[i], code, v, written[keys[i]], err))
			mu.Unlock()
		}
	})
	return out
}

// With collection on, a scale 3 → 5 → 3 under writes ends with each node
// holding exactly its owned share: the old owners' copies of moved
// partitions, and stand-ins' copies, are dropped once the new owners hold
// them; and nothing acknowledged is lost on the way.
//
// The counts are compared once the writers have stopped and collection
// has run past the last write (a copy younger than the TTL is kept on
// purpose: a write still on its way may count on it). A write answered
// without a 2xx is looked up at the leader afterwards, so the expected
// share is exact: every key that exists, acknowledged or not.
func TestCollection_Scale3To5To3_UnderWrites_EachNodeHoldsItsOwnedShare(t *testing.T) {
	start := time.Now()
	c := startStatefulSetCluster(t, 3, 5, collectionArgs...)
	leader := c.leader(30 * time.Second)
	base := []string{"store-0", "store-1", "store-2"}
	c.awaitLeaderKnown(leader, base...)
	client := &http.Client{Timeout: 30 * time.Second}

	// 3 → 5 under writes through the three pods that stay.
	w := c.startAckedWriters("up", base, 4)
	waitFor(t, 30*time.Second, "writes before scaling up", func() bool { return w.count() >= 300 })
	for _, id := range c.memberIDs[3:] {
		c.dirs[id] = t.TempDir()
		c.start(id)
	}
	c.scale(5)
	c.awaitMembers(c.memberIDs, c.memberIDs...)
	n := w.count()
	waitFor(t, 30*time.Second, "writes on the 5-member ring", func() bool { return w.count() >= n+200 })
	up, unknown := w.halt(t, leader)
	t.Logf("3→5: %d keys written (%d writes answered without a 2xx, looked up after)", len(up), unknown)
	if lost := c.lost(client, c.memberIDs, up); len(lost) > 0 {
		t.Fatalf("%d of %d writes lost across 3→5, e.g. %v", len(lost), len(up), lost[:min(5, len(lost))])
	}
	c.awaitOwnedShare(t, c.ring(t), leader, c.memberIDs, up)
	droppedUp := c.metric(leader, "store_replication_moved_copies_dropped_total")
	if droppedUp <= 0 {
		t.Fatalf("the leader dropped %v moved copies after 3→5: the old owners kept the partitions that moved", droppedUp)
	}

	// 5 → 3 under writes: the StatefulSet says 3, the nodes shrink the
	// ring, and the two pods are stopped as the controller would (SIGTERM).
	w = c.startAckedWriters("down", base, 4)
	waitFor(t, 30*time.Second, "writes before scaling down", func() bool { return w.count() >= 200 })
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
	n = w.count()
	waitFor(t, 30*time.Second, "writes on the 3-member ring", func() bool { return w.count() >= n+200 })
	down, unknown := w.halt(t, leader)
	t.Logf("5→3: %d more keys written (%d writes answered without a 2xx, looked up after)", len(down), unknown)
	all := maps.Clone(up)
	maps.Copy(all, down)
	if lost := c.lost(client, base, all); len(lost) > 0 {
		t.Fatalf("%d of %d writes lost across 3→5→3, e.g. %v", len(lost), len(all), lost[:min(5, len(lost))])
	}
	c.awaitOwnedShare(t, c.ring(t), leader, base, all)
	t.Logf("%d writes across 3→5→3, none lost; moved copies dropped: %v after 3→5, %v in all; test took %s",
		len(all), droppedUp, c.metric(leader, "store_replication_moved_copies_dropped_total"), time.Since(start).Round(time.Millisecond))
}
