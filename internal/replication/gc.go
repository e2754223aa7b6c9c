package replication

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// collectPageBytes bounds the keys one collection step handles.
const collectPageBytes = 1 << 20

// collector is the leader's collection of what no replica needs any more:
// tombstones older than TombstoneTTL, and copies that members which no
// longer own a partition still hold (after a scale, or a stand-in's).
// DESIGN.md ("Collection") carries the argument for why nothing collected
// can come back; in short, a partition is collected only when every member
// answered, every owner holds exactly the leader's versions of it, every
// other member holds nothing of it, and nothing older is still queued.
type collector struct {
	c *Cluster

	// horizon says which versions are at least the TTL old.
	horizon *storage.SeqHorizon

	mu sync.Mutex
	// after is where the scan for tombstones resumes.
	after string
}

// run samples the seq and, while this node leads, collects every
// interval, until ctx ends.
func (g *collector) run(ctx context.Context) {
	c := g.c
	// Sampling has its own loop: a round can wait a long time for a
	// member that is down, and the horizon must keep moving meanwhile.
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		t := time.NewTicker(c.cfg.CollectInterval)
		defer t.Stop()
		for {
			g.sample()
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	})
	t := time.NewTicker(c.cfg.CollectInterval)
	defer t.Stop()
	for {
		// Collection compares every partition with the leader's copy:
		// only once all of them are caught up.
		if epoch, open := c.WriteGate(); open && c.gate.caughtUp.Load() == epoch {
			cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			if err := g.once(cctx, epoch); err != nil && ctx.Err() == nil {
				c.log.Debug("collection blocked", "err", err)
			}
			cancel()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// sample notes this node's highest seq now.
func (g *collector) sample() { g.horizon.Sample(g.c.cfg.Local.LastSeq()) }

// errMemberDown ends a collection round early: a member the leader knows
// to be down may hold anything (rule 3 of DESIGN.md's "Collection").
var errMemberDown = errors.New("a member is down")

// once is one collection round in term epoch. A round with nothing old
// enough to look at is not counted; every other ends complete or blocked.
func (g *collector) once(ctx context.Context, epoch uint64) (err error) {
	c := g.c
	h := g.horizon.Seq()
	if h == 0 {
		return nil
	}
	defer func() {
		outcome := "complete"
		if err != nil {
			outcome = "blocked"
		}
		c.m.collectRounds.WithLabelValues(outcome).Inc()
	}()
	// Such a member would fail the digests call below anyway, but only
	// after the barrier had waited for its queue (which holds until it
	// returns) until the round timed out: the operator would see nothing
	// for 30 s a round. Say so at once instead.
	for _, id := range c.members() {
		if id != c.cfg.Self && c.down(id) {
			return fmt.Errorf("%w: %s", errMemberDown, id)
		}
	}
	g.mu.Lock()
	after := g.after
	g.mu.Unlock()
	tombs, more, err := c.cfg.Local.TombstonesUpTo(h, after, collectPageBytes)
	if err != nil {
		return err
	}
	env := envelope{Epoch: epoch, Leader: c.cfg.Self}
	// Nothing queued before this point may land after the check below.
	if err := c.repl.barrier(ctx); err != nil {
		return err
	}
	settled, digests, err := g.settled(ctx, env)
	if err != nil {
		return err
	}
	var collect []storage.Entry
	for _, e := range tombs {
		if settled[c.cfg.Ring.Partition(e.Key)] {
			collect = append(collect, e)
		}
	}
	if err := g.forgetEverywhere(ctx, env, collect); err != nil {
		return err
	}
	next := ""
	if more && len(tombs) > 0 {
		next = tombs[len(tombs)-1].Key
	}
	g.mu.Lock()
	g.after = next
	g.mu.Unlock()
	if len(collect) > 0 {
		c.m.tombstonesCollected.Add(float64(len(collect)))
		c.log.Info("collected tombstones", "tombstones", len(collect), "horizon_seq", h)
	}
	return g.dropMoved(ctx, env, h, settled, digests)
}

// settled asks every member for its digests, under the envelope (which
// fences older leaders out at each of them), and returns the partitions
// whose copies all equal this node's: every owner at this node's digest,
// every other member holding nothing of it. Every member must answer: one
// that does not may hold anything.
func (g *collector) settled(ctx context.Context, env envelope) ([]bool, map[string][]uint64, error) {
	c := g.c
	digests := map[string][]uint64{}
	for _, id := range c.members() {
		if id == c.cfg.Self {
			continue
		}
		dctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		reply, err := c.digestsOf(dctx, id, &env)
		cancel()
		if fence, stale := refusedTerm(err); stale {
			c.cfg.Leadership.ObserveEpoch(fence)
		}
		if err != nil {
			return nil, nil, fmt.Errorf("%s did not answer: %w", id, err)
		}
		digests[id] = reply.Digests
	}
	mine := c.cfg.Local.Digests()
	settled := make([]bool, len(mine))
	for p := range mine {
		settled[p] = true
		for id, d := range digests {
			if len(d) != len(mine) {
				return nil, nil, fmt.Errorf("%w: %s has %d partitions, this node %d", ErrInvalidRing, id, len(d), len(mine))
			}
			want := uint64(0)
			if c.isOwner(id, p) {
				want = mine[p]
			}
			if d[p] != want {
				settled[p] = false
				break
			}
		}
	}
	return settled, digests, nil
}

// forgetEverywhere has every other member, then this node, forget the
// entries. This node goes last: if a member fails, the leader still holds
// them and repair brings them back to whoever forgot, to be collected
// again in a later round.
func (g *collector) forgetEverywhere(ctx context.Context, env envelope, entries []storage.Entry) error {
	c := g.c
	if len(entries) == 0 {
		return nil
	}
	for _, id := range c.members() {
		if id == c.cfg.Self {
			continue
		}
		if err := g.forgetAt(ctx, id, env, entries); err != nil {
			return err
		}
	}
	_, err := c.cfg.Local.Forget(ctx, env.Epoch, entries)
	return err
}

// forgetAt sends member id one Forget call for entries (keys and versions
// only, at most a page of them).
func (g *collector) forgetAt(ctx context.Context, id string, env envelope, entries []storage.Entry) error {
	c := g.c
	b := transport.Batch{Envelope: env, Entries: make([]transport.Entry, len(entries))}
	for i, e := range entries {
		b.Entries[i] = transport.Entry{Key: e.Key, Version: transport.Version(e.Version), Deleted: e.Deleted}
	}
	_, err := c.cfg.Peers.Forget(ctx, id, b)
	c.note(id, err)
	if err != nil {
		return fmt.Errorf("forget at %s: %w", id, err)
	}
	return nil
}

// dropMoved has each member that is not an owner of a settled partition,
// yet holds some of it, forget what it holds there at or below the horizon
// (newer entries may be stand-in copies a write still counts on; a later
// round takes them).
func (g *collector) dropMoved(ctx context.Context, env envelope, h uint64, settled []bool, digests map[string][]uint64) error {
	c := g.c
	var errs []error
	mine := c.cfg.Local.Digests() // one copy for the round, not one per partition
	for id, d := range digests {
		var parts []int
		for p := range settled {
			// Owners match this node in a settled partition; a non-owner
			// holding anything makes it unsettled. So look at the
			// partitions every owner matches, which a non-owner spoils.
			if !c.isOwner(id, p) && d[p] != 0 && g.ownersMatch(p, mine, digests) {
				parts = append(parts, p)
			}
		}
		if len(parts) == 0 {
			continue
		}
		n, err := g.dropAt(ctx, id, env, h, parts)
		if err != nil {
			errs = append(errs, err)
		}
		if n > 0 {
			c.m.movedDropped.Add(float64(n))
			c.log.Info("a member dropped copies it no longer owns", "member", id, "partitions", len(parts), "entries", n)
		}
	}
	return errors.Join(errs...)
}

// ownersMatch reports whether every other owner of p holds it at this
// node's digest (mine).
func (g *collector) ownersMatch(p int, mine []uint64, digests map[string][]uint64) bool {
	c := g.c
	owners, err := c.cfg.Ring.PartitionOwners(p, c.cfg.ReplicationFactor)
	if err != nil {
		return false
	}
	for _, o := range owners {
		if o == c.cfg.Self {
			continue
		}
		if d, ok := digests[o]; !ok || d[p] != mine[p] {
			return false
		}
	}
	return true
}

// dropAt lists member id's versions of parts a page at a time and has it
// forget those at or below the horizon.
func (g *collector) dropAt(ctx context.Context, id string, env envelope, h uint64, parts []int) (int, error) {
	c := g.c
	list := transport.Sync{HasEnvelope: true, Envelope: env, Partitions: parts, VersionsOnly: true}
	dropped := 0
	for {
		page, err := c.cfg.Peers.Entries(ctx, id, list)
		c.note(id, err)
		if err != nil {
			return dropped, err
		}
		var drop []storage.Entry
		for _, w := range page.Entries {
			if w.Version.Seq <= h {
				drop = append(drop, storage.Entry{Key: w.Key, Version: storage.Version(w.Version), Deleted: w.Deleted})
			}
		}
		// The page is at most a page of keys and versions, so one call
		// carries it.
		if len(drop) > 0 {
			if err := g.forgetAt(ctx, id, env, drop); err != nil {
				return dropped, err
			}
			dropped += len(drop)
		}
		if !page.More || len(page.Entries) == 0 {
			return dropped, nil
		}
		list.After = page.Entries[len(page.Entries)-1].Key
	}
}
