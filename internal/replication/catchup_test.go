package replication

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"testing/synctest"
	"time"

	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// A new leader accepts writes once the term is fenced, before it has pulled
// the earlier terms' writes: a write or strong read of a partition not yet
// pulled pulls that one partition first, so compare-and-set and reads still
// see the newest version, while a listing waits for every partition. Each
// pull from the member that holds the data is slowed, so the background
// catch-up takes minutes (of synctest's time) and the test can see what
// happens before it ends.
func TestCatchUp_PerPartition_WritesBeforeTheWholeStoreIsPulled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		nodes := newTestCluster(t, 3, 2)
		awaitGate(t, nodes[0])
		// 2000 keys acknowledged in term 1 that only node-2 holds (the
		// leader node-1 is lost with the other copy).
		var entries []storage.Entry
		for i := range 2000 {
			entries = append(entries, storage.Entry{Key: fmt.Sprintf("k%04d", i), Value: fmt.Appendf(nil, "%d", i), Version: storage.Version{Epoch: 1, Seq: uint64(i + 1)}})
		}
		if _, err := nodes[1].db.ApplyReplicated(context.Background(), 1, entries); err != nil {
			t.Fatal(err)
		}
		nodes[0].down.Store(true)
		const slow = 500 * time.Millisecond
		nodes[2].setFault(func(c transport.Call) transport.Fault {
			if c.From == "node-3" && c.Path == transport.EntriesPath {
				return transport.Fault{Delay: slow}
			}
			return transport.Fault{}
		})
		elect(nodes, "node-3", 2)
		leader := nodes[2]
		start := time.Now()
		epoch := awaitGate(t, leader)
		if opened := time.Since(start); opened >= slow {
			t.Fatalf("the gate opened after %s, not before the first pull (%s)", opened, slow)
		}
		partitions := leader.c.cfg.Ring.PartitionCount()

		// A CAS on a key only node-2 holds succeeds against its version.
		k := entries[1234]
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		res, err := leader.c.Write(ctx, epoch, AckQuorum, k.Key, func(beforeSync func(storage.Result)) (storage.Result, error) {
			return leader.db.Apply(ctx, storage.Mutation{Key: k.Key, Value: []byte(`"new"`), Epoch: epoch, IfMatch: k.Version, BeforeSync: beforeSync})
		})
		if err != nil {
			t.Fatalf("CAS on the version node-2 holds: %v", err)
		}
		if res.Entry.Version.Epoch != epoch {
			t.Fatalf("CAS wrote %s, want a version of term %d", res.Entry.Version, epoch)
		}
		// A create-only write of a key node-2 holds is refused.
		c := entries[77]
		_, err = leader.c.Write(ctx, epoch, AckQuorum, c.Key, func(beforeSync func(storage.Result)) (storage.Result, error) {
			return leader.db.Apply(ctx, storage.Mutation{Key: c.Key, Value: []byte(`"dup"`), Epoch: epoch, IfAbsent: true, BeforeSync: beforeSync})
		})
		if !errors.Is(err, storage.ErrConditionFailed) {
			t.Fatalf("create-only of a key an earlier term wrote: got %v, want %v", err, storage.ErrConditionFailed)
		}
		// A strong read at the leader sees a third key's value.
		r := entries[1999]
		got, found, err := leader.c.ReadStrong(ctx, r.Key)
		if err != nil || !found || got.Version != r.Version || string(got.Value) != string(r.Value) {
			t.Fatalf("strong read of %q: %v %v %s %q, want %s %q", r.Key, err, found, got.Version, got.Value, r.Version, r.Value)
		}
		// All that took a few pulls, not the store's worth.
		left := leader.c.Status().CatchingUpPartitions
		if left < partitions/2 {
			t.Fatalf("%d of %d partitions left to pull after three requests: they waited for the background", left, partitions)
		}
		if took := time.Since(start); took > 10*slow {
			t.Fatalf("three requests took %s; each should wait for its own partition's pull (%s a call)", took, slow)
		}
		// A listing spans every partition: it waits.
		short, cancelShort := context.WithTimeout(context.Background(), slow)
		err = leader.c.AwaitCaughtUp(short, epoch)
		cancelShort()
		if !errors.Is(err, ErrNotCaughtUp) {
			t.Fatalf("AwaitCaughtUp before the pulls ended: got %v, want %v", err, ErrNotCaughtUp)
		}
		if st := leader.c.Status(); st.CaughtUpEpoch == epoch {
			t.Fatalf("status says caught up in term %d with %d partitions left", epoch, st.CatchingUpPartitions)
		}

		// Without the slowdown the rest follows, and the leader holds it all.
		nodes[2].setFault(nil)
		awaitCaughtUp(t, leader)
		for i, e := range entries {
			got, found, err := leader.db.Lookup(e.Key)
			want := e
			if i == 1234 {
				want = res.Entry
			}
			if err != nil || !found || got.Version != want.Version {
				t.Fatalf("after catch-up %q: %v %v %s, want %s", e.Key, err, found, got.Version, want.Version)
			}
		}
		if st := leader.c.Status(); st.CaughtUpEpoch != epoch || st.CatchingUpPartitions != 0 {
			t.Fatalf("status after catch-up: caught up %d (want %d), %d partitions left", st.CaughtUpEpoch, epoch, st.CatchingUpPartitions)
		}
	})
}

