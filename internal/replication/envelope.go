package replication

import (
	"fmt"
	"sync"

	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// envelope heads every leader-to-follower message (replication batches,
// read-index answers, repair streams): the sender's term and identity, and
// on a heartbeat whether the follower should repair (not part of the
// fence). Followers admit a message only through a termFence.
type envelope = transport.Envelope

// ErrStaleEpoch means a message came from an older term than one this node
// has already seen: its sender has been superseded. The sender must step
// down (election.Elector.ObserveEpoch) and must not count the message as
// delivered.
var ErrStaleEpoch = storage.ErrStaleEpoch

// termFence remembers the newest term this node has seen and refuses messages
// from older ones, so a paused or partitioned old leader can do no harm
// once a newer leader has spoken to this node.
//
// Safe for concurrent use. The highest epoch is kept in memory; replication
// persists it with the data it admits, so a restart cannot lower it.
type termFence struct {
	mu      sync.Mutex
	highest uint64
	leader  string
}

// newFence starts at a previously persisted epoch (0 for a new node).
func newFence(highest uint64) *termFence { return &termFence{highest: highest} }

// Admit accepts env if its epoch is at least the highest seen, raising the
// mark. It refuses an older epoch, and a second leader claiming the same
// epoch (which the Lease's optimistic concurrency makes impossible, so it
// means a bug or a forged message), with an error wrapping ErrStaleEpoch.
func (f *termFence) Admit(env envelope) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case env.Epoch == 0 || env.Leader == "":
		return fmt.Errorf("%w: message without epoch or leader", ErrStaleEpoch)
	case env.Epoch < f.highest:
		return fmt.Errorf("%w: %s sent epoch %d, this node has seen epoch %d", ErrStaleEpoch, env.Leader, env.Epoch, f.highest)
	case env.Epoch == f.highest && f.leader != "" && env.Leader != f.leader:
		return fmt.Errorf("%w: %s claims epoch %d, which belongs to %s", ErrStaleEpoch, env.Leader, env.Epoch, f.leader)
	}
	f.highest, f.leader = env.Epoch, env.Leader
	return nil
}

// Highest returns the newest epoch admitted.
func (f *termFence) Highest() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.highest
}
