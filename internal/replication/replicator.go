package replication

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// ErrAckTimeout means the promised number of copies did not confirm in
// time. The entry stays queued and will still be delivered: the write's
// outcome is unknown to the client, not lost.
var ErrAckTimeout = errors.New("replicas did not confirm in time")

// replicatorConfig configures a replicator.
type replicatorConfig struct {
	// Self is this node's identity; it is never sent to itself.
	Self string
	// Peers carries the batches. Required.
	Peers Peers
	// OnStaleEpoch is called when a follower refuses a batch because it has
	// admitted a newer term (fence): the leader must step down.
	OnStaleEpoch func(fence uint64)
	// Active reports whether this node still leads term epoch. A batch is
	// sent only while it does: once the write gate has closed, a successor
	// may be catching up, and an entry delivered after that could surface
	// on a replica the successor never asked. Nil means always active.
	Active func(epoch uint64) bool
	// MaxBatch caps entries per batch. Default 512.
	MaxBatch int
	// MaxBatchBytes caps a batch's size; a batch always holds at least one
	// entry, so a value of any allowed size replicates. Default
	// DefaultMaxBatchBytes.
	MaxBatchBytes int
	// QueueLen caps entries waiting for one follower; past it the follower
	// is marked behind and must be repaired. Default 65536.
	QueueLen int
	// QueueBytes caps the bytes of the entries waiting for one follower
	// (an entry is always admitted to an empty queue); past it, as past
	// QueueLen, the follower is served by repair from the leader's disk
	// instead of from memory. Default DefaultQueueBytes.
	QueueBytes int64
	// Logger. Default slog.Default().
	Logger *slog.Logger
}

// DefaultQueueBytes is the default replicatorConfig.QueueBytes: with the
// default batch size it holds several batches, so a follower that pauses
// for a moment catches up from memory, while a leader's queues stay a small
// part of a 512 MiB pod.
const DefaultQueueBytes = 32 << 20

// DefaultMaxBatchBytes is the default replicatorConfig.MaxBatchBytes, a
// page (transport.PageBytes): a follower accepts a call of this size plus
// one value of the largest allowed size (transport.MaxMessageBytes).
const DefaultMaxBatchBytes = transport.PageBytes

// replicator sends the leader's writes to their owners: one sender per
// follower drains a queue in order and ships batches, so concurrent writes
// share round trips and fsyncs.
//
// Safe for concurrent use. Close stops the senders.
type replicator struct {
	cfg    replicatorConfig
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu    sync.Mutex
	peers map[string]*peer
}

// newReplicator returns a replicator with no senders yet; they start on the
// first entry for each follower.
func newReplicator(cfg replicatorConfig) (*replicator, error) {
	if cfg.Peers == nil {
		return nil, errors.New("replication: replicatorConfig.Peers is required")
	}
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = 512
	}
	if cfg.MaxBatchBytes <= 0 {
		cfg.MaxBatchBytes = DefaultMaxBatchBytes
	}
	if cfg.QueueLen <= 0 {
		cfg.QueueLen = 1 << 16
	}
	if cfg.QueueBytes <= 0 {
		cfg.QueueBytes = DefaultQueueBytes
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &replicator{cfg: cfg, log: cfg.Logger.With("component", "replication"), ctx: ctx, cancel: cancel, peers: map[string]*peer{}}, nil
}

// Close stops every sender; entries still queued are dropped (repair brings
// their followers up to date later). Replicate fails after Close.
func (r *replicator) Close() {
	r.mu.Lock() // no sender starts once cancelled (see peer)
	r.cancel()
	r.mu.Unlock()
	r.wg.Wait()
}

// ErrTermEnded means this node stopped leading the entry's term before
// enough followers confirmed it. The entry is durable on this node only as
// far as it knows; the next leader's catch-up decides whether it counts.
var ErrTermEnded = errors.New("leadership term ended before replication")

