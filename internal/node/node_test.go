package node_test

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/statefulkv/store/internal/node"
	"github.com/statefulkv/store/internal/replication"
	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// These tests run the node layer over the in-memory transport: no HTTP
// server, and faults (a partition, a lost reply, a stalled leader) are a
// line each. The HTTP face is tested in internal/api, the real processes
// in cmd/store.

// fakeLeadership is a settable Leadership.
type fakeLeadership struct {
	mu sync.Mutex
	// sinceRead and sinceChange are what LeaseView reports.
	sinceRead, sinceChange time.Duration
	leader                 string
	epoch                  uint64
	open                   bool
	observed               []uint64
	nudged                 int
}

func (f *fakeLeadership) WriteGate() (uint64, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.epoch, f.open
}

func (f *fakeLeadership) Leader() (string, uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.leader, f.epoch
}

func (f *fakeLeadership) ObserveEpoch(e uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.observed = append(f.observed, e)
	if e > f.epoch {
		f.open = false
	}
}

// LeaseView: the Lease was read and changed just now, unless a test says
// otherwise.
func (f *fakeLeadership) LeaseView() (time.Duration, time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sinceRead, f.sinceChange
}

func (f *fakeLeadership) Nudge() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.nudged++
}

func (f *fakeLeadership) HintLeader(id string, epoch uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if epoch > f.epoch {
		f.leader, f.epoch = id, epoch
	}
}

func (f *fakeLeadership) set(leader string, epoch uint64, open bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.leader, f.epoch, f.open = leader, epoch, open
}

// fakeReplication keeps each key on the local store only (Write commits
// here and meets every ack level) and lets a test place owners and fail
// strong reads.
type fakeReplication struct {
	db      *storage.DB
	members []string
	owners  func(key string) []string
	// strongErr, if set, fails strong reads at this node.
	strongErr atomic.Pointer[error]
	// contact, if set, is what LastContact reports (else 0).
	contact atomic.Pointer[time.Duration]
}

func (r *fakeReplication) Write(_ context.Context, _ uint64, _ replication.AckLevel, _ string, apply func(func(storage.Result)) (storage.Result, error)) (storage.Result, error) {
	return apply(nil)
}
func (r *fakeReplication) AwaitCaughtUp(context.Context, uint64) error { return nil }
func (r *fakeReplication) Owners(key string) []string                  { return r.owners(key) }
func (r *fakeReplication) Members() []string                           { return r.members }
func (r *fakeReplication) LastContact() time.Duration {
	if c := r.contact.Load(); c != nil {
		return *c
	}
	return 0
}
func (r *fakeReplication) ReadStrong(_ context.Context, key string) (storage.Entry, bool, error) {
	if err := r.strongErr.Load(); err != nil {
		return storage.Entry{}, false, *err
	}
	e, err := r.db.Get(key)
	if errors.Is(err, storage.ErrNotFound) {
		return storage.Entry{}, false, nil
	}
	return e, err == nil, err
}
func (r *fakeReplication) ReadStale(key string) (storage.Entry, bool, time.Duration, error) {
	e, found, err := r.ReadStrong(context.Background(), key)
	return e, found, 1500 * time.Millisecond, err
}

// wire stands in for the API's error table: the status follows the
// outcome, which is what a node relaying the answer relies on.
func wire(err error) *transport.Error {
	status := http.StatusBadGateway
	switch node.OutcomeOf(err) {
	case node.NotApplied:
		status = http.StatusServiceUnavailable
	case node.Refused:
		status = http.StatusConflict
		if errors.Is(err, storage.ErrNotFound) {
			status = http.StatusNotFound
		}
	}
	return &transport.Error{Status: status, Code: "test", Message: err.Error()}
}

type member struct {
	id   string
	nd   *node.Node
	db   *storage.DB
	ls   *fakeLeadership
	repl *fakeReplication
}

// cluster is nodes on one in-memory network; the first leads epoch 3.
type cluster struct {
	net   *transport.InMem
	nodes []*member
}

type clusterOpts struct {
	replicated bool
	owners     func(key string) []string
	timeout    time.Duration
}

