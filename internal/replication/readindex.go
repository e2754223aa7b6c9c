package replication

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// readIndex owns strong reads on both sides. On the leader it tracks the
// keys with writes in flight and answers each key's committed version once
// no write to it is in flight; on a follower it asks the leader for those
// versions, sharing one round trip among the reads that arrive while a
// request is out, and waits until this replica has applied them.
type readIndex struct {
	c *Cluster
	// inflight holds this term's keys with writes not yet committed.
	inflight atomic.Pointer[inflightSet]
	// queue holds strong reads waiting for the next request to the
	// leader; busy is true while a sender goroutine runs. mu guards both
	// and the start of that goroutine.
	mu    sync.Mutex
	queue []*indexWait
	busy  bool
}

func newReadIndex(c *Cluster) *readIndex {
	ri := &readIndex{c: c}
	ri.inflight.Store(newInflightSet())
	return ri
}

// writing registers a write to key as in flight until release is called.
func (ri *readIndex) writing(key string) (release func()) {
	set := ri.inflight.Load()
	set.add(key)
	return func() { set.done(key) }
}

// forgetInflight drops the previous terms' writes that never committed: a
// new term's catch-up has decided about them.
func (ri *readIndex) forgetInflight() { ri.inflight.Store(newInflightSet()) }

// leaderRead reads keys on the caught-up leader, each once no write to it is
// in flight, and confirms the term did not end meanwhile. Without values it
// reads versions only: a burst of read-index calls for large values must
// not copy each value at the leader just to compare versions.
func (ri *readIndex) leaderRead(ctx context.Context, keys []string, values bool) (entries []storage.Entry, found []bool, epoch uint64, err error) {
	c := ri.c
	epoch, open := c.WriteGate()
	if !open {
		return nil, nil, 0, fmt.Errorf("%w: %s is not a caught-up leader", ErrNotCaughtUp, c.cfg.Self)
	}
	ctx, cancel := context.WithTimeout(ctx, c.cfg.ReadTimeout)
	defer cancel()
	set := ri.inflight.Load()
	entries, found = make([]storage.Entry, len(keys)), make([]bool, len(keys))
	for i, key := range keys {
		if err := c.gate.await(ctx, epoch, key); err != nil {
			return nil, nil, 0, err
		}
		err = set.whenIdle(ctx, key, func() error {
			if values {
				var lerr error
				entries[i], found[i], lerr = c.cfg.Local.Lookup(key)
				return lerr
			}
			got, lerr := c.cfg.Local.LookupVersions([]string{key})
			if len(got) == 1 {
				entries[i], found[i] = got[0], true
			}
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

// strong returns key's entry such that every write acknowledged before the
// call is reflected (see Cluster.ReadStrong).
func (ri *readIndex) strong(ctx context.Context, key string) (storage.Entry, bool, error) {
	c := ri.c
	if _, open := c.WriteGate(); open {
		es, found, _, err := ri.leaderRead(ctx, []string{key}, true)
		if err != nil {
			return storage.Entry{}, false, err
		}
		return es[0], found[0], nil
	}
	ctx, cancel := context.WithTimeout(ctx, c.cfg.ReadTimeout)
	defer cancel()
	for {
		env, version, err := ri.ask(ctx, key)
		if err != nil {
			return storage.Entry{}, false, err
		}
		if err := c.admit(env); err != nil {
			return storage.Entry{}, false, err
		}
		want := version
		e, found, newer, err := ri.awaitVersion(ctx, key, want)
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
func (ri *readIndex) awaitVersion(ctx context.Context, key string, want storage.Version) (e storage.Entry, found, newer bool, err error) {
	c := ri.c
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
	env     envelope
	version storage.Version // zero: the leader holds none
	err     error
	done    chan struct{}
}

// ask asks the leader for key's committed version. Reads that arrive
// while a request is in flight wait for the next one, which carries all of
// their keys: the read index is always taken after the read started, and a
// burst of strong reads costs one round trip instead of one each.
func (ri *readIndex) ask(ctx context.Context, key string) (envelope, storage.Version, error) {
	c := ri.c
	w := &indexWait{key: key, done: make(chan struct{})}
	ri.mu.Lock()
	if c.ctx.Err() != nil {
		ri.mu.Unlock()
		return envelope{}, storage.Version{}, fmt.Errorf("%w: shutting down", ErrReadTimeout)
	}
	ri.queue = append(ri.queue, w)
	if !ri.busy {
		ri.busy = true
		c.wg.Go(ri.send)
	}
	ri.mu.Unlock()
	select {
	case <-w.done:
		return w.env, w.version, w.err
	case <-ctx.Done():
		return envelope{}, storage.Version{}, fmt.Errorf("%w: no read index from the leader: %w", ErrReadTimeout, ctx.Err())
	}
}

// send sends the queued keys, one request at a time, until the queue is
// empty.
func (ri *readIndex) send() {
	c := ri.c
	for {
		ri.mu.Lock()
		batch := ri.queue
		ri.queue = nil
		if len(batch) == 0 {
			ri.busy = false
			ri.mu.Unlock()
			return
		}
		ri.mu.Unlock()
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
				w.env, w.version = reply.Envelope, storage.Version(reply.Versions[i])
			}
			close(w.done)
		}
	}
}

// inflightSet tracks one term's keys whose latest write is not committed.
type inflightSet struct {
	mu sync.Mutex
	m  map[string]*keyWait
}

type keyWait struct {
	n    int
	free chan struct{}
}

func newInflightSet() *inflightSet { return &inflightSet{m: map[string]*keyWait{}} }

func (s *inflightSet) add(key string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := s.m[key]
	if w == nil {
		w = &keyWait{free: make(chan struct{})}
		s.m[key] = w
	}
	w.n++
}

func (s *inflightSet) done(key string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := s.m[key]
	if w == nil {
		return
	}
	if w.n--; w.n == 0 {
		close(w.free)
		delete(s.m, key)
	}
}

// whenIdle runs read at a moment when no write to key is in flight and
// returns its result, or ctx's error. read runs under the set's lock: a
// write registers (add) before it applies, so read sees only committed
// writes of key.
func (s *inflightSet) whenIdle(ctx context.Context, key string, read func() error) error {
	for {
		s.mu.Lock()
		w := s.m[key]
		if w == nil {
			err := read()
			s.mu.Unlock()
			return err
		}
		s.mu.Unlock()
		select {
		case <-w.free:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (s *inflightSet) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m)
}