// pending is one entry on its way to several followers.
type pending struct {
	epoch    uint64
	entry    transport.Entry
	need     int32
	commitAt int32
	onCommit func()
	acks     atomic.Int32
	done     chan struct{} // closed when acks reach need
	stale    chan struct{} // closed when a follower refused the term
	ended    chan struct{} // closed when the term ended or the replicator closed first
	endErr   error         // why ended closed; set before it closes
	once     sync.Once
	cOnce    sync.Once
	sOnce    sync.Once
	eOnce    sync.Once

	mu   sync.Mutex
	sent map[string]bool // followers it was queued for
}

func (p *pending) ack() {
	n := p.acks.Add(1)
	if n == p.need {
		p.once.Do(func() { close(p.done) })
	}
	if n == p.commitAt {
		p.commit()
	}
}

func (p *pending) commit() {
	if p.onCommit != nil {
		p.cOnce.Do(p.onCommit)
	}
}

func (p *pending) refuse() { p.sOnce.Do(func() { close(p.stale) }) }
func (p *pending) end(err error) {
	p.eOnce.Do(func() { p.endErr = err; close(p.ended) })
}

var errReplicatorClosed = fmt.Errorf("%w: replicator closed", ErrAckTimeout)

// Replicate sends e, written by the leader in term epoch, to every follower
// in to, and returns once need of them have made it durable (need 0 returns
// at once). It returns an error wrapping ErrAckTimeout if ctx ends first and
// storage.ErrStaleEpoch if a follower has admitted a newer term.
func (r *replicator) Replicate(ctx context.Context, epoch uint64, e storage.Entry, to []string, need int) error {
	p, _, err := r.Submit(epoch, e, to, nil, need, need, nil)
	if err != nil {
		return err
	}
	return p.Wait(ctx)
}

// Submit queues e for every follower in to (this node and duplicates are
// skipped) and returns at once. Wait blocks until need followers have made
// it durable; onCommit, if set, runs once (on a sender goroutine) when
// commitAt of them have, even if nobody waits any more. When fewer than
// need of to can take the entry now (a queue is full: a follower that
// stopped answering but is not known down yet), members of fallback take
// it in their place, in order, as many as are missing; standIns says how
// many did. It fails with ErrAckTimeout when fewer than need followers in
// all can take the entry now; p is then still queued where it could be,
// and the caller may Extend it later.
func (r *replicator) Submit(epoch uint64, e storage.Entry, to []string, fallback func() []string, need, commitAt int, onCommit func()) (p *pending, standIns int, err error) {
	p = &pending{
		epoch: epoch, entry: toWire(e), need: int32(need), commitAt: int32(commitAt), onCommit: onCommit,
		done: make(chan struct{}), stale: make(chan struct{}), ended: make(chan struct{}),
	}
	if need <= 0 {
		p.once.Do(func() { close(p.done) })
	}
	if commitAt <= 0 {
		p.commit()
	}
	sent := r.Extend(p, to)
	if sent < need && fallback != nil {
		owners := sent
		for _, id := range fallback() {
			if sent >= need {
				break
			}
			sent = r.Extend(p, []string{id})
		}
		standIns = sent - owners
	}
	if sent < need {
		return p, standIns, fmt.Errorf("%w: %d of %d followers can take the entry now", ErrAckTimeout, sent, need)
	}
	return p, standIns, nil
}

// Extend queues p for more followers (stand-ins for owners that do not
// answer); their confirmations count like the others'. Followers p was
// already queued for, and this node, are skipped. It returns how many
// followers p is queued for in all.
func (r *replicator) Extend(p *pending, to []string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.sent == nil {
		p.sent = map[string]bool{}
	}
	for _, id := range to {
		if id == r.cfg.Self || p.sent[id] { // a duplicate must not count twice
			continue
		}
		if pr := r.peer(id); pr != nil && pr.enqueue(p) {
			p.sent[id] = true
		}
	}
	return len(p.sent)
}

// queuedFor is how many followers p is queued for.
func (p *pending) queuedFor() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.sent)
}

// Done is closed once the entry reached its need.
func (p *pending) Done() <-chan struct{} { return p.done }

