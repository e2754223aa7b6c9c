package node

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/statefulkv/store/internal/replication"
	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// Store is what the node needs from the local database. *storage.DB
// implements it.
type Store interface {
	// Get returns the live entry or an error wrapping storage.ErrNotFound.
	Get(key string) (storage.Entry, error)
	// Scan lists live entries in key order, a page bounded by count and
	// bytes; see storage.DB.Scan.
	Scan(prefix, after string, limit, maxBytes int) ([]storage.Entry, bool, error)
	// Apply durably applies a mutation; it returns only after fsync.
	Apply(ctx context.Context, m storage.Mutation) (storage.Result, error)
}

// Leadership is what the node needs from leader election (with
// replication's catch-up folded into the gate, see cmd/store).
type Leadership interface {
	// WriteGate returns the epoch to stamp writes with and whether this
	// node may accept a write at this instant.
	WriteGate() (epoch uint64, open bool)
	// Leader returns the last observed leader and its epoch ("" if none).
	Leader() (id string, epoch uint64)
	// ObserveEpoch reports an epoch seen elsewhere; if it is newer than
	// this node's term, the node stops writing at once.
	ObserveEpoch(epoch uint64)
	// Nudge asks a node that is not leading to try for the Lease now.
	Nudge()
	// HintLeader reports a peer's claim that id leads term epoch.
	HintLeader(id string, epoch uint64)
	// LeaseView is how long ago this node last read the Lease, and how
	// long ago the Lease record last changed (see election.Elector).
	LeaseView() (sinceRead, sinceChange time.Duration)
}

// Replication is what the node needs from internal/replication.
// *replication.Cluster implements it.
type Replication interface {
	// Write runs apply (the leader's local commit) and replicates the
	// entry to the key's owners until ack is met; apply passes beforeSync
	// on as storage.Mutation.BeforeSync.
	Write(ctx context.Context, epoch uint64, ack replication.AckLevel, key string, apply func(beforeSync func(storage.Result)) (storage.Result, error)) (storage.Result, error)
	// Owners lists the key's owners, primary first.
	Owners(key string) []string
	// AwaitCaughtUp returns once the leader of term epoch holds every
	// partition's writes of earlier terms (what a listing needs).
	AwaitCaughtUp(ctx context.Context, epoch uint64) error
	// ReadStrong and ReadStale read this node's replica; see their docs.
	ReadStrong(ctx context.Context, key string) (storage.Entry, bool, error)
	ReadStale(key string) (storage.Entry, bool, time.Duration, error)
	// Members is the current member set.
	Members() []string
	// LastContact is the time since this node last heard from a leader.
	LastContact() time.Duration
}

// Peers carries this node's calls to the others: transport.HTTP in a real
// node, transport.InMemClient in tests. A call that never reached the peer
// fails with an error wrapping transport.ErrNotSent; a peer's refusal is a
// *transport.Error; any other error means the peer may have served it.
type Peers interface {
	Write(ctx context.Context, to string, w transport.Write) (transport.WriteReply, error)
	Read(ctx context.Context, to string, r transport.Read) (transport.ReadReply, error)
	List(ctx context.Context, to string, l transport.List) (transport.ListReply, error)
	NotifyLeader(ctx context.Context, to string, n transport.LeaderNotice) error
	NotifyLeaseReleased(ctx context.Context, to string, n transport.LeaseReleased) error
}

// Config configures a Node. Fields without a stated default are required.
type Config struct {
	// Self is this node's identity.
	Self string
	// Store holds the data.
	Store Store
	// Epoch stamps writes of a single node (no Leadership). Default 1.
	Epoch uint64
	// Leadership switches the node to cluster mode: writes are applied by
	// the leader and forwarded to it from other nodes; so are reads,
	// unless Replication serves them at the key's owners. Nil means a
	// single node that serves everything.
	Leadership Leadership
	// Peers reaches the other nodes; required with Leadership.
	Peers Peers
	// Replication, with Leadership, replicates writes to their owners and
	// serves reads from replicas. Without it a cluster keeps every key on
	// the leader alone.
	Replication Replication
	// Members lists the nodes to notify of leadership changes. Default:
	// Replication's member set.
	Members func() []string
	// ForwardTimeout bounds a request that needs another node, the wait
	// for a leader and every retry included; it should cover a leader
	// change (lease duration + retry period). Default 30s.
	ForwardTimeout time.Duration
	// ReplicationTimeout bounds the wait for a write's ack level; past it
	// the write's outcome is unknown. Default 5s.
	ReplicationTimeout time.Duration
	// ReadyContact is how long a follower may go without a message from
	// the leader and still be ready (see Ready). Default 2s: four
	// heartbeats.
	ReadyContact time.Duration
	// LeaseFresh is how recent a Lease read, and a change of the record,
	// must be for this node to trust that a leader is renewing it. Default
	// 6s: three default retry periods (followers poll every 2-4.4 s, a
	// leader renews every 2 s).
	LeaseFresh time.Duration
	// Logger. Default slog.Default().
	Logger *slog.Logger
}

