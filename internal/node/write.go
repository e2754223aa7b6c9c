package node

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/statefulkv/store/internal/replication"
	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// Write is a validated PUT or DELETE.
type Write struct {
	Key    string
	Value  []byte // ignored for a delete
	Delete bool
	// IfMatch, IfExists and IfAbsent are the client's preconditions
	// (storage.Mutation has their meaning).
	IfMatch            storage.Version
	IfExists, IfAbsent bool
	Ack                replication.AckLevel
	// RequestID makes retries apply at most once ("" for none; a write
	// that is forwarded gets one).
	RequestID string
}

// WriteResult is an applied write.
type WriteResult struct {
	Version          storage.Version
	Created, Deleted bool
	// Leader and Epoch name who applied it, in which term ("" and 0 on a
	// single node).
	Leader string
	Epoch  uint64
}

// Write applies w here when this node may write, or forwards it to the
// leader and rides out a leader change on the way. Its error says what
// happened (OutcomeOf): a Redirect for o.Redirect; not applied (no leader,
// a stale term); refused (precondition, missing key); or outcome unknown.
func (n *Node) Write(ctx context.Context, w Write, o Origin) (WriteResult, error) {
	if n.cfg.Leadership == nil {
		return n.applyHere(ctx, n.cfg.Epoch, w)
	}
	// One deadline covers the wait for a leader and the forward after it.
	ctx, cancel := context.WithTimeout(ctx, n.cfg.ForwardTimeout)
	defer cancel()
	epoch, leader, local, err := n.route(ctx, o)
	switch {
	case err != nil:
		return WriteResult{}, err
	case local:
		return n.applyLeader(ctx, epoch, w)
	case o.Redirect:
		return WriteResult{}, &Redirect{To: leader, Leader: true}
	}
	return n.forwardWrite(ctx, leader, w)
}

// applyHere applies w to the local store, a single node's whole job.
func (n *Node) applyHere(ctx context.Context, epoch uint64, w Write) (WriteResult, error) {
	res, err := n.cfg.Store.Apply(ctx, n.mutation(epoch, w))
	if err != nil {
		return WriteResult{}, notFoundKey(err, w.Key)
	}
	return WriteResult{Version: res.Entry.Version, Created: res.Created, Deleted: w.Delete}, nil
}

func (n *Node) mutation(epoch uint64, w Write) storage.Mutation {
	return storage.Mutation{
		Key: w.Key, Value: w.Value, Delete: w.Delete, Epoch: epoch,
		IfMatch: w.IfMatch, IfExists: w.IfExists, IfAbsent: w.IfAbsent, RequestID: w.RequestID,
	}
}

// applyLeader is the leader's write in term epoch: commit here, replicate
// until the ack level is met, and acknowledge only if the term still holds.
func (n *Node) applyLeader(ctx context.Context, epoch uint64, w Write) (WriteResult, error) {
	var (
		res storage.Result
		err error
	)
	if n.cfg.Replication != nil {
		res, err = n.replicatedWrite(ctx, epoch, w)
	} else if res, err = n.cfg.Store.Apply(ctx, n.mutation(epoch, w)); err != nil {
		err = notFoundKey(err, w.Key)
	}
	if err != nil {
		return WriteResult{}, err
	}
	// The gate may have closed while the write was syncing. Acknowledging
	// now could confirm a write a newer leader never sees, so the client is
	// told the truth: it is durable here, but whether it counts is unknown.
	if e2, still := n.cfg.Leadership.WriteGate(); !still || e2 != epoch {
		return WriteResult{}, fmt.Errorf("%w: leadership (epoch %d) ended while the write was being committed; retry with the same request id", ErrOutcomeUnknown, epoch)
	}
	return WriteResult{Version: res.Entry.Version, Created: res.Created, Deleted: w.Delete, Leader: n.cfg.Self, Epoch: epoch}, nil
}