func newCluster(t *testing.T, o clusterOpts, ids ...string) *cluster {
	t.Helper()
	c := &cluster{net: transport.NewInMem()}
	if o.timeout == 0 {
		o.timeout = 2 * time.Second
	}
	for i, id := range ids {
		db, err := storage.Open(t.TempDir(), storage.Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = db.Close() })
		m := &member{id: id, db: db, ls: &fakeLeadership{}}
		m.ls.set(ids[0], 3, i == 0)
		cfg := node.Config{Self: id, Store: db, Leadership: m.ls, Peers: c.net.Client(id), ForwardTimeout: o.timeout,
			Members: func() []string { return ids }}
		if o.replicated {
			m.repl = &fakeReplication{db: db, members: ids, owners: o.owners}
			cfg.Replication = m.repl
		}
		if m.nd, err = node.New(cfg); err != nil {
			t.Fatal(err)
		}
		c.net.Register(id, transport.Services{Node: m.nd.Service(), ErrorOf: wire})
		c.nodes = append(c.nodes, m)
	}
	return c
}

func put(key, value string) node.Write { return node.Write{Key: key, Value: []byte(value)} }

func TestWrite_FollowerForwardsToTheLeader(t *testing.T) {
	c := newCluster(t, clusterOpts{}, "n1", "n2")
	leader, follower := c.nodes[0], c.nodes[1]
	res, err := follower.nd.Write(context.Background(), put("a", `{"x":1}`), node.Origin{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Leader != "n1" || res.Epoch != 3 || res.Version != (storage.Version{Epoch: 3, Seq: 1}) || !res.Created {
		t.Fatalf("result %+v", res)
	}
	if e, err := leader.db.Get("a"); err != nil || string(e.Value) != `{"x":1}` {
		t.Fatalf("leader holds %q, %v", e.Value, err)
	}
	if follower.db.LastSeq() != 0 {
		t.Fatal("the follower applied the write itself")
	}
	if got := leader.ls.observed; len(got) == 0 || got[0] != 3 {
		t.Fatalf("leader observed epochs %v, want the follower's 3", got)
	}
}

func TestWrite_ForwardedWriteIsNeverForwardedAgain(t *testing.T) {
	c := newCluster(t, clusterOpts{}, "n1", "n2")
	_, err := c.nodes[1].nd.Write(context.Background(), put("a", "1"), node.Origin{ForwardedBy: "n9"})
	if !errors.Is(err, node.ErrNotLeader) || node.OutcomeOf(err) != node.NotApplied {
		t.Fatalf("forwarded write at a follower: %v (%s)", err, node.OutcomeOf(err))
	}
	if c.nodes[0].db.LastSeq() != 0 {
		t.Fatal("a forwarded write was forwarded again")
	}
}

func TestWrite_Redirect_NamesTheLeader(t *testing.T) {
	c := newCluster(t, clusterOpts{}, "n1", "n2")
	_, err := c.nodes[1].nd.Write(context.Background(), put("a", "1"), node.Origin{Redirect: true})
	rd, ok := errors.AsType[*node.Redirect](err)
	if !ok || rd.To != "n1" || !rd.Leader {
		t.Fatalf("redirect: %v", err)
	}
	if c.nodes[0].db.LastSeq() != 0 {
		t.Fatal("a redirect applied the write")
	}
}

// The leader applies the write and its answer is lost: the follower
// retries with the same request id, and the write is applied once, for a
// PUT and for a DELETE (whose retry must not turn into a 404).
func TestWrite_ReplyLostAfterApply_RetryAppliesOnce(t *testing.T) {
	c := newCluster(t, clusterOpts{}, "n1", "n2")
	var calls atomic.Int32
	c.net.SetFault(func(call transport.Call) transport.Fault {
		return transport.Fault{LoseReply: call.Path == transport.WritePath && calls.Add(1)%2 == 1}
	})
	res, err := c.nodes[1].nd.Write(context.Background(), put("a", "1"), node.Origin{})
	if err != nil || res.Version != (storage.Version{Epoch: 3, Seq: 1}) || !res.Created {
		t.Fatalf("after a lost reply: %+v %v", res, err)
	}
	res, err = c.nodes[1].nd.Write(context.Background(), node.Write{Key: "a", Delete: true}, node.Origin{})
	if err != nil || !res.Deleted {
		t.Fatalf("DELETE after a lost reply: %+v %v", res, err)
	}
	if n := c.nodes[0].db.LastSeq(); n != 2 || calls.Load() != 4 {
		t.Fatalf("leader applied %d writes in %d calls, want 2 in 4", n, calls.Load())
	}
}

// A partitioned leader: every attempt fails before it is sent, so the
// client learns, after the forward timeout, that nothing was applied.
func TestWrite_LeaderPartitioned_NotAppliedAfterTheTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := newCluster(t, clusterOpts{timeout: 3 * time.Second}, "n1", "n2")
		c.net.SetFault(func(call transport.Call) transport.Fault { return transport.Fault{Unreachable: call.To == "n1"} })
		start := time.Now()
		_, err := c.nodes[1].nd.Write(context.Background(), put("a", "1"), node.Origin{})
		if !errors.Is(err, node.ErrNoLeader) || node.OutcomeOf(err) != node.NotApplied {
			t.Fatalf("partitioned leader: %v (%s)", err, node.OutcomeOf(err))
		}
		if waited := time.Since(start); waited != 3*time.Second {
			t.Fatalf("gave up after %s, want the 3s forward timeout", waited)
		}
		if c.nodes[0].db.LastSeq() != 0 {
			t.Fatal("a write that was never sent was applied")
		}
	})
}