// Committed reports whether commitAt followers have confirmed the entry.
func (p *pending) Committed() bool { return p.acks.Load() >= p.commitAt }

// Wait blocks until the entry reached its need, and otherwise returns an
// error wrapping ErrAckTimeout (ctx ended or the replicator closed),
// ErrTermEnded, or storage.ErrStaleEpoch (a follower admitted a newer term).
func (p *pending) Wait(ctx context.Context) error {
	select {
	case <-p.done:
		return nil
	default:
	}
	select {
	case <-p.done:
		return nil
	case <-p.stale:
		return fmt.Errorf("replicate: %w", storage.ErrStaleEpoch)
	case <-p.ended:
		return fmt.Errorf("replicate: %w after %d of %d confirmations", p.endErr, p.acks.Load(), p.need)
	case <-ctx.Done():
		return fmt.Errorf("%w: %d of %d confirmations: %w", ErrAckTimeout, p.acks.Load(), p.need, ctx.Err())
	}
}

// Queued returns how many entries wait for each follower it has sent to:
// the leader's view of replication lag.
func (r *replicator) Queued() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]int, len(r.peers))
	for id, p := range r.peers {
		out[id] = len(p.queue)
	}
	return out
}

// QueuedBytes returns the bytes waiting for each follower.
func (r *replicator) QueuedBytes() map[string]int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]int64, len(r.peers))
	for id, p := range r.peers {
		out[id] = p.queued.Load()
	}
	return out
}

// Behind lists followers whose queue overflowed: they missed entries, which
// only their own repair brings back. Each stays listed until a heartbeat
// asking it to repair has been answered.
func (r *replicator) Behind() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for id, p := range r.peers {
		if p.behind.Load() {
			out = append(out, id)
		}
	}
	return out
}

// peer is the leader's link to one follower: its queue and the sender that
// drains it, its liveness, and its heartbeat.
type peer struct {
	id     string
	r      *replicator
	queue  chan *pending
	queued atomic.Int64 // bytes of the entries in queue
	// enqueued and finished count entries put in the queue and entries
	// whose delivery ended (sent, refused or dropped); see barrier.
	enqueued, finished atomic.Uint64
	behind             atomic.Bool
	start              sync.Once // starts the sender on the first entry

	// beat is held while a heartbeat to the follower is out: one at a time.
	beat sync.Mutex

	healthMu         sync.Mutex
	lastOK, lastFail time.Time
}

// peer returns id's link, making it on first use; nil after Close.
func (r *replicator) peer(id string) *peer {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ctx.Err() != nil {
		return nil
	}
	p, ok := r.peers[id]
	if !ok {
		p = &peer{id: id, r: r, queue: make(chan *pending, r.cfg.QueueLen)}
		r.peers[id] = p
	}
	return p
}

func (p *peer) enqueue(e *pending) bool {
	p.start.Do(func() {
		p.r.mu.Lock() // no sender starts once Close has cancelled
		defer p.r.mu.Unlock()
		if p.r.ctx.Err() == nil {
			p.r.wg.Add(1)
			go p.run()
		}
	})
	size := int64(e.entry.Size())
	if n := p.queued.Add(size); n > p.r.cfg.QueueBytes && n != size {
		p.queued.Add(-size)
		p.full("bytes")
		return false
	}
	select {
	case p.queue <- e:
		p.enqueued.Add(1)
		return true
	default:
		p.queued.Add(-size)
		p.full("entries")
		return false
	}
}

// barrier returns once every entry queued for any follower before the call
// has finished its delivery (sent, refused, or dropped with the queue), or
// when ctx ends. Queues are FIFO, so nothing queued before the barrier can
// reach a follower after it returns; collection depends on that.
func (r *replicator) barrier(ctx context.Context) error {
	r.mu.Lock()
	type mark struct {
		p      *peer
		target uint64
	}
	var marks []mark
	for _, p := range r.peers {
		marks = append(marks, mark{p, p.enqueued.Load()})
	}
	r.mu.Unlock()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for _, m := range marks {
		for m.p.finished.Load() < m.target {
			select {
			case <-ctx.Done():
				return fmt.Errorf("entries queued for %s still on their way: %w", m.p.id, ctx.Err())
			case <-t.C:
			}
		}
	}
	return nil
}

