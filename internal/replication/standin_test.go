package replication

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// keysOwnedBy returns n keys whose owners (R=2) are exactly a and b.
func keysOwnedBy(t *testing.T, nd *testNode, prefix string, n int, a, b string) []string {
	t.Helper()
	var keys []string
	for i := 0; len(keys) < n; i++ {
		if i > 100000 {
			t.Fatalf("no keys owned by %s and %s", a, b)
		}
		k := fmt.Sprintf("%s%d", prefix, i)
		if o := nd.c.Owners(k); slices.Contains(o, a) && slices.Contains(o, b) {
			keys = append(keys, k)
		}
	}
	return keys
}

// An owner that has stopped answering (SIGSTOP: its calls hang) is not
// known to be down until a call to it times out, but its queue can
// overflow long before that when values are large. A quorum write whose
// only other owner is that one must then go to a live stand-in, as it
// would once the owner is known down, rather than fail at once; and it
// must not leave its key in flight, which would refuse every strong read
// of the key for the rest of the term.
func TestCluster_OwnerQueueFullBeforeKnownDown_StandInTakesQuorum_StrongReadServed(t *testing.T) {
	nodes := newTestClusterWith(t, 3, 2, func(c *ClusterConfig) {
		c.QueueBytes = 1 << 20
		c.AntiEntropyInterval = time.Hour
	})
	built := time.Now()
	leader, paused, standIn := nodes[0], nodes[1], nodes[2]
	awaitGate(t, leader)
	// Members register on the network one after another: wait until a
	// heartbeat sent once all were there has reached both followers.
	heard := func(id string) bool {
		p := leader.c.repl.peer(id)
		p.healthMu.Lock()
		defer p.healthMu.Unlock()
		return p.lastOK.After(built) && !p.lastFail.After(p.lastOK)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !heard(paused.id) || !heard(standIn.id) {
		if time.Now().After(deadline) {
			t.Fatal("the leader never heard from both followers")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Calls to the paused member hang until their caller gives up.
	leader.setFault(func(c transport.Call) transport.Fault {
		if c.To == paused.id {
			return transport.Fault{Delay: time.Hour}
		}
		return transport.Fault{}
	})
	value := `"` + strings.Repeat("<", 256<<10) + `"`
	keys := keysOwnedBy(t, leader, "big", 12, leader.id, paused.id)
	// Fill the paused owner's queue (ack=leader waits for nobody).
	i := 0
	for ; !slices.Contains(leader.c.repl.Behind(), paused.id); i++ {
		if i == len(keys)-1 {
			t.Fatalf("%d writes of %d bytes did not overflow a queue of 1 MiB", i, len(value))
		}
		put(t, leader, AckLeader, keys[i], value)
	}
	if leader.c.down(paused.id) {
		t.Fatalf("%s is known down already; the test needs its queue to overflow first", paused.id)
	}
	key := keys[i]
	res := put(t, leader, AckQuorum, key, value)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	got, found, err := leader.c.ReadStrong(ctx, key)
	if err != nil || !found || got.Version != res.Entry.Version {
		t.Fatalf("strong read of %s on the leader after its quorum write: %v %v %v", key, got.Version, found, err)
	}
	if e, found, _ := standIn.db.Lookup(key); !found || e.Version != res.Entry.Version {
		t.Fatalf("the live non-owner %s holds %v (found %v), want the stand-in copy %v", standIn.id, e.Version, found, res.Entry.Version)
	}
}

// When no follower can take a quorum write at all (every queue is full),
// the write fails at once with an unknown outcome, and its key stays in
// flight, since the leader's copy alone is not yet safe to read. But it must
// not stay so for the rest of the term: once the followers drain, the
// leader offers the entry again, it commits, and strong reads of the key
// are served again with its version.
func TestCluster_NoQueueTakesTheWrite_OfferedAgainOnceTheyDrain_StrongReadServed(t *testing.T) {
	nodes := newTestClusterWith(t, 3, 2, func(c *ClusterConfig) {
		c.QueueBytes = 1 << 20
		c.AntiEntropyInterval = time.Hour
	})
	leader := nodes[0]
	awaitGate(t, leader)
	leader.setFault(func(c transport.Call) transport.Fault {
		if c.From == leader.id && c.Path == transport.ReplicatePath {
			return transport.Fault{Delay: time.Hour}
		}
		return transport.Fault{}
	})
	value := `"` + strings.Repeat("<", 256<<10) + `"`
	for i := 0; len(leader.c.repl.Behind()) < 2; i++ {
		if i == 40 {
			t.Fatalf("%d writes of %d bytes did not overflow both queues of 1 MiB", i, len(value))
		}
		put(t, leader, AckLeader, fmt.Sprintf("fill%d", i), value)
	}
	const key = "refused"
	epoch := awaitGate(t, leader)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	res, err := leader.c.Write(ctx, epoch, AckQuorum, key, func(beforeSync func(storage.Result)) (storage.Result, error) {
		return leader.db.Apply(ctx, storage.Mutation{Key: key, Value: []byte(value), Epoch: epoch, BeforeSync: beforeSync})
	})
	if !errors.Is(err, ErrAckTimeout) || res.Entry.Version.IsZero() {
		t.Fatalf("quorum write with every queue full: %v (version %s), want %v after the local commit", err, res.Entry.Version, ErrAckTimeout)
	}
	if took := time.Since(start); took > 4*time.Second {
		t.Fatalf("the write waited %s (%v): a queue took it, so the test does not test a refusal", took, err)
	}
	leader.setFault(nil)
	deadline := time.Now().Add(20 * time.Second)
	for {
		rctx, rcancel := context.WithTimeout(context.Background(), time.Second)
		got, found, err := leader.c.ReadStrong(rctx, key)
		rcancel()
		if err == nil {
			if !found || got.Version != res.Entry.Version {
				t.Fatalf("strong read of %s: found %v at %s, want %s", key, found, got.Version, res.Entry.Version)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("strong read of %s still refused 20 s after the followers drained: %v", key, err)
		}
	}
	for _, nd := range nodes[1:] {
		if !slices.Contains(leader.c.Owners(key), nd.id) {
			continue
		}
		if e, found, _ := nd.db.Lookup(key); !found || e.Version != res.Entry.Version {
			t.Fatalf("owner %s holds %s (found %v), want %s", nd.id, e.Version, found, res.Entry.Version)
		}
	}
}