// replicatedWrite commits w here and replicates it until its ack level is
// met or ReplicationTimeout passes.
func (n *Node) replicatedWrite(ctx context.Context, epoch uint64, w Write) (storage.Result, error) {
	ctx, cancel := context.WithTimeout(ctx, n.cfg.ReplicationTimeout)
	defer cancel()
	m := n.mutation(epoch, w)
	res, err := n.cfg.Replication.Write(ctx, epoch, w.Ack, w.Key, func(beforeSync func(storage.Result)) (storage.Result, error) {
		m.BeforeSync = beforeSync
		// Not the client's context: a client that leaves must not keep
		// Write from learning the commit (the mutation commits anyway),
		// or the key would stop counting as in flight too early.
		return n.cfg.Store.Apply(context.WithoutCancel(ctx), m)
	})
	switch {
	case err == nil:
		return res, nil
	case res.Entry.Version.IsZero():
		// The local commit itself failed: nothing was written here. (If
		// the entry had already left for the owners the error is
		// storage.ErrSyncFailed, an unknown outcome.)
		return res, notFoundKey(err, w.Key)
	case errors.Is(err, replication.ErrAckTimeout):
		return res, fmt.Errorf("%w: %w: version %s is durable on the leader but ack=%s was not met within %s (%v); it will still be replicated, retry with the same request id to wait again",
			ErrOutcomeUnknown, ErrReplicasTimeout, res.Entry.Version, w.Ack, n.cfg.ReplicationTimeout, err)
	}
	// The term ended or a follower knows a newer one: whether the next
	// leader keeps this write is not known here.
	return res, fmt.Errorf("%w: version %s was committed on %s, whose leadership ended before ack=%s was met (%v); retry with the same request id",
		ErrOutcomeUnknown, res.Entry.Version, n.cfg.Self, w.Ack, err)
}

// forwardWrite sends w to leader, and on an answer that promises nothing
// was applied (the leader moved, its gate is closed) or a failure before
// sending, again to whoever leads by then, which may be this node. Retries
// are safe because w carries a request id the leader deduplicates on. Any
// other answer is the leader's final word. When ctx ends, the error says
// whether any attempt may have reached a leader.
func (n *Node) forwardWrite(ctx context.Context, leader string, w Write) (WriteResult, error) {
	if w.RequestID == "" {
		w.RequestID = n.newRequestID()
	}
	tw := transport.Write{
		From: n.cfg.Self, RequestID: w.RequestID, Key: w.Key, Delete: w.Delete, Value: w.Value,
		IfMatch: transport.Version(w.IfMatch), IfExists: w.IfExists, IfAbsent: w.IfAbsent, Ack: w.Ack.String(),
	}
	var (
		maybeSent bool
		lastErr   error
		refusals  int
	)
	backoff := retryBackoff()
	for {
		_, tw.SeenEpoch = n.cfg.Leadership.Leader()
		reply, err := n.cfg.Peers.Write(ctx, leader, tw)
		if err == nil {
			return WriteResult{Version: storage.Version(reply.Version), Created: reply.Created, Deleted: reply.Deleted, Leader: reply.Leader, Epoch: reply.Epoch}, nil
		}
		te, refused := errors.AsType[*transport.Error](err)
		switch {
		case refused && !te.NotApplied():
			return WriteResult{}, err
		case refused:
			refusals++
		default:
			lastErr = err
			// Record before looking at ctx: an attempt cut short by the
			// deadline may still have reached the leader.
			maybeSent = maybeSent || !errors.Is(err, transport.ErrNotSent)
		}
		if !sleep(ctx, backoff.Step()) {
			break
		}
		if epoch, open := n.cfg.Leadership.WriteGate(); open {
			return n.applyLeader(ctx, epoch, w)
		}
		if l, _ := n.cfg.Leadership.Leader(); l != "" && l != n.cfg.Self {
			leader = l
		}
	}
	switch {
	case maybeSent && errors.Is(lastErr, context.DeadlineExceeded):
		return WriteResult{}, fmt.Errorf("%w: %w within %s; the write may or may not have been applied: retry with the same request id to be safe", ErrOutcomeUnknown, ErrLeaderTimeout, n.cfg.ForwardTimeout)
	case maybeSent:
		return WriteResult{}, fmt.Errorf("%w: the connection to the leader failed mid-request (%v); retry with the same request id to be safe", ErrOutcomeUnknown, lastErr)
	case lastErr == nil:
		return WriteResult{}, fmt.Errorf("%w: the leader kept answering that it could not apply the write (leadership moving, %d tries) for %s; nothing was applied, retry shortly", ErrNoLeader, refusals, n.cfg.ForwardTimeout)
	}
	return WriteResult{}, fmt.Errorf("%w: the leader could not be reached (%v); nothing was applied", ErrNoLeader, lastErr)
}

// retryBackoff is the one retry schedule of requests that go to another
// node: exponential from 25 ms, capped at 500 ms, jittered so that the
// followers of a failed leader do not retry in step.
func retryBackoff() *wait.Backoff {
	return &wait.Backoff{Duration: 25 * time.Millisecond, Factor: 2, Jitter: 0.5, Steps: math.MaxInt32, Cap: 500 * time.Millisecond}
}

// sleep waits d or until ctx ends; it reports whether ctx is still live.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
