package replication

import (
	"cmp"
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

// termGate holds a new leader's writes and read-index answers until it has
// collected every write that earlier terms acknowledged (its catch-up),
// once per term, partition by partition.
//
// Catch-up has two steps. The first, fencing the term at the members and
// hearing every member's partition digests but one, is small whatever the
// size of the store: it opens the gate (WriteGate). The second pulls, for
// each partition whose digest differs at some member heard, the keys that
// member holds newer. It runs in the background, in partition order, and a
// write or strong read of a partition not yet pulled pulls that partition
// first (await) instead of waiting for the rest; listings and collection,
// which span every partition, wait for all of it (awaitAll). So the first
// write after a crash failover waits for one partition, not for the store.
type termGate struct {
	c *Cluster
	// fenced is the term whose first step finished: the gate is open for
	// it. caughtUp is the term whose every partition is pulled.
	fenced, caughtUp atomic.Uint64
	// progress is the fenced term's per-partition state.
	progress atomic.Pointer[termProgress]
	// mu guards catching and the start of the catch-up goroutine (Close
	// holds it while cancelling, so none starts after).
	mu       sync.Mutex
	catching uint64
}

// termProgress is one term's catch-up: which partitions are pulled, which
// are being pulled, and the plan that says where to pull the rest from.
type termProgress struct {
	epoch uint64
	// all is closed once every partition is pulled.
	all chan struct{}
	mu  sync.Mutex
	// plan is the latest fence round's answer; a failed pull replaces it.
	plan    *catchUpPlan
	ready   []bool
	pending int
	// pulling holds the pulls under way, by partition.
	pulling map[int]*pullState
}

// pullState is one pull of a partition: done is closed when it ends, with
// err set.
type pullState struct {
	done chan struct{}
	err  error
}

// catchUpPlan is one fence round: the term's envelope and, per partition,
// the members heard whose digest differed from this node's.
type catchUpPlan struct {
	env     envelope
	sources [][]string
}

// open reports whether term epoch's first step is done, starting the
// catch-up if not.
func (g *termGate) open(epoch uint64) bool {
	if g.fenced.Load() == epoch {
		if g.caughtUp.Load() != epoch {
			// The background stops when the elector's gate closes; the
			// gate can open again in the same term (a renewal that landed
			// late), and the partitions left must still be pulled.
			g.start(epoch)
		}
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

// await returns once key's partition holds every write earlier terms
// acknowledged, pulling it now if the background has not yet, or fails
// with ErrNotCaughtUp (nothing applied: the caller may retry) when the
// pull fails, ctx ends or the term is not this node's.
func (g *termGate) await(ctx context.Context, epoch uint64, key string) error {
	if epoch != 0 && g.caughtUp.Load() == epoch {
		return nil
	}
	tp := g.progress.Load()
	if tp == nil || tp.epoch != epoch {
		return fmt.Errorf("%w: %s has not fenced term %d", ErrNotCaughtUp, g.c.cfg.Self, epoch)
	}
	if err := g.pull(ctx, tp, g.c.cfg.Ring.Partition(key)); err != nil {
		// %v, not %w: a deadline met while pulling is not an unknown
		// outcome; nothing was applied.
		return fmt.Errorf("%w: pulling the partition of %q from earlier terms: %v", ErrNotCaughtUp, key, err)
	}
	return nil
}

// awaitAll returns once every partition of term epoch is pulled, or fails
// with ErrNotCaughtUp when ctx ends first or the term is not this node's.
func (g *termGate) awaitAll(ctx context.Context, epoch uint64) error {
	if epoch != 0 && g.caughtUp.Load() == epoch {
		return nil
	}
	tp := g.progress.Load()
	if tp == nil || tp.epoch != epoch {
		return fmt.Errorf("%w: %s has not fenced term %d", ErrNotCaughtUp, g.c.cfg.Self, epoch)
	}
	select {
	case <-tp.all:
		return nil
	case <-g.c.ctx.Done():
		return fmt.Errorf("%w: shutting down while pulling %d partitions from earlier terms", ErrNotCaughtUp, tp.left())
	case <-ctx.Done():
		return fmt.Errorf("%w: still pulling %d partitions from earlier terms: %v", ErrNotCaughtUp, tp.left(), ctx.Err())
	}
}

// pull brings partition p level with the members of the current plan that
// differ on it, unless it is already, starting a pull or joining the one
// under way. The pull runs on the cluster's context with its own deadline,
// not on the caller's: a caller that gives up (a client's short deadline)
// does not abort it for the others waiting, and Close stops it.
func (g *termGate) pull(ctx context.Context, tp *termProgress, p int) error {
	tp.mu.Lock()
	if tp.ready[p] {
		tp.mu.Unlock()
		return nil
	}
	st, busy := tp.pulling[p]
	if !busy {
		st = &pullState{done: make(chan struct{})}
		if !g.c.spawn(func() { g.runPull(tp, p, st) }) {
			tp.mu.Unlock()
			return fmt.Errorf("%w: shutting down", ErrNotCaughtUp)
		}
		tp.pulling[p] = st
	}
	tp.mu.Unlock()
	select {
	case <-st.done:
		return st.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// runPull is one pull of partition p under the current plan.
func (g *termGate) runPull(tp *termProgress, p int, st *pullState) {
	ctx, cancel := context.WithTimeout(g.c.ctx, 30*time.Second)
	defer cancel()
	tp.mu.Lock()
	plan := tp.plan
	tp.mu.Unlock()
	n, err := g.pullFrom(ctx, plan, p)
	g.c.m.catchUpKeys.Add(float64(n))
	tp.mu.Lock()
	defer tp.mu.Unlock()
	delete(tp.pulling, p)
	if err == nil {
		tp.markReady(p)
	}
	st.err = err
	close(st.done)
}

// pullFrom pulls what each source of partition p in plan holds newer. A
// plan's sources are all members heard but one, so every acknowledged
// write of p is on this node or on a source.
func (g *termGate) pullFrom(ctx context.Context, plan *catchUpPlan, p int) (int, error) {
	adopted := 0
	for _, id := range plan.sources[p] {
		n, err := g.c.fetchNewer(ctx, id, &plan.env, plan.env.Epoch, []int{p})
		adopted += n
		if err != nil {
			return adopted, fmt.Errorf("pull partition %d from %s: %w", p, id, err)
		}
	}
	return adopted, nil
}

// markReady records partition p as pulled; tp.mu is held.
func (tp *termProgress) markReady(p int) {
	if tp.ready[p] {
		return
	}
	tp.ready[p] = true
	if tp.pending--; tp.pending == 0 {
		close(tp.all)
	}
}

// pulled returns whether a partition holds, in term epoch, every write of
// earlier terms (all of them once the term is caught up).
func (g *termGate) pulled(epoch uint64) func(p int) bool {
	tp := g.progress.Load()
	if g.caughtUp.Load() == epoch || tp == nil || tp.epoch != epoch {
		return func(int) bool { return true }
	}
	return func(p int) bool {
		tp.mu.Lock()
		defer tp.mu.Unlock()
		return tp.ready[p]
	}
}

// left counts the partitions not yet pulled.
func (tp *termProgress) left() int {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	return tp.pending
}

// run collects, for term epoch, every write earlier terms acknowledged. An
// acknowledged write is durable on at least two members, so hearing from
// all members but one finds each of them on some member that answered. A
// failed fence round or pull is retried, with a jittered backoff and a new
// fence round for the partitions still to pull, until it succeeds or the
// term ends.
func (g *termGate) run(epoch uint64) {
	c := g.c
	start := time.Now()
	backoff := wait.Backoff{Duration: 100 * time.Millisecond, Factor: 2, Jitter: 0.5, Steps: math.MaxInt32, Cap: 2 * time.Second}
	// A run restarted in the same term (see open) continues its progress:
	// a new one would strand the waiters on the old one, and forgetting
	// the in-flight keys again would drop this term's own writes.
	var tp *termProgress
	if cur := g.progress.Load(); cur != nil && cur.epoch == epoch {
		tp = cur
	}
	for attempt := 1; c.leads(epoch); attempt++ {
		err := g.once(epoch, &tp, start)
		if err == nil {
			g.caughtUp.Store(epoch)
			c.m.catchUp.Observe(time.Since(start).Seconds())
			c.log.Info("caught up every partition", "epoch", epoch, "took", time.Since(start).Round(time.Millisecond))
			break
		}
		if errors.Is(err, storage.ErrStaleEpoch) || c.ctx.Err() != nil {
			c.log.Warn("catch-up stopped", "epoch", epoch, "err", err)
			break
		}
		if attempt == 1 || attempt%20 == 0 {
			c.log.Warn("catch-up incomplete; retrying", "epoch", epoch, "attempt", attempt, "writes_open", tp != nil, "err", err)
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

// once is one catch-up attempt: a fence round for the partitions not yet
// pulled, the gate opened after the first, then a pull of each of them.
func (g *termGate) once(epoch uint64, tp **termProgress, start time.Time) error {
	c := g.c
	fctx, cancel := context.WithTimeout(c.ctx, 30*time.Second)
	plan, err := g.fence(fctx, epoch)
	cancel()
	if err != nil {
		return err
	}
	if *tp == nil {
		*tp = newTermProgress(epoch, plan)
		// Writes of earlier terms that never committed can no longer
		// commit through this node (the fence refuses them); forget them.
		c.ri.forgetInflight()
		g.progress.Store(*tp)
		g.fenced.Store(epoch)
		c.m.writeGate.Observe(time.Since(start).Seconds())
		c.log.Info("fenced the term; accepting writes while the rest catches up", "epoch", epoch,
			"partitions_to_pull", (*tp).left(), "took", time.Since(start).Round(time.Millisecond))
	} else {
		(*tp).replan(plan)
	}
	// Each pull has its own deadline (runPull): the whole store may take
	// longer than any one bound, and a pass that fails keeps what it pulled.
	for p := range c.cfg.Ring.PartitionCount() {
		if !c.leads(epoch) {
			return fmt.Errorf("term %d ended with %d partitions left to pull", epoch, (*tp).left())
		}
		if err := g.pull(c.ctx, *tp, p); err != nil {
			return err
		}
	}
	return nil
}

func newTermProgress(epoch uint64, plan *catchUpPlan) *termProgress {
	tp := &termProgress{epoch: epoch, all: make(chan struct{}), plan: plan, ready: make([]bool, len(plan.sources)), pending: len(plan.sources), pulling: map[int]*pullState{}}
	for p, from := range plan.sources {
		if len(from) == 0 {
			tp.markReady(p)
		}
	}
	if tp.pending == 0 {
		// No partitions at all (markReady never ran): nothing to wait for.
		select {
		case <-tp.all:
		default:
			close(tp.all)
		}
	}
	return tp
}

// replan adopts a newer fence round's plan for the partitions not yet
// pulled. A pulled partition stays pulled: it already holds every write
// earlier terms acknowledged, and later ones come through this leader.
func (tp *termProgress) replan(plan *catchUpPlan) {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	tp.plan = plan
	for p, from := range plan.sources {
		if len(from) == 0 {
			tp.markReady(p)
		}
	}
}

// fence holds the term here and at the members, hears from all members but
// one, and returns which of them differ from this node on each partition.
func (g *termGate) fence(ctx context.Context, epoch uint64) (*catchUpPlan, error) {
	c := g.c
	env := envelope{Epoch: epoch, Leader: c.cfg.Self}
	// This node's own fence holds the term too, in memory and on disk: an
	// older leader's batches, and any write of an older term still queued
	// here, are refused from now on. So the partitions not yet pulled
	// change no more here, and the digests compared below stay true.
	if err := c.fence.Admit(env); err != nil {
		return nil, err
	}
	if err := c.persistFence(ctx, epoch); err != nil {
		return nil, err
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
			return nil, fmt.Errorf("%s: %w: %w", a.id, storage.ErrStaleEpoch, a.err)
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
		return nil, fmt.Errorf("heard from %d other members, need %d (all but one): %w", len(heard), need, errors.Join(errs...))
	}
	mine := c.cfg.Local.Digests()
	plan := &catchUpPlan{env: env, sources: make([][]string, len(mine))}
	slices.SortFunc(heard, func(a, b answer) int { return cmp.Compare(a.id, b.id) })
	for _, a := range heard {
		parts, err := differing(mine, a.digests, func(int) bool { return true })
		if err != nil {
			return nil, err
		}
		for _, p := range parts {
			plan.sources[p] = append(plan.sources[p], a.id)
		}
	}
	return plan, nil
}