// A leader that applies the write and then stalls past the forward
// timeout (paused, or its renewals late): the client is told the outcome
// is unknown, never that nothing happened, because the write is there.
func TestWrite_LeaderStallsAfterApplying_OutcomeUnknown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := newCluster(t, clusterOpts{timeout: 2 * time.Second}, "n1", "n2")
		c.net.SetFault(func(transport.Call) transport.Fault { return transport.Fault{DelayReply: time.Minute} })
		_, err := c.nodes[1].nd.Write(context.Background(), put("a", "1"), node.Origin{})
		if !errors.Is(err, node.ErrLeaderTimeout) || node.OutcomeOf(err) != node.Unknown {
			t.Fatalf("stalled leader: %v (%s)", err, node.OutcomeOf(err))
		}
		if c.nodes[0].db.LastSeq() != 1 {
			t.Fatal("the stalled leader did not apply the write; the test shows nothing")
		}
	})
}

// The leader moves while a write is on its way: the old one refuses (its
// gate closed: nothing applied), the follower learns of the new leader
// and the write lands there once.
func TestWrite_LeaderMoves_WriteFollowsToTheNewLeader(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := newCluster(t, clusterOpts{}, "n1", "n2", "n3")
		old, follower, next := c.nodes[0], c.nodes[1], c.nodes[2]
		old.ls.set("n1", 3, false) // lost the Lease; the follower does not know yet
		go func() {
			time.Sleep(300 * time.Millisecond)
			next.ls.set("n3", 4, true)
			follower.ls.set("n3", 4, false)
		}()
		res, err := follower.nd.Write(context.Background(), put("a", "1"), node.Origin{})
		if err != nil || res.Leader != "n3" || res.Epoch != 4 {
			t.Fatalf("write across a leader change: %+v %v", res, err)
		}
		if old.db.LastSeq() != 0 || next.db.LastSeq() != 1 {
			t.Fatalf("old leader applied %d, new one %d; want 0 and 1", old.db.LastSeq(), next.db.LastSeq())
		}
	})
}

// A follower that wins the election while a client's write waits for a
// leader applies it itself.
func TestWrite_NoLeaderThenThisNodeElected_AppliesHere(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := newCluster(t, clusterOpts{}, "n1", "n2")
		follower := c.nodes[1]
		follower.ls.set("", 0, false)
		go func() {
			time.Sleep(500 * time.Millisecond)
			follower.ls.set("n2", 4, true)
		}()
		res, err := follower.nd.Write(context.Background(), put("a", "1"), node.Origin{})
		if err != nil || res.Leader != "n2" || follower.db.LastSeq() != 1 {
			t.Fatalf("write during an election: %+v %v", res, err)
		}
	})
}

// A follower that has seen a newer term makes an older leader step down
// before it applies anything.
func TestWrite_SeenEpochDeposesAnOlderLeader(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := newCluster(t, clusterOpts{timeout: time.Second}, "n1", "n2")
		c.nodes[1].ls.set("n1", 4, false)
		_, err := c.nodes[1].nd.Write(context.Background(), put("a", "1"), node.Origin{})
		if node.OutcomeOf(err) != node.NotApplied {
			t.Fatalf("write via a follower that saw epoch 4: %v (%s)", err, node.OutcomeOf(err))
		}
		if _, open := c.nodes[0].ls.WriteGate(); open || c.nodes[0].db.LastSeq() != 0 {
			t.Fatal("the superseded leader kept writing")
		}
	})
}

// A precondition that fails at the leader is its final word: refused,
// not retried.
func TestWrite_FailedPreconditionAtTheLeader_RefusedOnce(t *testing.T) {
	c := newCluster(t, clusterOpts{}, "n1", "n2")
	var calls atomic.Int32
	c.net.SetFault(func(transport.Call) transport.Fault { calls.Add(1); return transport.Fault{} })
	_, err := c.nodes[1].nd.Write(context.Background(), node.Write{Key: "a", Value: []byte("1"), IfExists: true}, node.Origin{})
	if node.OutcomeOf(err) != node.Refused || calls.Load() != 1 {
		t.Fatalf("failed precondition: %v (%s) after %d calls", err, node.OutcomeOf(err), calls.Load())
	}
}