// full marks the follower behind: it missed an entry, which only its
// repair brings back.
func (p *peer) full(by string) {
	if !p.behind.Swap(true) {
		p.r.log.Warn("follower queue full; it will need repair", "follower", p.id, "bound", by,
			"queued_bytes", p.queued.Load(), "queued_entries", len(p.queue))
	}
}

// dequeued accounts for an entry the sender took from the queue.
func (p *peer) dequeued(e *pending) { p.queued.Add(-int64(e.entry.Size())) }

// note records a call's outcome for the follower's liveness: any answer
// counts as alive, except a failure of the follower's own (see answered).
func (p *peer) note(err error) {
	p.healthMu.Lock()
	defer p.healthMu.Unlock()
	if answered(err) {
		p.lastOK = time.Now()
	} else {
		p.lastFail = time.Now()
	}
}

// down reports whether the last call to the follower failed.
func (p *peer) down() bool {
	p.healthMu.Lock()
	defer p.healthMu.Unlock()
	return p.lastFail.After(p.lastOK)
}

// note records the outcome of a call to member id (by any part of this
// node) for its liveness.
func (r *replicator) note(id string, err error) {
	if p := r.peer(id); p != nil {
		p.note(err)
	}
}

// down reports whether the last call to member id failed.
func (r *replicator) down(id string) bool {
	r.mu.Lock()
	p := r.peers[id]
	r.mu.Unlock()
	return p != nil && p.down()
}

// heartbeats tells every member, every interval while gate is open, that
// this node leads, so followers' stale reads can state how recent they
// are, and a member's liveness is known before a write depends on it. A
// heartbeat to a follower marked behind asks it to repair. It returns when
// ctx ends, after the heartbeats it sent.
func (r *replicator) heartbeats(ctx context.Context, interval time.Duration, gate func() (uint64, bool), members func() []string) {
	t := time.NewTicker(interval)
	defer t.Stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		epoch, open := gate()
		if !open {
			continue
		}
		for _, id := range members() {
			if p := r.peer(id); id != r.cfg.Self && p != nil && p.beat.TryLock() {
				wg.Go(func() {
					defer p.beat.Unlock()
					p.heartbeat(ctx, epoch)
				})
			}
		}
	}
}

// heartbeat sends one heartbeat of term epoch.
func (p *peer) heartbeat(ctx context.Context, epoch uint64) {
	env := transport.Envelope{Epoch: epoch, Leader: p.r.cfg.Self, Repair: p.behind.Load()}
	hctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	_, err := p.r.cfg.Peers.Replicate(hctx, p.id, transport.Batch{Envelope: env})
	p.note(err)
	if err == nil && env.Repair {
		// The follower has been told; its repair pass fetches what its
		// queue dropped.
		p.behind.Store(false)
	}
	if fence, stale := refusedTerm(err); stale {
		if f := p.r.cfg.OnStaleEpoch; f != nil {
			f(fence)
		}
	}
}

// run ships the queue in order: a batch holds whatever is queued (up to
// MaxBatch entries and MaxBatchBytes, one term per batch) and is retried
// until it is applied or the follower refuses its term.
func (p *peer) run() {
	defer p.r.wg.Done()
	batch := make([]*pending, 0, p.r.cfg.MaxBatch)
	var carry *pending
	for {
		batch = batch[:0]
		if carry != nil {
			batch, carry = append(batch, carry), nil
		} else {
			select {
			case e := <-p.queue:
				p.dequeued(e)
				batch = append(batch, e)
			case <-p.r.ctx.Done():
				p.drain()
				return
			}
		}
		size := batch[0].entry.Size()
	fill:
		for len(batch) < p.r.cfg.MaxBatch {
			select {
			case e := <-p.queue:
				p.dequeued(e)
				if e.epoch != batch[0].epoch || size+e.entry.Size() > p.r.cfg.MaxBatchBytes {
					carry = e
					break fill
				}
				size += e.entry.Size()
				batch = append(batch, e)
			default:
				break fill
			}
		}
		p.deliver(batch)
		p.finished.Add(uint64(len(batch)))
	}
}

