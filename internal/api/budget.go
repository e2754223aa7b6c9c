package api

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// errOverloaded is a request refused because the bytes of the requests
// already in flight here fill the node's budget (--max-inflight-bytes) and
// none finished in time: nothing was applied; retry after a moment.
var errOverloaded = errors.New("overloaded")

// byteBudget bounds the bytes of request bodies a node holds at once, so
// its memory is bounded by configuration, not by how many clients send
// large values together: 200 clients each sending 1 MiB would otherwise
// hold 200 MiB of bodies, and several copies of each on the way to the
// replicas. A request that does not fit waits, in arrival order, for others
// to finish, up to wait; one larger than the whole budget is admitted only
// when nothing else is in flight, so every legal value can still be
// written. Bodies another pod forwards to the leader are not counted here:
// each pod bounds its own clients' bodies, so the leader holds at most the
// sum of the pods' budgets.
type byteBudget struct {
	limit int64
	wait  time.Duration

	mu   sync.Mutex
	used int64
	// queue holds the waiting requests, first come first served: a large
	// body is not starved by a stream of small ones.
	queue []*budgetWaiter
}

type budgetWaiter struct {
	n     int64
	ready chan struct{} // closed when admitted
}

func newByteBudget(limit int64, wait time.Duration) *byteBudget {
	return &byteBudget{limit: limit, wait: wait}
}

// acquire reserves n bytes and returns the function that gives them back,
// or fails with errOverloaded after waiting b.wait (or ctx's error).
func (b *byteBudget) acquire(ctx context.Context, n int64) (release func(), err error) {
	b.mu.Lock()
	if len(b.queue) == 0 && b.fits(n) {
		b.used += n
		b.mu.Unlock()
		return b.releaser(n), nil
	}
	w := &budgetWaiter{n: n, ready: make(chan struct{})}
	b.queue = append(b.queue, w)
	used := b.used
	b.mu.Unlock()

	t := time.NewTimer(b.wait)
	defer t.Stop()
	select {
	case <-w.ready:
		return b.releaser(n), nil
	case <-t.C:
		err = fmt.Errorf("%w: %d bytes of requests in flight on this node fill --max-inflight-bytes (%d) and none finished within %s; nothing was applied, retry shortly", errOverloaded, used, b.limit, b.wait)
	case <-ctx.Done():
		// The client left (or its deadline passed) before the body was
		// read: nothing was applied, which is not an unknown outcome.
		err = fmt.Errorf("%w: the request ended while waiting for room (%v); nothing was applied", errOverloaded, ctx.Err())
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	select {
	case <-w.ready: // admitted just now after all: hand the bytes back
		b.used -= n
		b.admit()
	default:
		b.queue = slicesDelete(b.queue, w)
		// The head may fit now that it is no longer behind w.
		b.admit()
	}
	return nil, err
}

// fits reports whether n more bytes fit; b.mu is held.
func (b *byteBudget) fits(n int64) bool { return b.used == 0 || b.used+n <= b.limit }

func (b *byteBudget) releaser(n int64) func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			b.mu.Lock()
			defer b.mu.Unlock()
			b.used -= n
			b.admit()
		})
	}
}

// admit lets the waiting requests in, in order, while they fit; b.mu is
// held.
func (b *byteBudget) admit() {
	for len(b.queue) > 0 && b.fits(b.queue[0].n) {
		w := b.queue[0]
		b.queue = b.queue[1:]
		b.used += w.n
		close(w.ready)
	}
}

// inUse returns the bytes reserved now.
func (b *byteBudget) inUse() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

func slicesDelete(q []*budgetWaiter, w *budgetWaiter) []*budgetWaiter {
	for i, x := range q {
		if x == w {
			return append(q[:i:i], q[i+1:]...)
		}
	}
	return q
}