// Node is one node's request logic: it decides where each request is
// served (here, at the leader, at an owner of the key) and says what came
// of it as a typed error (see OutcomeOf). It knows no HTTP.
//
// Safe for concurrent use.
type Node struct {
	cfg   Config
	log   *slog.Logger
	idSeq atomic.Uint64
}

// New validates cfg and returns the node.
func New(cfg Config) (*Node, error) {
	switch {
	case cfg.Self == "" || cfg.Store == nil:
		return nil, errors.New("node: Config needs Self and Store")
	case cfg.Leadership != nil && cfg.Peers == nil:
		return nil, errors.New("node: Config.Peers is required with Leadership")
	case cfg.Replication != nil && cfg.Leadership == nil:
		return nil, errors.New("node: Config.Replication needs Leadership")
	}
	if cfg.Epoch == 0 {
		cfg.Epoch = 1
	}
	if cfg.Members == nil {
		cfg.Members = func() []string { return nil }
		if cfg.Replication != nil {
			cfg.Members = cfg.Replication.Members
		}
	}
	if cfg.ForwardTimeout <= 0 {
		cfg.ForwardTimeout = 30 * time.Second
	}
	if cfg.ReplicationTimeout <= 0 {
		cfg.ReplicationTimeout = 5 * time.Second
	}
	if cfg.ReadyContact <= 0 {
		cfg.ReadyContact = 2 * time.Second
	}
	if cfg.LeaseFresh <= 0 {
		cfg.LeaseFresh = 6 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Node{cfg: cfg, log: cfg.Logger.With("component", "node")}, nil
}

// Self is this node's identity.
func (n *Node) Self() string { return n.cfg.Self }

// Clustered reports whether the node runs with Leadership.
func (n *Node) Clustered() bool { return n.cfg.Leadership != nil }

// Role says what this node is now: "single" (no Kubernetes), "leader" or
// "follower", with the leader it last observed and that leader's epoch.
func (n *Node) Role() (role, leader string, epoch uint64) {
	if n.cfg.Leadership == nil {
		return "single", "", n.cfg.Epoch
	}
	leader, epoch = n.cfg.Leadership.Leader()
	role = "follower"
	if _, open := n.cfg.Leadership.WriteGate(); open {
		role = "leader"
	}
	return role, leader, epoch
}

// ErrNotReady means this node cannot serve what clients send it now.
var ErrNotReady = errors.New("not ready")

// Ready reports, as nil, whether this node can serve what a Service sends
// it (any request: writes and strong reads included). A single node, and a
// cluster without replication (no heartbeats to judge by), always can. A
// cluster node can when it leads with its write gate open, or it heard from
// the leader within ReadyContact, or no leader is renewing the Lease (an
// election: every node is as able as any other to hold requests until it
// ends, and clients ride it out). It cannot when it does not hear from a
// leader that the apiserver shows renewing the Lease (it is cut off from
// it), or when it cannot read the Lease itself (cut off from everyone).
func (n *Node) Ready() error {
	l, r := n.cfg.Leadership, n.cfg.Replication
	if l == nil || r == nil {
		return nil
	}
	if _, open := l.WriteGate(); open {
		return nil
	}
	silent := r.LastContact()
	if silent <= n.cfg.ReadyContact {
		return nil
	}
	leader, _ := l.Leader()
	if leader == "" {
		leader = "none known"
	}
	sinceRead, sinceChange := l.LeaseView()
	switch {
	case sinceRead > n.cfg.LeaseFresh:
		return fmt.Errorf("%w: no message from the leader (%s) for %s, and the Lease could not be read for %s: cut off?",
			ErrNotReady, leader, round(silent), round(sinceRead))
	case sinceChange <= n.cfg.LeaseFresh:
		return fmt.Errorf("%w: the leader (%s) renews its Lease but no message from it for %s: cut off from it?",
			ErrNotReady, leader, round(silent))
	}
	return nil // nobody renews the Lease: an election is under way
}

// round keeps a duration readable, and an unbounded one short.
func round(d time.Duration) string {
	if d > 365*24*time.Hour {
		return "ever"
	}
	return d.Round(time.Millisecond).String()
}

// Origin says where a request came from: a client, or a node that
// forwarded it here (an HTTP request with the peer headers, from a node of
// an older version, or a typed call). A forwarded request is never
// forwarded again.
type Origin struct {
	// ForwardedBy is the node that forwarded the request ("" for a
	// client).
	ForwardedBy string
	// SeenEpoch is the newest term the forwarding node had seen.
	SeenEpoch uint64
	// Redirect asks for a Redirect instead of a forward (?redirect=true).
	Redirect bool
}

// Redirect is the outcome of a request with Origin.Redirect that another
// node should serve: the client is told to ask To.
type Redirect struct {
	To string
	// Leader is set when To is the leader (writes and leader reads).
	Leader bool
}

func (r *Redirect) Error() string { return "ask " + r.To }

// observe passes a forwarding node's newest term to election first: a
// leader of an older term steps down before it applies anything.
func (n *Node) observe(o Origin) {
	if n.cfg.Leadership != nil && o.SeenEpoch != 0 {
		n.cfg.Leadership.ObserveEpoch(o.SeenEpoch)
	}
}

// route decides where a request that needs the leader is served: here
// (local, with the epoch), or at leader. While no other leader is known (an
// election is under way, or this node still believes it leads after a
// pause) it waits until ctx ends for the Lease to settle rather than
// failing at once, so clients ride out a leader change.
func (n *Node) route(ctx context.Context, o Origin) (epoch uint64, leader string, local bool, err error) {
	n.observe(o)
	if epoch, open := n.cfg.Leadership.WriteGate(); open {
		return epoch, n.cfg.Self, true, nil
	}
	if o.ForwardedBy != "" {
		// The forwarding node retries with fresh leadership information;
		// answering at once keeps one request from waiting twice.
		return 0, "", false, fmt.Errorf("%w: %s forwarded this request here, but this node does not lead; it is never forwarded twice", ErrNotLeader, o.ForwardedBy)
	}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if epoch, open := n.cfg.Leadership.WriteGate(); open {
			return epoch, n.cfg.Self, true, nil
		}
		if leader, _ := n.cfg.Leadership.Leader(); leader != "" && leader != n.cfg.Self {
			return 0, leader, false, nil
		}
		select {
		case <-ctx.Done():
			return 0, "", false, fmt.Errorf("%w: no node held the leader lease for %s; nothing was applied, retry shortly", ErrNoLeader, n.cfg.ForwardTimeout)
		case <-tick.C:
		}
	}
}