func TestNotices_ReachEveryOtherMember(t *testing.T) {
	c := newCluster(t, clusterOpts{}, "n1", "n2", "n3")
	c.nodes[1].ls.set("n-gone", 2, false)
	c.nodes[0].nd.NotifyLeader(context.Background(), 3)
	if id, ep := c.nodes[1].ls.Leader(); id != "n1" || ep != 3 {
		t.Fatalf("after the notice n2 follows %s %d", id, ep)
	}
	c.nodes[0].nd.NotifyLeaseReleased(context.Background())
	if c.nodes[0].ls.nudged != 0 || c.nodes[1].ls.nudged != 1 || c.nodes[2].ls.nudged != 1 {
		t.Fatal("lease-released notice not delivered to each other member once")
	}
}

// Reads with replication: which node serves, and what a refusal means.
func TestGet_Routing(t *testing.T) {
	ownersOf := func(key string) []string {
		return map[string][]string{"k12": {"n1", "n2"}, "k23": {"n2", "n3"}, "k3": {"n3"}}[key]
	}
	for _, tc := range []struct {
		name   string
		at     int // node index receiving the read
		key    string
		fault  func(transport.Call) transport.Fault
		strong map[string]error // strong-read failures by node
		opts   node.ReadOptions
		origin node.Origin
		// want: the serving node, or the error outcome
		servedBy string
		outcome  node.Outcome
		redirect string
	}{
		{name: "an owner that follows serves itself", at: 1, key: "k12", servedBy: "n2"},
		{name: "the leader hands the read to an owner", at: 0, key: "k12", servedBy: "n2"},
		{name: "a non-owner asks an owner", at: 0, key: "k23", servedBy: "n2"},
		{name: "an owner that cannot confirm passes it on", at: 0, key: "k23", strong: map[string]error{"n2": replication.ErrReadTimeout}, servedBy: "n3"},
		{name: "every owner refuses: the last refusal", at: 0, key: "k3", strong: map[string]error{"n3": replication.ErrReadTimeout}, outcome: node.NotApplied},
		{name: "owners unreachable: the leader serves", at: 0, key: "k23", fault: func(c transport.Call) transport.Fault { return transport.Fault{Unreachable: c.To != "n1"} }, servedBy: "n1"},
		{name: "unreachable and no copy here", at: 1, key: "k3", fault: func(c transport.Call) transport.Fault { return transport.Fault{Unreachable: true} }, outcome: node.NotApplied},
		{name: "a forwarded read is served where it lands", at: 0, key: "k23", origin: node.Origin{ForwardedBy: "n2"}, servedBy: "n1"},
		{name: "redirect to the first owner", at: 0, key: "k23", origin: node.Origin{Redirect: true}, redirect: "n2"},
		{name: "not found at the owner is final", at: 0, key: "k-none", outcome: node.Refused},
		{name: "stale read says how old", at: 1, key: "k12", opts: node.ReadOptions{Stale: true}, servedBy: "n2"},
		{name: "stale read older than max_stale", at: 1, key: "k12", opts: node.ReadOptions{Stale: true, MaxStale: time.Second}, outcome: node.NotApplied},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t, clusterOpts{replicated: true, owners: func(k string) []string {
				if o := ownersOf(k); o != nil {
					return o
				}
				return []string{"n2"}
			}}, "n1", "n2", "n3")
			for _, m := range c.nodes {
				if _, err := m.db.ApplyReplicated(context.Background(), 3, []storage.Entry{
					{Key: "k12", Value: []byte(`"` + m.id + `"`), Version: storage.Version{Epoch: 3, Seq: 1}},
					{Key: "k23", Value: []byte(`"` + m.id + `"`), Version: storage.Version{Epoch: 3, Seq: 2}},
					{Key: "k3", Value: []byte(`"` + m.id + `"`), Version: storage.Version{Epoch: 3, Seq: 3}},
				}); err != nil {
					t.Fatal(err)
				}
				if err, ok := tc.strong[m.id]; ok {
					m.repl.strongErr.Store(&err)
				}
			}
			c.net.SetFault(tc.fault)
			res, err := c.nodes[tc.at].nd.Get(context.Background(), tc.key, tc.opts, tc.origin)
			switch {
			case tc.redirect != "":
				if rd, ok := errors.AsType[*node.Redirect](err); !ok || rd.To != tc.redirect {
					t.Fatalf("want a redirect to %s, got %v", tc.redirect, err)
				}
			case tc.servedBy != "":
				if err != nil || res.ServedBy != tc.servedBy || string(res.Entry.Value) != `"`+tc.servedBy+`"` {
					t.Fatalf("served by %q (%s), %v; want %s", res.ServedBy, res.Entry.Value, err, tc.servedBy)
				}
				if res.HasLastContact != tc.opts.Stale {
					t.Fatalf("last contact reported %v for stale=%v", res.HasLastContact, tc.opts.Stale)
				}
			default:
				if got := node.OutcomeOf(err); got != tc.outcome {
					t.Fatalf("outcome %s (%v), want %s", got, err, tc.outcome)
				}
			}
		})
	}
}

