package replication

import (
	"context"
	"fmt"
	"time"

	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// HandOff, called by a leader about to let go of the Lease (after its HTTP
// server stopped taking writes), pushes to every reachable member the
// entries of the partitions it owns that differ from this node's. The next
// leader then finds every write this one accepted on the remaining members,
// even a write acknowledged with ack=leader, and even when this node is
// leaving the member set (a scale-down). Members that do not answer are
// skipped: the next leader's catch-up tolerates one missing member.
// Partitions this term has not pulled yet are skipped too: no write of this
// term reached them (writes wait for the pull), so where they differ it is
// what this node lacks, and pushing them would only resend this node's
// older copy, round after round. It returns when the reachable members
// match or ctx ends.
func (c *Cluster) HandOff(ctx context.Context) error { return handOff{c}.run(ctx) }

// handOff is a leaving leader's push of what the members lack.
type handOff struct{ c *Cluster }

func (h handOff) run(ctx context.Context) error {
	c := h.c
	epoch, open := c.WriteGate()
	if !open {
		return nil
	}
	env := envelope{Epoch: epoch, Leader: c.cfg.Self}
	// A member holding a version this node does not know (from a deposed
	// leader) differs after any push; a few rounds settle everything else.
	const rounds = 5
	for round := 1; ; round++ {
		pending := 0
		for _, id := range c.members() {
			if id == c.cfg.Self {
				continue
			}
			n, err := h.pushTo(ctx, id, env)
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
// differs from this node's, a page at a time (a page read from bbolt
// becomes batches bounded by entries and bytes, so memory stays within one
// page whatever the partitions hold), and returns how many partitions
// differed.
func (h handOff) pushTo(ctx context.Context, id string, env envelope) (int, error) {
	c := h.c
	cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	reply, err := c.digestsOf(cctx, id, &env)
	if err != nil {
		return 0, err
	}
	pulled := c.gate.pulled(env.Epoch)
	parts, err := differing(c.cfg.Local.Digests(), reply.Digests, func(p int) bool { return c.isOwner(id, p) && pulled(p) })
	if err != nil || len(parts) == 0 {
		return 0, err
	}
	maxBytes := c.cfg.MaxBatchBytes
	if maxBytes <= 0 {
		maxBytes = DefaultMaxBatchBytes
	}
	const maxEntries = 512
	for after, more := "", true; more; {
		var page []storage.Entry
		if page, more, err = c.cfg.Local.PartitionEntries(parts, after, maxBytes); err != nil {
			return len(parts), err
		}
		if len(page) > 0 {
			after = page[len(page)-1].Key
		}
		for len(page) > 0 {
			batch := transport.Batch{Envelope: env}
			for ; len(page) > 0 && len(batch.Entries) < maxEntries; page = page[1:] {
				batch.Entries = append(batch.Entries, toWire(page[0]))
			}
			_, err := c.cfg.Peers.Replicate(ctx, id, batch)
			c.note(id, err)
			if err != nil {
				return len(parts), err
			}
		}
	}
	return len(parts), nil
}
