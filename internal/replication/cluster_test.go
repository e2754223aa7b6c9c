package replication

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// fakeLead is a Leadership a test moves by hand: who leads, in which term.
type fakeLead struct {
	self string
	mu   sync.Mutex
	id   string
	ep   uint64
	seen uint64
}

func (f *fakeLead) set(id string, epoch uint64) {
	f.mu.Lock()
	f.id, f.ep = id, epoch
	f.mu.Unlock()
}

func (f *fakeLead) WriteGate() (uint64, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ep, f.id == f.self && f.seen <= f.ep
}

func (f *fakeLead) Leader() (string, uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.id, f.ep
}

func (f *fakeLead) seenEpoch() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.seen
}

func (f *fakeLead) ObserveEpoch(e uint64) {
	f.mu.Lock()
	f.seen = max(f.seen, e)
	f.mu.Unlock()
}

// testNode is one member: a real store and a Cluster on an in-memory
// network, which the test can take down (its calls are never sent).
type testNode struct {
	id   string
	db   *storage.DB
	c    *Cluster
	lead *fakeLead
	down atomic.Bool
	net  *transport.InMem
	// extra, shared by the members, injects faults besides down.
	extra *atomic.Pointer[func(transport.Call) transport.Fault]
}

// setFault makes every call between the members go through f as well as
// the down check (nil: none).
func (nd *testNode) setFault(f func(transport.Call) transport.Fault) {
	if f == nil {
		nd.extra.Store(nil)
		return
	}
	nd.extra.Store(&f)
}

// wireError stands in for the API's error table for replication's errors.
func wireError(err error) *transport.Error {
	te := &transport.Error{Status: http.StatusInternalServerError, Code: "internal", Message: err.Error()}
	switch se, stale := errors.AsType[*StaleError](err); {
	case stale:
		te.Status, te.Code, te.Fence = http.StatusServiceUnavailable, "stale_epoch", se.Fence
	case errors.Is(err, ErrInvalidCall):
		te.Status, te.Code = http.StatusBadRequest, "invalid_request"
	case errors.Is(err, ErrNotCaughtUp), errors.Is(err, ErrReadTimeout):
		te.Status, te.Code = http.StatusServiceUnavailable, "not_leader"
	}
	return te
}

// newTestCluster starts n members node-1..node-n with factor r, led by
// node-1 in term 1.
func newTestCluster(t *testing.T, n, r int) []*testNode {
	t.Helper()
	return newTestClusterWith(t, n, r, func(*ClusterConfig) {})
}

// newTestClusterWith is newTestCluster with a hook to adjust each member's
// configuration.
func newTestClusterWith(t *testing.T, n, r int, adjust func(*ClusterConfig)) []*testNode {
	t.Helper()
	var members []string
	for i := 1; i <= n; i++ {
		members = append(members, fmt.Sprintf("node-%d", i))
	}
	net := transport.NewInMem()
	var nodes []*testNode
	// A member that is down answers nothing: its calls are never sent.
	down := map[string]*atomic.Bool{}
	var downMu sync.Mutex
	extra := &atomic.Pointer[func(transport.Call) transport.Fault]{}
	net.SetFault(func(c transport.Call) transport.Fault {
		var f transport.Fault
		if x := extra.Load(); x != nil {
			f = (*x)(c)
		}
		downMu.Lock()
		defer downMu.Unlock()
		f.Unreachable = f.Unreachable || down[c.To] != nil && down[c.To].Load()
		return f
	})
	for _, id := range members {
		ring, err := NewRing(RingConfig{})
		if err != nil {
			t.Fatal(err)
		}
		db, err := storage.Open(t.TempDir(), storage.Options{Partitions: ring.PartitionCount(), PartitionOf: ring.Partition})
		if err != nil {
			t.Fatal(err)
		}
		nd := &testNode{id: id, db: db, lead: &fakeLead{self: id}, net: net, extra: extra}
		downMu.Lock()
		down[id] = &nd.down
		downMu.Unlock()
		nd.lead.set(members[0], 1)
		cfg := ClusterConfig{
			Self: id, Members: members, ReplicationFactor: r, Ring: ring, Local: db, Leadership: nd.lead,
			Peers: net.Client(id), HeartbeatInterval: 50 * time.Millisecond,
			RepairInterval: 100 * time.Millisecond, ReadTimeout: 2 * time.Second,
		}
		adjust(&cfg)
		nd.c, err = NewCluster(cfg)
		if err != nil {
			t.Fatal(err)
		}
		net.Register(id, transport.Services{Replica: nd.c.Service(), ErrorOf: wireError})
		nd.c.Start()
		t.Cleanup(func() {
			nd.c.Close()
			_ = db.Close()
		})
		nodes = append(nodes, nd)
	}
	return nodes
}