// A pull that fails (the member that answered the fence round stops
// answering) is retried after a new fence round; partitions pulled before
// stay pulled, and the gate stays open.
func TestCatchUp_PullFails_ReplannedWithoutClosingTheGate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		nodes := newTestCluster(t, 3, 2)
		awaitGate(t, nodes[0])
		// node-1 and node-2 both hold them, as a quorum write leaves them.
		entries := seedTerm1(t, 500, nodes[0], nodes[1])
		// The new leader hears both in the fence round, but node-2 fails
		// its first pulls: the next round must do without it.
		var failed int
		nodes[2].setFault(func(c transport.Call) transport.Fault {
			if c.From == "node-3" && c.To == "node-2" && c.Path == transport.EntriesPath && failed < 3 {
				failed++
				return transport.Fault{Unreachable: true}
			}
			return transport.Fault{}
		})
		elect(nodes, "node-3", 2)
		leader := nodes[2]
		awaitCaughtUp(t, leader)
		for _, e := range entries {
			got, found, err := leader.db.Lookup(e.Key)
			if err != nil || !found || got.Version != e.Version {
				t.Fatalf("after catch-up %q: %v %v %s, want %s", e.Key, err, found, got.Version, e.Version)
			}
		}
		if failed == 0 {
			t.Fatal("no pull from node-2 failed: the test tested nothing")
		}
	})
}

// The elector's gate can close and open again within one term (a renewal
// that lands late). The background catch-up stops while it is closed; once
// it opens again the partitions left are still pulled, so listings do not
// wait for the rest of the term.
func TestCatchUp_GateClosesAndReopensInTheTerm_CatchUpStillFinishes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		nodes := newTestCluster(t, 3, 2)
		awaitGate(t, nodes[0])
		entries := seedTerm1(t, 500, nodes[1])
		nodes[0].down.Store(true)
		nodes[2].setFault(func(c transport.Call) transport.Fault {
			if c.From == "node-3" && c.Path == transport.EntriesPath {
				return transport.Fault{Delay: 100 * time.Millisecond}
			}
			return transport.Fault{}
		})
		elect(nodes, "node-3", 2)
		leader := nodes[2]
		awaitGate(t, leader)
		time.Sleep(time.Second) // a few partitions pulled, most not
		// The gate closes (someone else holds the Lease for a moment) and
		// opens again in the same term.
		leader.lead.set("node-2", 2)
		time.Sleep(time.Second)
		synctest.Wait()
		leader.lead.set("node-3", 2)
		nodes[2].setFault(nil)
		awaitCaughtUp(t, leader)
		for _, e := range entries {
			if got, found, err := leader.db.Lookup(e.Key); err != nil || !found || got.Version != e.Version {
				t.Fatalf("after catch-up %q: %v %v %s, want %s", e.Key, err, found, got.Version, e.Version)
			}
		}
	})
}

// A leader that hands off before its catch-up has finished pushes only the
// partitions it has pulled: the others hold no write of its term, and where
// they differ it is what this leader lacks, so pushing them would resend
// its older copy for every round of the hand-off and never settle.
func TestHandOff_BeforeCatchUpEnds_SkipsPartitionsNotPulled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		nodes := newTestCluster(t, 3, 2)
		awaitGate(t, nodes[0])
		entries := seedTerm1(t, 500, nodes[1])
		nodes[0].down.Store(true)
		nodes[2].setFault(func(c transport.Call) transport.Fault {
			if c.From == "node-3" && c.Path == transport.EntriesPath {
				return transport.Fault{Delay: time.Hour} // the pulls never end
			}
			return transport.Fault{}
		})
		elect(nodes, "node-3", 2)
		leader := nodes[2]
		awaitGate(t, leader)
		k := entries[42]
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		start := time.Now()
		if err := leader.c.HandOff(ctx); err != nil {
			t.Fatalf("hand-off with partitions not pulled: %v", err)
		}
		if took := time.Since(start); took > 10*time.Second {
			t.Fatalf("hand-off took %s", took)
		}
		if got, found, err := nodes[1].db.Lookup(k.Key); err != nil || !found || got.Version != k.Version {
			t.Fatalf("node-2's copy of %q after the hand-off: %v %v %s, want %s", k.Key, err, found, got.Version, k.Version)
		}
	})
}

// seedTerm1 writes n keys k0000.. as replicated entries of term 1 into each
// of nodes' stores, as an earlier leader's acknowledged writes leave them,
// and returns them.
func seedTerm1(t *testing.T, n int, nodes ...*testNode) []storage.Entry {
	t.Helper()
	var entries []storage.Entry
	for i := range n {
		entries = append(entries, storage.Entry{Key: fmt.Sprintf("k%04d", i), Value: []byte("1"), Version: storage.Version{Epoch: 1, Seq: uint64(i + 1)}})
	}
	for _, nd := range nodes {
		if _, err := nd.db.ApplyReplicated(context.Background(), 1, entries); err != nil {
			t.Fatal(err)
		}
	}
	return entries
}
