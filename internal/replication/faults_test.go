package replication

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// Faults on the in-memory transport, in fake time: each test breaks the
// network one way and checks the promise that must hold anyway.

// strongAt reads key strongly at nd and fails the test unless it is at want.
func strongAt(t *testing.T, nd *testNode, key string, want storage.Version) {
	t.Helper()
	e, found, err := nd.c.ReadStrong(context.Background(), key)
	if err != nil || !found || e.Version != want {
		t.Fatalf("strong read of %s at %s: %s found=%v err=%v, want %s", key, nd.id, e.Version, found, err, want)
	}
}

// elect makes id the leader of epoch for every member.
func elect(nodes []*testNode, id string, epoch uint64) {
	for _, nd := range nodes {
		nd.lead.set(id, epoch)
	}
}

// A follower cut off from everyone while quorum writes go on: every write
// is still acknowledged (a stand-in takes the copy), and after the leader
// dies no acknowledged write is lost at its successor.
func TestFaults_FollowerPartitioned_ThenLeaderLost_NoAcknowledgedWriteLost(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		nodes := newTestCluster(t, 3, 2)
		leader := nodes[0]
		nodes[0].setFault(func(c transport.Call) transport.Fault {
			return transport.Fault{Unreachable: c.To == "node-3" || c.From == "node-3"}
		})
		acked := map[string]storage.Version{}
		for i := range 60 {
			key := fmt.Sprintf("p%d", i)
			acked[key] = put(t, leader, AckQuorum, key, fmt.Sprint(i)).Entry.Version
		}
		nodes[0].setFault(nil) // healed; then the leader dies
		leader.down.Store(true)
		elect(nodes, "node-2", 2)
		awaitGate(t, nodes[1])
		for key, v := range acked {
			strongAt(t, nodes[1], key, v)
		}
	})
}

// Replies lost after the follower applied the batch: the leader sends the
// batch again, which changes nothing, and every owner ends with the
// leader's exact bytes.
func TestFaults_ReplyLostAfterApply_RetryHarmless_CopiesIdentical(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		nodes := newTestCluster(t, 3, 3)
		leader := nodes[0]
		var calls atomic.Int32
		leader.setFault(func(c transport.Call) transport.Fault {
			return transport.Fault{LoseReply: c.Path == transport.ReplicatePath && calls.Add(1)%2 == 1}
		})
		value := `{"s":"<&>\u00e9","n":[1,2,3]}`
		for i := range 20 {
			key := fmt.Sprintf("r%d", i)
			res := put(t, leader, AckAll, key, value)
			for _, nd := range nodes {
				e, found, err := nd.db.Lookup(key)
				if err != nil || !found || e.Version != res.Entry.Version || string(e.Value) != value {
					t.Fatalf("%s at %s: %s %q found=%v err=%v", key, nd.id, e.Version, e.Value, found, err)
				}
			}
		}
		if calls.Load() < 40 {
			t.Fatalf("only %d replicate calls: the lost replies were not retried", calls.Load())
		}
	})
}

// The old leader's batches are held on the way past the end of its term
// (a stalled network while its Lease runs out). The write is never
// acknowledged, the late batch is refused by members that follow the new
// term, and the old leader learns that it was superseded.
func TestFaults_LeaderBatchesDelayedPastItsTerm_NotAcknowledged_Fenced(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		nodes := newTestCluster(t, 3, 3)
		old := nodes[0]
		awaitGate(t, old)
		old.setFault(func(c transport.Call) transport.Fault {
			if c.From == "node-1" && c.Path == transport.ReplicatePath {
				return transport.Fault{Delay: 3 * time.Second}
			}
			return transport.Fault{}
		})
		done := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
			defer cancel()
			_, err := old.c.Write(ctx, 1, AckQuorum, "late", func(beforeSync func(storage.Result)) (storage.Result, error) {
				return old.db.Apply(ctx, storage.Mutation{Key: "late", Value: []byte(`"old"`), Epoch: 1, BeforeSync: beforeSync})
			})
			done <- err
		}()
		time.Sleep(time.Second)
		elect(nodes, "node-2", 2) // node-1's gate shuts: its Lease is gone
		awaitGate(t, nodes[1])
		if err := <-done; err == nil {
			t.Fatal("a write whose copies arrived after its leader's term ended was acknowledged")
		}
		synctest.Wait()
		if _, open := old.c.WriteGate(); open || old.lead.seenEpoch() < 2 {
			t.Fatalf("the old leader never learned of epoch 2 (saw %d)", old.lead.seenEpoch())
		}
		// The new leader caught up from the old one, so the write is
		// there under its old version on the new leader: strong reads
		// agree everywhere on whatever the new leader holds.
		e, found, err := nodes[1].db.Lookup("late")
		if err != nil {
			t.Fatal(err)
		}
		for _, nd := range nodes[1:] {
			got, gotFound, err := nd.c.ReadStrong(context.Background(), "late")
			if err != nil || gotFound != found || got.Version != e.Version {
				t.Fatalf("strong read at %s: %s found=%v err=%v; the new leader has %s found=%v", nd.id, got.Version, gotFound, err, e.Version, found)
			}
		}
	})
}

