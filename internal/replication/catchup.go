package replication

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/statefulkv/store/internal/storage"
)

// termGate holds a new leader's writes and read-index answers shut until
// it has collected every write that earlier terms acknowledged (its
// catch-up), once per term.
type termGate struct {
	c *Cluster
	// caughtUp is the term whose catch-up finished; the gate opens only
	// for it.
	caughtUp atomic.Uint64
	// mu guards catching and the start of the catch-up goroutine (Close
	// holds it while cancelling, so none starts after).
	mu       sync.Mutex
	catching uint64
}

// open reports whether term epoch's catch-up is done, starting it if not.
func (g *termGate) open(epoch uint64) bool {
	if g.caughtUp.Load() == epoch {
		return true
	}
	g.start(epoch)
	return false
}

// start begins term epoch's catch-up unless it is already running.
func (g *termGate) start(epoch uint64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.catching == epoch || g.c.ctx.Err() != nil {
		return
	}
	g.catching = epoch
	g.c.wg.Go(func() { g.run(epoch) })
}

// run collects, before this node's first write of term epoch, every write
// earlier terms acknowledged. An acknowledged write is durable on at least
// two members, so hearing from all members but one finds each of them on
// some member that answered. It retries, with a jittered backoff, until it
// succeeds or the term ends.
func (g *termGate) run(epoch uint64) {
	c := g.c
	start := time.Now()
	backoff := wait.Backoff{Duration: 100 * time.Millisecond, Factor: 2, Jitter: 0.5, Steps: math.MaxInt32, Cap: 2 * time.Second}
	for attempt := 1; c.leads(epoch); attempt++ {
		ctx, cancel := context.WithTimeout(c.ctx, 30*time.Second)
		keys, err := g.once(ctx, epoch)
		cancel()
		if err == nil {
			// Writes of earlier terms that never committed can no longer
			// commit through this node; forget them.
			c.ri.forgetInflight()
			g.caughtUp.Store(epoch)
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
		case <-time.After(backoff.Step()):
		}
	}
	g.mu.Lock()
	if g.catching == epoch {
		g.catching = 0
	}
	g.mu.Unlock()
}

// once is one catch-up attempt: fence the term here and at the members,
// hear from all but one of them, and pull what they hold newer.
func (g *termGate) once(ctx context.Context, epoch uint64) (int, error) {
	c := g.c
	env := envelope{Epoch: epoch, Leader: c.cfg.Self}
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
