package storage

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// SeqHorizon tells which versions are at least a TTL old, from the seq
// alone: it remembers the highest seq at past instants (on the monotonic
// clock), so every version at or below the seq it returns was assigned at
// least the TTL ago. Collectors use it to decide what is old enough to
// collect; a stepped wall clock cannot make it jump.
//
// Safe for concurrent use.
type SeqHorizon struct {
	ttl  time.Duration
	born time.Time

	mu sync.Mutex
	// samples are oldest first; only one older than the TTL is kept.
	samples []seqSample
}

type seqSample struct {
	at  time.Duration // since born
	seq uint64
}

// NewSeqHorizon returns a horizon for versions older than ttl.
func NewSeqHorizon(ttl time.Duration) *SeqHorizon {
	return &SeqHorizon{ttl: ttl, born: time.Now()}
}

// Sample notes that seq had been assigned by now.
func (h *SeqHorizon) Sample(seq uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := time.Since(h.born)
	h.samples = append(h.samples, seqSample{at: now, seq: seq})
	for len(h.samples) > 1 && now-h.samples[1].at >= h.ttl {
		h.samples = h.samples[1:]
	}
}

// Seq is the highest seq known to have been assigned at least the TTL ago
// (0: none yet).
func (h *SeqHorizon) Seq() uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := time.Since(h.born)
	var seq uint64
	for _, s := range h.samples {
		if now-s.at < h.ttl {
			break
		}
		seq = s.seq // the newest sample that is old enough
	}
	return seq
}

// CollectLocal removes, in term epoch, every tombstone at or below maxSeq,
// a page of about 1 MiB of keys at a time, and returns how many it removed.
// It is for a store nobody replicates: a tombstone there only stops a
// deleted key from coming back from a replica, and there are none. A
// replicated store is collected by its leader instead (replication's
// collector), which first makes sure no replica still needs them.
func (db *DB) CollectLocal(ctx context.Context, epoch, maxSeq uint64) (int, error) {
	collected := 0
	after := ""
	for {
		page, more, err := db.TombstonesUpTo(maxSeq, after, 1<<20)
		if err != nil {
			return collected, err
		}
		if len(page) > 0 {
			n, err := db.Forget(ctx, epoch, page)
			collected += n
			if err != nil {
				return collected, fmt.Errorf("collect tombstones: %w", err)
			}
			after = page[len(page)-1].Key
		}
		if !more || len(page) == 0 {
			return collected, nil
		}
	}
}
