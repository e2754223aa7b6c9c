package replication

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

func nowNano() int64 { return time.Now().UnixNano() }

// startCatchUp begins term epoch's catch-up unless it is already running.
func (c *Cluster) startCatchUp(epoch uint64) {
	c.catchMu.Lock()
	defer c.catchMu.Unlock()
	if c.catching == epoch || c.ctx.Err() != nil {
		return
	}
	c.catching = epoch
	c.wg.Go(func() { c.catchUp(epoch) })
}

// catchUp collects, before this node's first write of term epoch, every
// write earlier terms acknowledged. An acknowledged write is durable on at
// least two members, so hearing from all members but one finds each of
// them on some member that answered. It retries until it succeeds or the
// term ends.
func (c *Cluster) catchUp(epoch uint64) {
	start := time.Now()
	backoff := 100 * time.Millisecond
	for attempt := 1; c.leads(epoch); attempt++ {
		ctx, cancel := context.WithTimeout(c.ctx, 30*time.Second)
		keys, err := c.catchUpOnce(ctx, epoch)
		cancel()
		if err == nil {
			// Writes of earlier terms that never committed can no longer
			// commit through this node; forget them.
			c.inflight.Store(newInflightSet())
			c.caughtUp.Store(epoch)
			c.m.catchUp.Observe(time.Since(start).Seconds())
			c.log.Info("caught up; accepting writes", "epoch", epoch, "entries_adopted", keys, "took", time.Since(start).Round(time.Millisecond))
			return
		}
		if errors.Is(err, storage.ErrStaleEpoch) || c.ctx.Err() != nil {
			c.log.Warn("catch-up stopped", "epoch", epoch, "err", err)
			break
		}
		if attempt == 1 || attempt%20 == 0 {
			c.log.Warn("catch-up incomplete; writes wait", "epoch", epoch, "attempt", attempt, "err", err)
		}
		select {
		case <-c.ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
	c.catchMu.Lock()
	if c.catching == epoch {
		c.catching = 0
	}
	c.catchMu.Unlock()
}

func (c *Cluster) catchUpOnce(ctx context.Context, epoch uint64) (int, error) {
	env := Envelope{Epoch: epoch, Leader: c.cfg.Self}
	// This node's own fence holds the term too, in memory and on disk: an
	// older leader's batches, and any write of an older term still queued
	// here, are refused from now on.
	if err := c.fence.Admit(env); err != nil {
		return 0, err
	}
	if err := c.persistFence(ctx, epoch); err != nil {
		return 0, err
	}
	type answer struct {
		id      string
		digests []uint64
		err     error
	}
	var (
		mu      sync.Mutex
		answers []answer
		wg      sync.WaitGroup
	)
	others := slices.DeleteFunc(c.members(), func(id string) bool { return id == c.cfg.Self })
	for _, id := range others {
		wg.Go(func() {
			cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			defer cancel()
			reply, err := c.digestsOf(cctx, id, &env)
			mu.Lock()
			answers = append(answers, answer{id, reply.Digests, err})
			mu.Unlock()
		})
	}
	wg.Wait()
	var heard []answer
	for _, a := range answers {
		if fence, stale := refusedTerm(a.err); stale {
			c.cfg.Leadership.ObserveEpoch(fence)
			return 0, fmt.Errorf("%s: %w: %w", a.id, storage.ErrStaleEpoch, a.err)
		}
		if a.err == nil {
			heard = append(heard, a)
		}
	}
	// Copies live on this node and the others: all of them but one must be
	// heard (this node counts as heard).
	if need := len(others) - 1; len(heard) < need {
		var errs []error
		for _, a := range answers {
			errs = append(errs, a.err)
		}
		return 0, fmt.Errorf("heard from %d other members, need %d (all but one): %w", len(heard), need, errors.Join(errs...))
	}
	adopted := 0
	for _, a := range heard {
		parts, err := differing(c.cfg.Local.Digests(), a.digests, func(int) bool { return true })
		if err != nil {
			return adopted, err
		}
		n, err := c.fetchNewer(ctx, a.id, &env, epoch, parts)
		adopted += n
		if err != nil {
			return adopted, fmt.Errorf("fetch from %s: %w", a.id, err)
		}
	}
	return adopted, nil
}

// heartbeatLoop: the caught-up leader tells every member it is alive, so
// followers' stale reads can state how recent they are, and a member's
// liveness is known before a write depends on it.
func (c *Cluster) heartbeatLoop(ctx context.Context) {
	t := time.NewTicker(c.cfg.HeartbeatInterval)
	defer t.Stop()
	busy := map[string]*sync.Mutex{}
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		epoch, open := c.WriteGate()
		if !open {
			continue
		}
		behind := c.repl.Behind()
		for _, id := range c.members() {
			env := Envelope{Epoch: epoch, Leader: c.cfg.Self, Repair: slices.Contains(behind, id)}
			if busy[id] == nil {
				busy[id] = &sync.Mutex{}
			}
			one := busy[id]
			if id == c.cfg.Self || !one.TryLock() {
				continue // one heartbeat per member at a time
			}
			wg.Go(func() {
				defer one.Unlock()
				hctx, cancel := context.WithTimeout(ctx, 2*time.Second)
				defer cancel()
				_, err := c.cfg.Peers.Replicate(hctx, id, transport.Batch{Envelope: toEnvelope(env)})
				c.note(id, err)
				if err == nil && env.Repair {
					// The follower has been told; its repair pass fetches
					// what its queue dropped.
					c.repl.ClearBehind(id)
				}
				if fence, stale := refusedTerm(err); stale {
					c.cfg.Leadership.ObserveEpoch(fence)
				}
			})
		}
	}
}

// repairLoop: a follower compares the digests of the partitions it owns
// with the leader's and pulls what the leader has newer. This brings a
// member that was down, paused, or newly made an owner up to date, without
// depending on the leader's in-memory queues.
//
// A pass runs when there is a reason: this node started, the leader (or
// its term) changed, the member set changed, or the leader said entries
// for it were dropped; and otherwise every AntiEntropyInterval. Not every
// round: under steady writes the digests always differ by the entries in
// flight, and comparing whole partitions that often costs more than the
// writes.
func (c *Cluster) repairLoop(ctx context.Context) {
	t := time.NewTicker(c.cfg.RepairInterval)
	defer t.Stop()
	var (
		lastLeader string
		lastEpoch  uint64
		lastPass   time.Time
	)
	for {
		leader, epoch := c.cfg.Leadership.Leader()
		if leader != lastLeader || epoch != lastEpoch {
			c.repairWanted.Store(true)
		}
		if c.repairWanted.Load() || time.Since(lastPass) >= c.cfg.AntiEntropyInterval {
			c.repairWanted.Store(false)
			err := c.repairOnce(ctx)
			switch {
			case err != nil && ctx.Err() == nil:
				c.repairWanted.Store(true) // try again next round
				c.log.Debug("repair pass failed", "err", err)
			case err == nil:
				lastLeader, lastEpoch, lastPass = leader, epoch, time.Now()
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// repairOnce runs one repair pass against the current leader.
func (c *Cluster) repairOnce(ctx context.Context) (err error) {
	leader, _ := c.cfg.Leadership.Leader()
	if leader == "" || leader == c.cfg.Self {
		return nil
	}
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	reply, err := c.digestsOf(rctx, leader, nil)
	if err != nil {
		return err
	}
	if err := c.admit(fromEnvelope(reply.Envelope)); err != nil {
		return err
	}
	parts, err := differing(c.cfg.Local.Digests(), reply.Digests, func(p int) bool { return c.isOwner(c.cfg.Self, p) })
	if err != nil {
		return err
	}
	defer func() {
		if err == nil {
			c.lastRepair.Store(nowNano())
		}
	}()
	if len(parts) == 0 {
		return nil
	}
	n, err := c.fetchNewer(rctx, leader, nil, reply.Envelope.Epoch, parts)
	c.m.repairedKeys.Add(float64(n))
	c.m.repairedPartitions.Add(float64(len(parts)))
	if err != nil {
		return err
	}
	if n > 0 {
		c.log.Info("repaired partitions from the leader", "leader", leader, "partitions", len(parts), "entries", n)
	} else {
		// Nothing newer there: the difference was entries still in flight
		// to this node, or versions the leader does not hold (an
		// unacknowledged write of a deposed leader). Harmless.
		c.log.Debug("partitions differ from the leader's but nothing there is newer", "leader", leader, "partitions", len(parts))
	}
	return nil
}

// isOwner reports whether member id owns partition p.
func (c *Cluster) isOwner(id string, p int) bool {
	owners, err := c.cfg.Ring.PartitionOwners(p, c.cfg.ReplicationFactor)
	return err == nil && slices.Contains(owners, id)
}

// leaderRead reads keys on the caught-up leader, each once no write to it is
// in flight, and confirms the term did not end meanwhile.
func (c *Cluster) leaderRead(ctx context.Context, keys []string) (entries []storage.Entry, found []bool, epoch uint64, err error) {
	epoch, open := c.WriteGate()
	if !open {
		return nil, nil, 0, fmt.Errorf("%w: %s is not a caught-up leader", ErrNotCaughtUp, c.cfg.Self)
	}
	ctx, cancel := context.WithTimeout(ctx, c.cfg.ReadTimeout)
	defer cancel()
	set := c.inflight.Load()
	entries, found = make([]storage.Entry, len(keys)), make([]bool, len(keys))
	for i, key := range keys {
		err = set.whenIdle(ctx, key, func() error {
			var lerr error
			entries[i], found[i], lerr = c.cfg.Local.Lookup(key)
			return lerr
		})
		if err != nil {
			return nil, nil, 0, fmt.Errorf("%w: a write to %q stayed in flight: %w", ErrReadTimeout, key, err)
		}
	}
	if e2, open := c.WriteGate(); !open || e2 != epoch {
		return nil, nil, 0, fmt.Errorf("%w: leadership moved during the read", ErrNotCaughtUp)
	}
	return entries, found, epoch, nil
}

// ReadStrong returns key's entry (tombstones included; found is false when
// the key was never written) such that every write acknowledged before the
// call is reflected: on the leader, its committed state; elsewhere, this
// replica's state once it has applied the version the leader's read index
// names.
func (c *Cluster) ReadStrong(ctx context.Context, key string) (storage.Entry, bool, error) {
	if _, open := c.WriteGate(); open {
		es, found, _, err := c.leaderRead(ctx, []string{key})
		if err != nil {
			return storage.Entry{}, false, err
		}
		return es[0], found[0], nil
	}
	ctx, cancel := context.WithTimeout(ctx, c.cfg.ReadTimeout)
	defer cancel()
	for {
		env, version, err := c.readIndex(ctx, key)
		if err != nil {
			return storage.Entry{}, false, err
		}
		if err := c.admit(env); err != nil {
			return storage.Entry{}, false, err
		}
		want := version
		e, found, newer, err := c.awaitVersion(ctx, key, want)
		switch {
		case err != nil:
			return e, false, fmt.Errorf("%w (read index %s from %s)", err, version, env.Leader)
		case !newer:
			return e, found, nil
		case e.Version.Epoch != env.Epoch:
			// An older term's version the leader never adopted: an
			// unacknowledged write of a deposed leader.
			return e, false, fmt.Errorf("%w: %q is at %s here, the leader has %s", ErrDiverged, key, e.Version, version)
		}
		// A newer write of this leader reached this replica after the read
		// index (entries leave before the leader's own fsync): ask again;
		// the leader answers once that write has committed.
	}
}

// awaitVersion waits until this replica holds key at version want (zero:
// absent) and returns the entry, or reports newer when it holds a version
// past want.
func (c *Cluster) awaitVersion(ctx context.Context, key string, want storage.Version) (e storage.Entry, found, newer bool, err error) {
	for {
		changed := c.cfg.Local.Changed()
		e, found, err = c.cfg.Local.Lookup(key)
		switch {
		case err != nil:
			return e, false, false, err
		case !found && want.IsZero(), found && e.Version == want:
			return e, found, false, nil
		case found && want.Less(e.Version):
			return e, true, true, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return e, false, false, fmt.Errorf("%w: this replica has not applied %s of %q yet", ErrReadTimeout, want, key)
		}
	}
}

// indexWait is one strong read waiting for its key's committed version.
type indexWait struct {
	key     string
	env     Envelope
	version storage.Version // zero: the leader holds none
	err     error
	done    chan struct{}
}

// readIndex asks the leader for key's committed version. Reads that arrive
// while a request is in flight wait for the next one, which carries all of
// their keys: the read index is always taken after the read started, and a
// burst of strong reads costs one round trip instead of one each.
func (c *Cluster) readIndex(ctx context.Context, key string) (Envelope, storage.Version, error) {
	w := &indexWait{key: key, done: make(chan struct{})}
	c.riMu.Lock()
	if c.ctx.Err() != nil {
		c.riMu.Unlock()
		return Envelope{}, storage.Version{}, fmt.Errorf("%w: shutting down", ErrReadTimeout)
	}
	c.riQueue = append(c.riQueue, w)
	if !c.riBusy {
		c.riBusy = true
		c.wg.Go(c.sendReadIndexes)
	}
	c.riMu.Unlock()
	select {
	case <-w.done:
		return w.env, w.version, w.err
	case <-ctx.Done():
		return Envelope{}, storage.Version{}, fmt.Errorf("%w: no read index from the leader: %w", ErrReadTimeout, ctx.Err())
	}
}

// sendReadIndexes sends the queued keys, one request at a time, until the
// queue is empty.
func (c *Cluster) sendReadIndexes() {
	for {
		c.riMu.Lock()
		batch := c.riQueue
		c.riQueue = nil
		if len(batch) == 0 {
			c.riBusy = false
			c.riMu.Unlock()
			return
		}
		c.riMu.Unlock()
		keys := make([]string, len(batch))
		for i, w := range batch {
			keys[i] = w.key
		}
		var reply transport.ReadIndexReply
		err := ErrNoLeader
		if leader, _ := c.cfg.Leadership.Leader(); leader != "" && leader != c.cfg.Self {
			ctx, cancel := context.WithTimeout(c.ctx, c.cfg.ReadTimeout)
			reply, err = c.cfg.Peers.ReadIndex(ctx, leader, transport.ReadIndex{Keys: keys})
			c.note(leader, err)
			cancel()
			if err == nil && len(reply.Versions) != len(keys) {
				err = fmt.Errorf("read index from %s: %d versions for %d keys", leader, len(reply.Versions), len(keys))
			}
			if err != nil {
				err = fmt.Errorf("read index from %s: %w", leader, err)
			}
		}
		c.m.readIndexBatch.Observe(float64(len(keys)))
		for i, w := range batch {
			if w.err = err; err == nil {
				w.env, w.version = fromEnvelope(reply.Envelope), storage.Version(reply.Versions[i])
			}
			close(w.done)
		}
	}
}

// ReadStale returns this replica's entry for key without asking anyone,
// and how long ago this node last heard from a leader.
func (c *Cluster) ReadStale(key string) (storage.Entry, bool, time.Duration, error) {
	e, found, err := c.cfg.Local.Lookup(key)
	return e, found, c.LastContact(), err
}

// HandOff, called by a leader about to let go of the Lease (after its HTTP
// server stopped taking writes), pushes to every reachable member the
// entries of the partitions it owns that differ from this node's. The next
// leader then finds every write this one accepted on the remaining members,
// even a write acknowledged with ack=leader, and even when this node is
// leaving the member set (a scale-down). Members that do not answer are
// skipped: the next leader's catch-up tolerates one missing member. It
// returns when the reachable members match or ctx ends.
func (c *Cluster) HandOff(ctx context.Context) error {
	epoch, open := c.WriteGate()
	if !open {
		return nil
	}
	env := Envelope{Epoch: epoch, Leader: c.cfg.Self}
	// A member holding a version this node does not know (from a deposed
	// leader) differs after any push; a few rounds settle everything else.
	const rounds = 5
	for round := 1; ; round++ {
		pending := 0
		for _, id := range c.members() {
			if id == c.cfg.Self {
				continue
			}
			n, err := c.pushTo(ctx, id, env)
			if err != nil {
				c.log.Warn("hand-off: member skipped", "member", id, "err", err)
				continue
			}
			pending += n
		}
		if pending == 0 {
			return nil
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("hand-off: %d partitions still differ: %w", pending, err)
		}
		if round == rounds {
			return fmt.Errorf("hand-off: %d partitions still differ after %d rounds", pending, round)
		}
		c.log.Info("hand-off: pushed partitions to members", "round", round, "partitions", pending)
	}
}

// pushTo sends member id the entries of the partitions it owns whose digest
// differs from this node's, in batches bounded by entries and bytes, and
// returns how many partitions differed.
func (c *Cluster) pushTo(ctx context.Context, id string, env Envelope) (int, error) {
	cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	reply, err := c.digestsOf(cctx, id, &env)
	if err != nil {
		return 0, err
	}
	parts, err := differing(c.cfg.Local.Digests(), reply.Digests, func(p int) bool { return c.isOwner(id, p) })
	if err != nil || len(parts) == 0 {
		return 0, err
	}
	entries, err := c.cfg.Local.PartitionEntries(parts)
	if err != nil {
		return 0, err
	}
	maxBytes := c.cfg.MaxBatchBytes
	if maxBytes <= 0 {
		maxBytes = DefaultMaxBatchBytes
	}
	const maxEntries = 512
	for len(entries) > 0 {
		batch := transport.Batch{Envelope: toEnvelope(env)}
		for size := 0; len(entries) > 0 && len(batch.Entries) < maxEntries; entries = entries[1:] {
			w := toWire(entries[0])
			if len(batch.Entries) > 0 && size+w.Size() > maxBytes {
				break
			}
			size += w.Size()
			batch.Entries = append(batch.Entries, w)
		}
		_, err := c.cfg.Peers.Replicate(ctx, id, batch)
		c.note(id, err)
		if err != nil {
			return len(parts), err
		}
	}
	return len(parts), nil
}
