package replication

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/statefulkv/store/internal/storage"
)

// Errors of the cluster's read and write paths.
var (
	// ErrNoLeader means no leader is known, so a strong read cannot be
	// confirmed.
	ErrNoLeader = errors.New("no leader known")
	// ErrReadTimeout means a strong read could not be confirmed in time:
	// the leader had a write to the key in flight, or this replica had not
	// applied the leader's version yet.
	ErrReadTimeout = errors.New("strong read not confirmed in time")
	// ErrDiverged means this replica holds a version of the key the leader
	// does not know (an unacknowledged write of a deposed leader); it
	// refuses to answer a strong read from it until repair.
	ErrDiverged = errors.New("replica holds a version the leader does not know")
	// ErrNotCaughtUp means this node leads but has not finished collecting
	// the previous terms' writes, so it answers no read index yet.
	ErrNotCaughtUp = errors.New("leader still catching up")
)

// AckLevel says how many durable copies a write needs before the client is
// told it succeeded. See doc.go for exactly what each promises.
type AckLevel int

const (
	// AckQuorum (the default): the leader and ⌊R/2⌋ other members.
	AckQuorum AckLevel = iota
	// AckLeader: the leader's fsync only.
	AckLeader
	// AckAll: the leader and every owner of the key.
	AckAll
)

// ParseAck reads the ack= query parameter; "" is the default, quorum.
func ParseAck(s string) (AckLevel, error) {
	switch s {
	case "", "quorum":
		return AckQuorum, nil
	case "leader":
		return AckLeader, nil
	case "all":
		return AckAll, nil
	}
	return 0, fmt.Errorf("ack=%q: use leader, quorum or all", s)
}

func (a AckLevel) String() string {
	return [...]string{"quorum", "leader", "all"}[a]
}

// Leadership is what replication needs from leader election.
type Leadership interface {
	// WriteGate returns this node's term and whether it may write now.
	WriteGate() (epoch uint64, open bool)
	// Leader returns the last observed leader and its term.
	Leader() (id string, epoch uint64)
	// ObserveEpoch reports a newer term seen on the wire: the node stops
	// writing at once if it led an older one.
	ObserveEpoch(epoch uint64)
}

// Local is what replication needs from this node's store. *storage.DB
// implements it.
type Local interface {
	Applier
	Digests() []uint64
	PartitionEntries(parts []int, after string, maxBytes int) ([]storage.Entry, bool, error)
	PartitionVersions(parts []int, after string, maxBytes int) ([]storage.Entry, bool, error)
	Lookup(key string) (storage.Entry, bool, error)
	LookupMany(keys []string, maxBytes int) ([]storage.Entry, int, error)
	LookupVersions(keys []string) ([]storage.Entry, error)
	LastSeq() uint64
	TombstonesUpTo(maxSeq uint64, after string, maxBytes int) ([]storage.Entry, bool, error)
	Changed() <-chan struct{}
}

// ClusterConfig configures a Cluster. Fields without a default are required.
type ClusterConfig struct {
	// Self is this node's identity; Members lists every node's at start
	// (SetMembers changes it). A node outside the member set owns nothing:
	// it is being scaled away.
	Self    string
	Members []string
	// ReplicationFactor is R, the owners per key. Default 2.
	ReplicationFactor int
	// Ring places keys; Members are set on it by NewCluster. The store must
	// partition its digests with the same ring (storage.Options).
	Ring       *Ring
	Local      Local
	Leadership Leadership
	// Peers carries the calls to other members.
	Peers Peers
	// HeartbeatInterval is how often the leader tells every member it is
	// alive (their stale reads report the time since). Default 500ms.
	HeartbeatInterval time.Duration
	// RepairInterval is how often a follower checks whether it needs a
	// repair pass: after it starts, after a leader or member-set change,
	// and when the leader says entries for it were dropped. Default 2s.
	RepairInterval time.Duration
	// AntiEntropyInterval is how often a follower runs a repair pass with
	// no reason to: the safety net. Default 1m.
	AntiEntropyInterval time.Duration
	// ReadTimeout bounds how long a strong read waits for a write in flight
	// or for this replica to apply the leader's version. Default 5s.
	ReadTimeout time.Duration
	// StandInAfter is how long a write waits for its owners before live
	// non-owners take a copy in place of owners that do not answer.
	// Default 500ms.
	StandInAfter time.Duration
	// QueueLen caps the entries waiting for one follower; past it the
	// follower misses entries and is told to repair. Default 65536.
	QueueLen int
	// QueueBytes caps the bytes waiting for one follower, likewise.
	// Default DefaultQueueBytes.
	QueueBytes int64
	// MaxBatchBytes caps one replication batch. Default
	// DefaultMaxBatchBytes.
	MaxBatchBytes int
	// TombstoneTTL is how old a version must be before collection may
	// remove it: a tombstone, or a copy on a member that no longer owns
	// its partition. It must outlast any write still on its way (see
	// DESIGN.md, "Collection"). Zero collects nothing.
	TombstoneTTL time.Duration
	// CollectInterval is how often the leader runs a collection round.
	// Default a tenth of TombstoneTTL, at least a second.
	CollectInterval time.Duration
	Logger          *slog.Logger
	Registerer      prometheus.Registerer
}