// Without replication only the leader holds data: reads and listings go
// there.
func TestGetAndList_WithoutReplication_ServedByTheLeader(t *testing.T) {
	c := newCluster(t, clusterOpts{}, "n1", "n2")
	ctx := context.Background()
	for _, k := range []string{"a", "b", "c"} {
		if _, err := c.nodes[1].nd.Write(ctx, put(k, `"`+k+`"`), node.Origin{}); err != nil {
			t.Fatal(err)
		}
	}
	res, err := c.nodes[1].nd.Get(ctx, "b", node.ReadOptions{}, node.Origin{})
	if err != nil || string(res.Entry.Value) != `"b"` || res.Entry.Version.IsZero() {
		t.Fatalf("GET via the follower: %+v %v", res, err)
	}
	// The leader's not-found comes back as its answer, with its status.
	_, err = c.nodes[1].nd.Get(ctx, "zz", node.ReadOptions{}, node.Origin{})
	if te, ok := errors.AsType[*transport.Error](err); !ok || te.Status != http.StatusNotFound || node.OutcomeOf(err) != node.Refused {
		t.Fatalf("GET of a missing key via the follower: %v", err)
	}
	page, err := c.nodes[1].nd.List(ctx, node.ListOptions{After: "a", Limit: 1}, node.Origin{})
	if err != nil || len(page.Entries) != 1 || page.Entries[0].Key != "b" || !page.More {
		t.Fatalf("list via the follower: %+v %v", page, err)
	}
	keys := []string{}
	all, err := c.nodes[1].nd.List(ctx, node.ListOptions{Limit: 10}, node.Origin{})
	for _, e := range all.Entries {
		keys = append(keys, e.Key)
	}
	if err != nil || !slices.Equal(keys, []string{"a", "b", "c"}) || all.More {
		t.Fatalf("whole list via the follower: %v %v", keys, err)
	}
}

// Readiness: a node is ready unless it is cut off from a leader that the
// apiserver shows alive, or from the Lease itself; an election keeps every
// node ready, so clients are held through it rather than refused.
func TestReady_CutOffFromALiveLeaderOnly(t *testing.T) {
	never := time.Duration(1<<63 - 1)
	for _, tc := range []struct {
		name                   string
		leads                  bool
		contact                time.Duration
		sinceRead, sinceChange time.Duration
		want                   string // "" for ready, else part of the reason
	}{
		{name: "leader with its gate open", leads: true, contact: never, sinceRead: never, sinceChange: never},
		{name: "follower that hears the leader", contact: 600 * time.Millisecond, sinceRead: time.Second, sinceChange: time.Second},
		{name: "follower cut off from a renewing leader", contact: 5 * time.Second, sinceRead: time.Second, sinceChange: 2 * time.Second, want: "renews its Lease but no message from it for 5s"},
		{name: "election under way: nobody renews", contact: 9 * time.Second, sinceRead: time.Second, sinceChange: 9 * time.Second},
		{name: "cannot read the Lease either", contact: 9 * time.Second, sinceRead: 7 * time.Second, sinceChange: 9 * time.Second, want: "could not be read for 7s"},
		{name: "never heard from a leader, Lease being renewed", contact: never, sinceRead: time.Second, sinceChange: time.Second, want: "for ever"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t, clusterOpts{replicated: true, owners: func(string) []string { return []string{"n1", "n2"} }}, "n1", "n2")
			m := c.nodes[1]
			m.ls.set("n1", 3, tc.leads)
			m.ls.sinceRead, m.ls.sinceChange = tc.sinceRead, tc.sinceChange
			m.repl.contact.Store(&tc.contact)
			err := m.nd.Ready()
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("not ready: %v", err)
			case tc.want != "" && (!errors.Is(err, node.ErrNotReady) || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("Ready() = %v, want not ready saying %q", err, tc.want)
			}
		})
	}
}