// An old batch that arrives after the follower already holds a newer
// version (repair got there first) changes nothing: the follower ends at
// the newest version.
func TestFaults_BatchArrivesAfterANewerVersion_FollowerEndsAtNewest(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		nodes := newTestClusterWith(t, 2, 2, func(c *ClusterConfig) { c.AntiEntropyInterval = 200 * time.Millisecond })
		leader, follower := nodes[0], nodes[1]
		awaitGate(t, leader)
		var first atomic.Bool
		leader.setFault(func(c transport.Call) transport.Fault {
			if c.Path == transport.ReplicatePath && c.From == "node-1" && !first.Swap(true) {
				return transport.Fault{Delay: 5 * time.Second}
			}
			return transport.Fault{}
		})
		put(t, leader, AckLeader, "k", `"v1"`)
		v2 := put(t, leader, AckLeader, "k", `"v2"`).Entry.Version
		// Repair brings v2 while the batch with v1 is still held.
		deadline := time.Now().Add(4 * time.Second)
		for {
			if e, found, _ := follower.db.Lookup("k"); found && e.Version == v2 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("repair did not bring the newer version before the old batch arrived")
			}
			time.Sleep(50 * time.Millisecond)
		}
		time.Sleep(10 * time.Second) // the held batch and the one behind it arrive
		synctest.Wait()
		if e, _, _ := follower.db.Lookup("k"); e.Version != v2 || string(e.Value) != `"v2"` {
			t.Fatalf("follower ends at %s %s, want %s", e.Version, e.Value, v2)
		}
		if q := leader.c.repl.Queued()[follower.id]; q != 0 {
			t.Fatalf("%d entries still queued for the follower", q)
		}
	})
}

// A follower that is down while large values are written: its queue at the
// leader stops at the byte bound (the leader's memory does not grow with
// what the follower misses), the follower is marked behind, and once back
// it gets every value from the leader's disk by repair, byte for byte.
func TestFaults_FollowerDown_QueueBoundedByBytes_RepairServesTheRest(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const bound = 4 << 20
		nodes := newTestClusterWith(t, 2, 2, func(c *ClusterConfig) {
			c.QueueBytes = bound
			c.AntiEntropyInterval = time.Hour
		})
		leader, follower := nodes[0], nodes[1]
		awaitGate(t, leader)
		follower.down.Store(true)
		value := `"` + strings.Repeat("<&>", (1<<20)/3) + `"` // about 1 MiB, all of it escapable
		var peak int64
		for i := range 20 {
			put(t, leader, AckLeader, fmt.Sprintf("big%d", i), value)
			peak = max(peak, leader.c.repl.QueuedBytes()[follower.id])
		}
		if peak > bound+int64(len(value))+64 {
			t.Fatalf("%d bytes queued for a follower that is down, bound %d", peak, bound)
		}
		if !slices.Contains(leader.c.repl.Behind(), follower.id) {
			t.Fatal("the follower missed entries but is not marked behind")
		}
		follower.down.Store(false)
		deadline := time.Now().Add(30 * time.Second)
		for i := range 20 {
			key := fmt.Sprintf("big%d", i)
			want, _, _ := leader.db.Lookup(key)
			for {
				got, found, _ := follower.db.Lookup(key)
				if found && got.Version == want.Version {
					if string(got.Value) != value {
						t.Fatalf("%s differs at the follower", key)
					}
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("follower never got %s back", key)
				}
				time.Sleep(50 * time.Millisecond)
			}
		}
	})
}
