package replication

import (
	"context"
	"slices"
	"sync/atomic"
	"time"
)

// repairer is a follower's anti-entropy: it compares the digests of the
// partitions this node owns with the leader's and pulls what the leader
// has newer. This brings a member that was down, paused, or newly made an
// owner up to date, without depending on the leader's in-memory queues.
type repairer struct {
	c *Cluster
	// wanted asks for a pass: set at start, on a member-set change, and
	// when the leader reports dropped entries.
	wanted atomic.Bool
	// last is when a pass last matched the leader, as time since the
	// Cluster's born (monotonic; 0: never).
	last atomic.Int64
}

// want asks for a pass at the next round.
func (r *repairer) want() { r.wanted.Store(true) }

// lastPass is when a pass last completed (zero: never).
func (r *repairer) lastPass() time.Time {
	if t := r.last.Load(); t != 0 {
		return r.c.born.Add(time.Duration(t))
	}
	return time.Time{}
}

// run makes passes until ctx ends. A pass runs when there is a reason:
// this node started, the leader (or its term) changed, the member set
// changed, or the leader said entries for it were dropped; and otherwise
// every AntiEntropyInterval. Not every round: under steady writes the
// digests always differ by the entries in flight, and comparing whole
// partitions that often costs more than the writes.
func (r *repairer) run(ctx context.Context) {
	c := r.c
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
			r.want()
		}
		if r.wanted.Load() || time.Since(lastPass) >= c.cfg.AntiEntropyInterval {
			r.wanted.Store(false)
			err := r.once(ctx)
			switch {
			case err != nil && ctx.Err() == nil:
				r.want() // try again next round
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

// once runs one repair pass against the current leader.
func (r *repairer) once(ctx context.Context) (err error) {
	c := r.c
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
	if err := c.admit(reply.Envelope); err != nil {
		return err
	}
	parts, err := differing(c.cfg.Local.Digests(), reply.Digests, func(p int) bool { return c.isOwner(c.cfg.Self, p) })
	if err != nil {
		return err
	}
	defer func() {
		if err == nil {
			r.last.Store(int64(max(time.Since(c.born), 1)))
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
