package replication

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/statefulkv/store/internal/storage"
)

func del(t *testing.T, nd *testNode, key string) {
	t.Helper()
	epoch := awaitGate(t, nd)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := nd.c.Write(ctx, epoch, AckQuorum, key, func(beforeSync func(storage.Result)) (storage.Result, error) {
		return nd.db.Apply(ctx, storage.Mutation{Key: key, Delete: true, Epoch: epoch, BeforeSync: beforeSync})
	}); err != nil {
		t.Fatalf("delete %s: %v", key, err)
	}
}

func awaitTombstones(t *testing.T, nodes []*testNode, want int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ok := true
		for _, nd := range nodes {
			ok = ok && nd.db.Tombstones() == want
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			for _, nd := range nodes {
				t.Logf("%s keeps %d tombstones", nd.id, nd.db.Tombstones())
			}
			t.Fatalf("tombstones never fell to %d on every member", want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// An owner misses deletes while it is down: collection waits for it (every
// member must answer), it comes back and becomes the leader, and once
// collection has run on every member no deleted key reappears anywhere.
func TestCollect_OwnerMissedDeletes_ThenLeads_NothingResurrected(t *testing.T) {
	nodes := newTestClusterWith(t, 3, 2, func(c *ClusterConfig) {
		c.TombstoneTTL = 300 * time.Millisecond
		c.CollectInterval = 50 * time.Millisecond
	})
	leader, missed := nodes[0], nodes[2]
	for i := range 40 {
		put(t, leader, AckAll, fmt.Sprintf("k%d", i), fmt.Sprint(i))
	}
	missed.down.Store(true)
	for i := range 20 {
		del(t, leader, fmt.Sprintf("k%d", i))
	}
	// Wait until the horizon (versions at least the TTL old) covers the
	// deletes, so only the member that is down holds collection back.
	last := leader.db.LastSeq()
	for deadline := time.Now().Add(5 * time.Second); leader.c.gc.horizon.Seq() < last; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the horizon stayed at %d, below the deletes' %d", leader.c.gc.horizon.Seq(), last)
		}
	}
	for deadline := time.Now().Add(5 * time.Second); !leader.c.down(missed.id); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the leader never noticed %s down", missed.id)
		}
	}
	epoch, _ := leader.c.WriteGate()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// Blocked at once: the barrier would otherwise wait for the queue of
	// the member that is down until ctx ends.
	start := time.Now()
	if err := leader.c.gc.once(ctx, epoch); !errors.Is(err, errMemberDown) {
		t.Fatalf("a collection round with a member down: %v, want errMemberDown", err)
	}
	if took := time.Since(start); took > time.Second {
		t.Fatalf("the blocked round took %s", took)
	}
	if n := leader.db.Tombstones(); n != 20 {
		t.Fatalf("leader keeps %d tombstones with a member down, want all 20", n)
	}
	// The leader dies; the member that missed the deletes returns and leads.
	leader.down.Store(true)
	missed.down.Store(false)
	elect(nodes, missed.id, 2)
	awaitGate(t, missed)
	leader.down.Store(false)
	awaitTombstones(t, nodes, 0)
	for i := range 40 {
		key := fmt.Sprintf("k%d", i)
		for _, nd := range nodes {
			e, found, err := nd.db.Lookup(key)
			if err != nil {
				t.Fatal(err)
			}
			if i < 20 && found {
				t.Fatalf("deleted %s is back on %s at %s", key, nd.id, e.Version)
			}
		}
		e, found, err := missed.c.ReadStrong(ctx, key)
		if err != nil || found != (i >= 20) || (found && string(e.Value) != fmt.Sprint(i)) {
			t.Fatalf("strong read of %s at the new leader: %q found=%v err=%v", key, e.Value, found, err)
		}
	}
}