// drain ends every entry still queued when the replicator closes, so no
// waiter hangs.
func (p *peer) drain() {
	for {
		select {
		case e := <-p.queue:
			p.dequeued(e)
			e.end(errReplicatorClosed)
			p.finished.Add(1)
		default:
			return
		}
	}
}

// deliver sends one batch until the follower applies it, refuses its term,
// or refuses the batch itself. A refused batch is never sent again as it
// was: it is split, and a single entry the follower will not take is left
// to repair (the follower is marked behind).
func (p *peer) deliver(batch []*pending) {
	b := transport.Batch{Envelope: transport.Envelope{Epoch: batch[0].epoch, Leader: p.r.cfg.Self}, Entries: make([]transport.Entry, len(batch))}
	for i, e := range batch {
		b.Entries[i] = e.entry
	}
	backoff := wait.Backoff{Duration: 20 * time.Millisecond, Factor: 2, Jitter: 0.5, Steps: math.MaxInt32, Cap: time.Second}
	for attempt := 0; ; attempt++ {
		if f := p.r.cfg.Active; f != nil && !f(b.Epoch) {
			for _, e := range batch {
				e.end(ErrTermEnded)
			}
			return
		}
		// Not cancelled by the caller's wait: the batch goes on after a
		// client gives up. Bounded so a follower that took the call and
		// went silent does not hold the queue forever.
		ctx, cancel := context.WithTimeout(p.r.ctx, 10*time.Second)
		_, err := p.r.cfg.Peers.Replicate(ctx, p.id, b)
		cancel()
		p.note(err)
		if err == nil {
			for _, e := range batch {
				e.ack()
			}
			return
		}
		if fence, stale := refusedTerm(err); stale {
			p.r.log.Warn("follower refused this term", "follower", p.id, "epoch", b.Epoch, "fence", fence)
			// Step down first, so a waiter that hears of the refusal
			// finds this node no longer leading.
			if f := p.r.cfg.OnStaleEpoch; f != nil {
				f(fence)
			}
			for _, e := range batch {
				e.refuse()
			}
			return
		}
		if te, ok := errors.AsType[*transport.Error](err); ok && (te.Status == 400 || te.Status == 413) {
			p.refused(batch, te)
			return
		}
		// Down, restarting or unreachable: keep the batch and retry, so a
		// returning follower catches up from the queue (hinted hand-off).
		// Say so once per batch: a wrong token (401) retries too, and an
		// operator must see why.
		if attempt == 0 {
			p.r.log.Warn("replicate batch failed; retrying", "follower", p.id, "entries", len(batch), "err", err)
		}
		select {
		case <-p.r.ctx.Done():
			for _, e := range batch {
				e.end(errReplicatorClosed)
			}
			return
		case <-time.After(backoff.Step()):
		}
	}
}

// refused handles a follower's refusal of a batch's content (too large, or
// an entry it cannot take): halves are sent on their own, and a single
// refused entry is dropped for this follower, which repair then serves.
func (p *peer) refused(batch []*pending, te *transport.Error) {
	if len(batch) > 1 {
		p.r.log.Warn("follower refused a batch; sending it in halves", "follower", p.id, "entries", len(batch), "code", te.Code, "err", te.Message)
		half := len(batch) / 2
		p.deliver(batch[:half])
		p.deliver(batch[half:])
		return
	}
	p.r.log.Error("follower refused an entry; it is left to repair", "follower", p.id, "key", batch[0].entry.Key, "code", te.Code, "err", te.Message)
	p.behind.Store(true)
	batch[0].end(fmt.Errorf("%w: %s refused it: %s", ErrAckTimeout, p.id, te.Message))
}