// awaitGate polls until nd's write gate (caught up) opens.
func awaitGate(t *testing.T, nd *testNode) uint64 {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if e, open := nd.c.WriteGate(); open {
			return e
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("%s never caught up", nd.id)
	return 0
}

// awaitCaughtUp waits until nd leads with every partition caught up, not
// only its gate open.
func awaitCaughtUp(t *testing.T, nd *testNode) uint64 {
	t.Helper()
	epoch := awaitGate(t, nd)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := nd.c.AwaitCaughtUp(ctx, epoch); err != nil {
		t.Fatalf("%s: %v", nd.id, err)
	}
	return epoch
}

func put(t *testing.T, nd *testNode, ack AckLevel, key, val string) storage.Result {
	t.Helper()
	epoch := awaitGate(t, nd)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res, err := nd.c.Write(ctx, epoch, ack, key, func(beforeSync func(storage.Result)) (storage.Result, error) {
		return nd.db.Apply(ctx, storage.Mutation{Key: key, Value: []byte(val), Epoch: epoch, BeforeSync: beforeSync})
	})
	if err != nil {
		t.Fatalf("write %s on %s: %v", key, nd.id, err)
	}
	return res
}

func byID(nodes []*testNode, id string) *testNode {
	for _, n := range nodes {
		if n.id == id {
			return n
		}
	}
	return nil
}

func TestCluster_QuorumWrite_OnOwnersAndStrongReadAtOwner(t *testing.T) {
	nodes := newTestCluster(t, 3, 2)
	leader := nodes[0]
	for i := range 50 {
		key := fmt.Sprintf("k%d", i)
		res := put(t, leader, AckAll, key, fmt.Sprint(i))
		for _, o := range leader.c.Owners(key) {
			e, found, err := byID(nodes, o).db.Lookup(key)
			if err != nil || !found || e.Version != res.Entry.Version {
				t.Fatalf("ack=all returned but owner %s has %+v found=%v err=%v", o, e, found, err)
			}
		}
		for _, nd := range nodes[1:] {
			if !slices.Contains(leader.c.Owners(key), nd.id) {
				if _, found, _ := nd.db.Lookup(key); found {
					t.Fatalf("%s holds %s but does not own it", nd.id, key)
				}
			}
		}
	}
	// A strong read at any owner sees the latest acknowledged write.
	res := put(t, leader, AckQuorum, "k1", `"new"`)
	for _, o := range leader.c.Owners("k1") {
		e, found, err := byID(nodes, o).c.ReadStrong(context.Background(), "k1")
		if err != nil || !found || e.Version != res.Entry.Version {
			t.Fatalf("strong read at %s: %+v found=%v err=%v, want %s", o, e, found, err, res.Entry.Version)
		}
	}
}

func TestCluster_OwnerDown_StandInTakesQuorum_RepairCatchesUp(t *testing.T) {
	nodes := newTestCluster(t, 3, 2)
	leader := nodes[0]
	victim := nodes[2]
	victim.down.Store(true)
	var keys []string
	for i := range 100 {
		key := fmt.Sprintf("k%d", i)
		put(t, leader, AckQuorum, key, fmt.Sprint(i)) // fails the test if quorum is not met
		keys = append(keys, key)
	}
	victim.down.Store(false)
	// The victim converges: every key it owns at the leader's version.
	deadline := time.Now().Add(10 * time.Second)
	for _, key := range keys {
		if !slices.Contains(leader.c.Owners(key), victim.id) {
			continue
		}
		want, _, _ := leader.db.Lookup(key)
		for {
			got, found, _ := victim.db.Lookup(key)
			if found && got.Version == want.Version {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("victim has %s at %+v (found %v), leader at %s", key, got.Version, found, want.Version)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

func TestCluster_NewLeaderCatchesUpBeforeWriting(t *testing.T) {
	nodes := newTestCluster(t, 3, 2)
	old := nodes[0]
	want := map[string]storage.Version{}
	for i := range 200 {
		key := fmt.Sprintf("k%d", i)
		want[key] = put(t, old, AckQuorum, key, fmt.Sprint(i)).Entry.Version
	}
	// The old leader dies; node-2 takes over term 2.
	old.down.Store(true)
	for _, nd := range nodes {
		nd.lead.set("node-2", 2)
	}
	nw := nodes[1]
	awaitGate(t, nw)
	for key, v := range want {
		e, found, err := nw.c.ReadStrong(context.Background(), key)
		if err != nil || !found || e.Version != v {
			t.Fatalf("new leader reads %s as %+v found=%v err=%v, want %s", key, e.Version, found, err, v)
		}
	}
	// A strong read at a follower owner goes through the new leader.
	for key, v := range want {
		if !slices.Contains(nw.c.Owners(key), "node-3") {
			continue
		}
		e, found, err := nodes[2].c.ReadStrong(context.Background(), key)
		if err != nil || !found || e.Version != v {
			t.Fatalf("strong read of %s at node-3: %+v found=%v err=%v, want %s", key, e.Version, found, err, v)
		}
	}
	// A paused old leader that wakes up and sends a batch of term 1 is
	// refused by a member that took part in the catch-up.
	stale, err := newReplicator(replicatorConfig{Self: "node-1", Peers: nodes[0].net.Client("node-1")})
	if err != nil {
		t.Fatal(err)
	}
	defer stale.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := stale.Replicate(ctx, 1, entry("late", "1", 1, 9999), []string{"node-3"}, 1); !errors.Is(err, storage.ErrStaleEpoch) {
		t.Fatalf("old leader's batch after the new term: %v, want ErrStaleEpoch", err)
	}
	if _, found, _ := nodes[2].db.Lookup("late"); found {
		t.Fatal("a batch of the old term was applied after the new leader caught up")
	}
}

// A leader leaving (shutdown, scale-down) pushes what members lack, so
// even an ack=leader write survives it.
func TestCluster_HandOff_BringsMembersLevel(t *testing.T) {
	nodes := newTestCluster(t, 3, 2)
	leader := nodes[0]
	awaitGate(t, leader)
	for _, nd := range nodes[1:] {
		nd.down.Store(true)
	}
	var keys []string
	for i := range 30 {
		key := fmt.Sprintf("h%d", i)
		put(t, leader, AckLeader, key, fmt.Sprint(i))
		keys = append(keys, key)
	}
	// Neither the followers' repair nor the leader's queues may fix them:
	// only the hand-off.
	leader.c.repl.Close()
	for _, nd := range nodes[1:] {
		nd.c.cancel()
		nd.down.Store(false)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := leader.c.HandOff(ctx); err != nil {
		t.Fatal(err)
	}
	for _, key := range keys {
		want, _, _ := leader.db.Lookup(key)
		for _, o := range leader.c.Owners(key) {
			if got, found, _ := byID(nodes, o).db.Lookup(key); !found || got.Version != want.Version {
				t.Fatalf("after hand-off owner %s has %s at %+v (found %v), want %s", o, key, got.Version, found, want.Version)
			}
		}
	}
}

// A follower whose queue at the leader overflowed missed entries that no
// queue will bring: the leader's heartbeat tells it to repair, and it pulls
// them, with no periodic anti-entropy pass in between.
func TestCluster_QueueOverflow_HeartbeatAsksForRepair(t *testing.T) {
	nodes := newTestClusterWith(t, 2, 2, func(c *ClusterConfig) {
		c.QueueLen = 4
		c.AntiEntropyInterval = time.Hour
	})
	leader, follower := nodes[0], nodes[1]
	awaitGate(t, leader)
	// Let the follower finish its start-up repair pass first, so only the
	// heartbeat's request can trigger the next one.
	deadline := time.Now().Add(5 * time.Second)
	for follower.c.repair.wanted.Load() || follower.c.repair.last.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("follower never finished its start-up repair pass")
		}
		time.Sleep(5 * time.Millisecond)
	}
	follower.down.Store(true)
	var keys []string
	for i := range 40 {
		key := fmt.Sprintf("o%d", i)
		put(t, leader, AckLeader, key, fmt.Sprint(i)) // ack=leader: no follower needed
		keys = append(keys, key)
	}
	if !slices.Contains(leader.c.repl.Behind(), follower.id) {
		t.Fatalf("40 entries into a queue of 4: follower not marked behind (%v)", leader.c.repl.Behind())
	}
	follower.down.Store(false)
	deadline = time.Now().Add(10 * time.Second)
	for _, key := range keys {
		want, _, _ := leader.db.Lookup(key)
		for {
			got, found, _ := follower.db.Lookup(key)
			if found && got.Version == want.Version {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("follower never got %s back (has %+v, found %v)", key, got.Version, found)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}