// newRequestID gives a write about to be forwarded an id, so the retries
// of the forward are applied once.
//
// The id starts with the time in fixed-width hex, so the ids the leader
// records sort in arrival order and land at the end of its request-id
// B-tree: random ids dirtied a page per write there, which made the
// leader's commits several times larger (seen in CPU profiles as bbolt
// write time). The node id and a counter keep ids unique across nodes and
// within one nanosecond; the random part keeps them unique across
// restarts with a skewed clock.
func (n *Node) newRequestID() string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("%016x-%s-%x-%s", time.Now().UnixNano(), n.cfg.Self, n.idSeq.Add(1), hex.EncodeToString(b[:]))
}

// NotifyLeader tells every other member that this node now leads term
// epoch, so they forward to it at once instead of after their next poll
// of the Lease. Best effort: a member that misses it still polls.
func (n *Node) NotifyLeader(ctx context.Context, epoch uint64) {
	n.notifyAll(ctx, func(ctx context.Context, id string) error {
		return n.cfg.Peers.NotifyLeader(ctx, id, transport.LeaderNotice{Leader: n.cfg.Self, Epoch: epoch})
	})
}

// NotifyLeaseReleased tells every other member that this node has released
// the Lease, so one campaigns at once. Best effort, like NotifyLeader.
func (n *Node) NotifyLeaseReleased(ctx context.Context) {
	n.notifyAll(ctx, func(ctx context.Context, id string) error {
		return n.cfg.Peers.NotifyLeaseReleased(ctx, id, transport.LeaseReleased{From: n.cfg.Self})
	})
}

func (n *Node) notifyAll(ctx context.Context, call func(context.Context, string) error) {
	if n.cfg.Peers == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for _, id := range n.cfg.Members() {
		if id == n.cfg.Self {
			continue
		}
		wg.Go(func() {
			if err := call(ctx, id); err != nil {
				n.log.Debug("notice not delivered", "member", id, "err", err)
			}
		})
	}
	wg.Wait()
}