// Cluster is one node's part in replication: as leader it replicates each
// write to the key's owners, catches up before its first write of a term,
// answers read-index calls and sends heartbeats; as follower it applies
// what the leader sends, serves reads, and repairs its partitions against
// the leader's. See DESIGN.md for why each piece is there.
//
// Safe for concurrent use. Start runs the background loops; Close stops
// them.
type Cluster struct {
	cfg      ClusterConfig
	log      *slog.Logger
	fence    *termFence
	m        *clusterMetrics
	repl     *replicator // leader: a link per follower (queue, liveness, heartbeat)
	follower *receiver   // follower: applies the leader's batches
	gate     *termGate   // leader: catch-up before a term's first write
	ri       *readIndex  // strong reads, on both sides
	repair   *repairer   // follower: anti-entropy against the leader
	gc       *collector  // leader: tombstones and moved copies

	// born anchors monotonic times kept in atomics: lastContact is the
	// time since born of the last admitted leader message (0: none). A
	// wall clock stepped by NTP must not make a replica look fresher or
	// staler than it is (max_stale, readiness).
	born        time.Time
	lastContact atomic.Int64

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// NewCluster validates cfg, places Members on the ring and returns a
// Cluster whose loops are not running yet (see Start).
func NewCluster(cfg ClusterConfig) (*Cluster, error) {
	switch {
	case cfg.Self == "" || cfg.Ring == nil || cfg.Local == nil || cfg.Leadership == nil || cfg.Peers == nil:
		return nil, errors.New("replication: ClusterConfig needs Self, Ring, Local, Leadership and Peers")
	}
	if cfg.ReplicationFactor == 0 {
		cfg.ReplicationFactor = 2
	}
	if cfg.ReplicationFactor < 1 {
		return nil, fmt.Errorf("%w: replication factor %d must be at least 1", ErrInvalidRing, cfg.ReplicationFactor)
	}
	if err := cfg.Ring.Set(cfg.Members); err != nil {
		return nil, err
	}
	cfg.Members = nil // the ring holds the current members (SetMembers)
	if cfg.HeartbeatInterval <= 0 {
		cfg.HeartbeatInterval = 500 * time.Millisecond
	}
	if cfg.RepairInterval <= 0 {
		cfg.RepairInterval = 2 * time.Second
	}
	if cfg.AntiEntropyInterval <= 0 {
		cfg.AntiEntropyInterval = time.Minute
	}
	if cfg.ReadTimeout <= 0 {
		cfg.ReadTimeout = 5 * time.Second
	}
	if cfg.StandInAfter <= 0 {
		cfg.StandInAfter = 500 * time.Millisecond
	}
	if cfg.CollectInterval <= 0 {
		cfg.CollectInterval = max(cfg.TombstoneTTL/10, time.Second)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	c := &Cluster{
		born:  time.Now(),
		cfg:   cfg,
		log:   cfg.Logger.With("component", "replication"),
		fence: newFence(cfg.Local.FenceEpoch()),
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.follower = &receiver{DB: cfg.Local, Fence: c.fence, OnAdmit: c.admitted}
	c.gate = &termGate{c: c}
	c.ri = newReadIndex(c)
	c.repair = &repairer{c: c}
	c.repair.want() // a pass at start
	c.gc = &collector{c: c, horizon: storage.NewSeqHorizon(cfg.TombstoneTTL)}
	repl, err := newReplicator(replicatorConfig{
		Self:  cfg.Self,
		Peers: cfg.Peers,
		OnStaleEpoch: func(fence uint64) {
			c.cfg.Leadership.ObserveEpoch(fence)
		},
		Active:        c.leads,
		QueueLen:      cfg.QueueLen,
		QueueBytes:    cfg.QueueBytes,
		MaxBatchBytes: cfg.MaxBatchBytes,
		Logger:        cfg.Logger,
	})
	if err != nil {
		return nil, err
	}
	c.repl = repl
	c.m = newClusterMetrics(cfg.Registerer, c)
	return c, nil
}

// Start runs the heartbeat (leader) and repair (follower) loops until
// Close.
func (c *Cluster) Start() {
	c.wg.Go(func() { c.repl.heartbeats(c.ctx, c.cfg.HeartbeatInterval, c.WriteGate, c.members) })
	c.wg.Go(func() { c.repair.run(c.ctx) })
	if c.cfg.TombstoneTTL > 0 {
		c.wg.Go(func() { c.gc.run(c.ctx) })
	}
}

// Close stops the loops, the catch-up, the read-index sender and the
// replication senders, and waits for them. Writes waiting for replicas
// fail with ErrAckTimeout. It always returns nil; the error is there for
// the one lifecycle convention (cancel, wait, release).
func (c *Cluster) Close() error {
	// Cancel under the locks that guard starting goroutines, so none is
	// added to wg once Wait may have begun.
	c.gate.mu.Lock()
	c.ri.mu.Lock()
	c.cancel()
	c.ri.mu.Unlock()
	c.gate.mu.Unlock()
	c.wg.Wait()
	c.repl.Close()
	return nil
}

// spawn runs f on the cluster's wait group unless Close has begun, and
// reports whether it did. Close cancels under gate.mu, so nothing is added
// to the group once its Wait may have begun.
func (c *Cluster) spawn(f func()) bool {
	c.gate.mu.Lock()
	defer c.gate.mu.Unlock()
	if c.ctx.Err() != nil {
		return false
	}
	c.wg.Go(f)
	return true
}

// leads reports whether the elector's gate is open for term epoch.
func (c *Cluster) leads(epoch uint64) bool {
	e, open := c.cfg.Leadership.WriteGate()
	return open && e == epoch
}

// WriteGate is the elector's gate, held shut until this term is fenced at
// the members and their digests are heard (the first step of catch-up, see
// termGate). A new leader must hold every acknowledged write of earlier
// terms in a key's partition before it decides a compare-and-set or answers
// a read index there: Write and the read index wait for that partition, and
// AwaitCaughtUp for all of them. The first call of a term starts the
// catch-up.
func (c *Cluster) WriteGate() (epoch uint64, open bool) {
	e, open := c.cfg.Leadership.WriteGate()
	return e, open && c.gate.open(e)
}

// AwaitCaughtUp returns once this leader of term epoch holds every write
// earlier terms acknowledged in every partition: what a listing, which
// spans them all, needs. It fails with ErrNotCaughtUp (nothing served;
// retry) when ctx ends first.
func (c *Cluster) AwaitCaughtUp(ctx context.Context, epoch uint64) error {
	return c.gate.awaitAll(ctx, epoch)
}

// members returns the current member set, sorted.
func (c *Cluster) members() []string { return c.cfg.Ring.Members() }

// Members returns the current member set, sorted.
func (c *Cluster) Members() []string { return c.members() }

// SetMembers changes the member set (a StatefulSet was scaled). Keys move
// to their new owners by repair: each follower pulls the partitions it now
// owns from the leader, which holds every key. Old owners keep their
// copies; nothing is dropped.
func (c *Cluster) SetMembers(members []string) error {
	old := c.members()
	if err := c.cfg.Ring.Set(members); err != nil {
		return err
	}
	if now := c.members(); !slices.Equal(old, now) {
		c.log.Info("members changed; partitions move to their new owners by repair", "from", old, "to", now, "member", slices.Contains(now, c.cfg.Self))
		c.repair.want()
	}
	return nil
}

// Owners returns the key's owners, primary first.
func (c *Cluster) Owners(key string) []string {
	owners, err := c.cfg.Ring.Owners(key, c.cfg.ReplicationFactor)
	if err != nil {
		// The ring always has members after NewCluster; keep the node
		// serving with what it knows.
		return nil
	}
	return owners
}

// Self is this node's identity.
func (c *Cluster) Self() string { return c.cfg.Self }

// Write applies a write on the leader and replicates it. apply performs the
// local durable write (storage.DB.Apply stamped with epoch), passing
// beforeSync on as storage.Mutation.BeforeSync: the entry then leaves for
// the key's owners while the leader's own disk syncs. Write returns once the
// leader's commit is done and ack is met. The returned error wraps
// ErrAckTimeout, ErrTermEnded or storage.ErrStaleEpoch when the entry is
// durable here but not (yet) where ack promised, and storage.ErrSyncFailed
// when it left for the owners but the local commit failed: in all these
// cases its outcome is unknown to the client.
func (c *Cluster) Write(ctx context.Context, epoch uint64, ack AckLevel, key string, apply func(beforeSync func(storage.Result)) (storage.Result, error)) (storage.Result, error) {
	// A compare-and-set is decided on the newest version: the key's
	// partition must hold what earlier terms acknowledged first.
	if err := c.gate.await(ctx, epoch, key); err != nil {
		return storage.Result{}, err
	}
	// The key is in flight from before the local commit until the leader's
	// copy is durable and the entry is committed on ⌊R/2⌋ others, so a
	// read index never hands out a version that a crash of this node could
	// still take back.
	var (
		once    sync.Once
		waiting atomic.Int32 // the local commit and the replicas' commit
	)
	done := c.ri.writing(key)
	release := func() { once.Do(done) }
	waiting.Store(2)
	step := func() {
		if waiting.Add(-1) == 0 {
			release()
		}
	}
	targets, need, commitAt := c.placement(key, ack)
	// An owner whose queue is full cannot take the entry; a live non-owner
	// stands in for it, as for an owner known down (not for ack=all, which
	// promises owners).
	var fallback func() []string
	if ack != AckAll {
		fallback = func() []string { return c.standIns(key, targets) }
	}
	var (
		p      *pending
		subErr error
	)
	submit := func(e storage.Entry) {
		var standIns int
		p, standIns, subErr = c.repl.Submit(epoch, e, targets, fallback, need, commitAt, step)
		c.m.standIns.Add(float64(standIns))
	}
	res, err := apply(func(r storage.Result) { submit(r.Entry) })
	if err != nil {
		release()
		return res, err
	}
	if p == nil {
		// Not sent during the sync (no durable seq reservation yet, or a
		// replayed request id): send it now.
		entry := res.Entry
		if res.Replayed {
			// A retry of a write applied before: make sure it reaches its
			// copies this time, unless a newer write has replaced it.
			cur, found, err := c.cfg.Local.Lookup(key)
			if err != nil || !found || cur.Version != entry.Version {
				release()
				return res, err
			}
			entry = cur
		}
		submit(entry)
	}
	step() // the leader's copy is durable
	if subErr != nil {
		// Fewer followers than need could even queue it (their queues
		// are full: several members down). The key stays in flight until
		// the entry commits after all, so a strong read never returns a
		// version a crash of this node could take back: keep offering it
		// to the followers as their queues drain.
		if !c.spawn(func() { c.keepOffering(epoch, key, p, targets, fallback, release) }) {
			release() // closing: the next term starts with a new set anyway
		}
		return res, subErr
	}
	if ack != AckAll {
		// An owner that died a moment ago is not known to be down yet: if
		// the entry has not committed soon, stand-ins take it too, whether
		// or not the client still waits (strong reads of the key wait for
		// the commit).
		time.AfterFunc(c.cfg.StandInAfter, func() {
			if !p.Committed() {
				before := p.queuedFor()
				c.m.standIns.Add(float64(c.repl.Extend(p, c.standIns(key, nil)) - before))
			}
		})
	}
	start := time.Now()
	err = p.Wait(ctx)
	c.m.replicate.WithLabelValues(ack.String()).Observe(time.Since(start).Seconds())
	return res, err
}

// keepOffering queues p again for its targets and stand-ins, every
// heartbeat interval, until it commits (the key leaves the in-flight set
// with it), a newer write of the key replaces it, or the term ends; in the
// last two cases it releases the key itself (the newer write is in flight
// on its own, and the next term starts with a new set).
func (c *Cluster) keepOffering(epoch uint64, key string, p *pending, targets []string, fallback func() []string, release func()) {
	t := time.NewTicker(c.cfg.HeartbeatInterval)
	defer t.Stop()
	for !p.Committed() {
		select {
		case <-c.ctx.Done():
			release()
			return
		case <-t.C:
		}
		cur, err := c.cfg.Local.LookupVersions([]string{key})
		if !c.leads(epoch) || err == nil && (len(cur) == 0 || cur[0].Version != storage.Version(p.entry.Version)) {
			release()
			return
		}
		c.repl.Extend(p, targets)
		if fallback != nil {
			c.repl.Extend(p, fallback())
		}
	}
}

// standIns lists live members that are neither this node nor an owner of
// key, in ring order, skipping those in except.
func (c *Cluster) standIns(key string, except []string) []string {
	owners := c.Owners(key)
	all, _ := c.cfg.Ring.Owners(key, len(c.members()))
	var out []string
	for _, m := range all {
		if m != c.cfg.Self && !slices.Contains(owners, m) && !slices.Contains(except, m) && !c.down(m) {
			out = append(out, m)
		}
	}
	return out
}

// placement picks the followers a write goes to and how many of them must
// confirm: need for the client's ack level, commitAt before strong reads
// may see it. The leader's own copy counts as one, so a quorum of R copies
// needs ⌊R/2⌋ followers. An owner that is down is replaced by a live
// non-owner (a stand-in holding a hint; repair later brings the owner up to
// date), except for ack=all, which promises the owners themselves.
func (c *Cluster) placement(key string, ack AckLevel) (targets []string, need, commitAt int) {
	owners := c.Owners(key)
	for _, o := range owners {
		if o != c.cfg.Self {
			targets = append(targets, o)
		}
	}
	quorum := len(owners) / 2
	switch ack {
	case AckLeader:
		need = 0
	case AckQuorum:
		need = quorum
	case AckAll:
		need = len(targets)
	}
	down := 0
	for _, t := range targets {
		if c.down(t) {
			down++
		}
	}
	if down > 0 && ack != AckAll {
		stand := c.standIns(key, nil)
		stand = stand[:min(down, len(stand))]
		c.m.standIns.Add(float64(len(stand)))
		targets = append(targets, stand...)
	}
	return targets, need, min(quorum, len(targets))
}

// down reports whether the last call to member id failed.
func (c *Cluster) down(id string) bool { return c.repl.down(id) }

// admit passes a leader's envelope through the fence; a newer term than
// this node's makes it stop writing.
func (c *Cluster) admit(env envelope) error {
	if err := c.fence.Admit(env); err != nil {
		return err
	}
	c.admitted(env)
	return nil
}

// admitted notes a leader's envelope that passed the fence.
func (c *Cluster) admitted(env envelope) {
	if env.Leader != c.cfg.Self {
		c.cfg.Leadership.ObserveEpoch(env.Epoch)
		c.lastContact.Store(int64(max(time.Since(c.born), 1)))
		if env.Repair {
			c.repair.want()
		}
	}
}

// persistFence raises the store's durable fence to epoch (an empty
// replicated batch, ordered behind every commit already queued), so a
// restart cannot lower what this node has promised to refuse.
func (c *Cluster) persistFence(ctx context.Context, epoch uint64) error {
	if c.cfg.Local.FenceEpoch() >= epoch {
		return nil
	}
	_, err := c.cfg.Local.ApplyReplicated(ctx, epoch, nil)
	return err
}

// LastContact is the time since this node last heard from a leader, on
// the monotonic clock (zero on the leader itself; unbounded on a node that
// never heard from one).
func (c *Cluster) LastContact() time.Duration {
	if _, open := c.WriteGate(); open {
		return 0
	}
	last := c.lastContact.Load()
	if last == 0 {
		return time.Duration(1<<63 - 1)
	}
	return time.Since(c.born) - time.Duration(last)
}

// ReadStrong returns key's entry (tombstones included; found is false when
// the key was never written) such that every write acknowledged before the
// call is reflected: on the leader, its committed state; elsewhere, this
// replica's state once it has applied the version the leader's read index
// names.
func (c *Cluster) ReadStrong(ctx context.Context, key string) (storage.Entry, bool, error) {
	return c.ri.strong(ctx, key)
}

// ReadStale returns this replica's entry for key without asking anyone,
// and how long ago this node last heard from a leader.
func (c *Cluster) ReadStale(key string) (storage.Entry, bool, time.Duration, error) {
	e, found, err := c.cfg.Local.Lookup(key)
	return e, found, c.LastContact(), err
}
