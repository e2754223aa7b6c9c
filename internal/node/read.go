package node

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/statefulkv/store/internal/replication"
	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// ReadOptions is a GET's consistency.
type ReadOptions struct {
	// Stale serves this replica's copy without asking the leader;
	// MaxStale, if positive, refuses it when the replica last heard from
	// the leader longer ago.
	Stale    bool
	MaxStale time.Duration
}

// ReadResult is a served read.
type ReadResult struct {
	Entry storage.Entry
	// ServedBy names the node whose replica answered and Consistency what
	// it promised ("strong", "stale"); both "" on a node without
	// replication, where the one copy is always current.
	ServedBy, Consistency string
	// LastContact, when HasLastContact, is the answering replica's time
	// since it last heard from the leader (stale reads).
	HasLastContact bool
	LastContact    time.Duration
}

// Get reads key. With replication it is served by an owner of the key that
// is not the leader when one answers (the leader hands reads off), else by
// the leader, which holds every key; without replication, by the leader. A
// read forwarded here (o.ForwardedBy) is served here.
func (n *Node) Get(ctx context.Context, key string, opts ReadOptions, o Origin) (ReadResult, error) {
	switch {
	case n.cfg.Leadership == nil:
		return n.getLocal(key)
	case n.cfg.Replication == nil:
		return n.getAtLeader(ctx, key, opts, o)
	}
	n.observe(o)
	if o.ForwardedBy == "" {
		cands := n.readCandidates(key)
		if len(cands) > 0 && cands[0] != n.cfg.Self {
			res, err, answered := n.readRemote(ctx, key, opts, cands, o.Redirect)
			if answered {
				return res, err
			}
			// Nobody else answered: this node serves it if it holds the key.
			leader, _ := n.cfg.Leadership.Leader()
			if !slices.Contains(cands, n.cfg.Self) && leader != n.cfg.Self {
				return ReadResult{}, fmt.Errorf("%w: no replica of %q answered (%v)", ErrReadUnconfirmed, key, cands)
			}
		}
	}
	return n.readReplica(ctx, key, opts)
}

// getLocal reads the one copy of a single node, which is always current
// for both consistencies.
func (n *Node) getLocal(key string) (ReadResult, error) {
	e, err := n.cfg.Store.Get(key)
	if err != nil {
		return ReadResult{}, notFoundKey(err, key)
	}
	return ReadResult{Entry: e}, nil
}

// getAtLeader serves a read on a cluster without replication, where only
// the leader holds the data.
func (n *Node) getAtLeader(ctx context.Context, key string, opts ReadOptions, o Origin) (res ReadResult, err error) {
	ctx, cancel := context.WithTimeout(ctx, n.cfg.ForwardTimeout)
	defer cancel()
	_, leader, local, err := n.route(ctx, o)
	switch {
	case err != nil:
		return ReadResult{}, err
	case local:
		return n.getLocal(key)
	case o.Redirect:
		return ReadResult{}, &Redirect{To: leader, Leader: true}
	}
	var (
		reply  transport.ReadReply
		served bool
	)
	err = n.atLeader(ctx, leader, func(ctx context.Context, to string) (err error) {
		reply, err = n.cfg.Peers.Read(ctx, to, transport.Read{From: n.cfg.Self, Key: key, Stale: opts.Stale, MaxStale: opts.MaxStale})
		return err
	}, func() (err error) {
		res, err = n.getLocal(key)
		served = true
		return err
	})
	if err != nil || served {
		return res, err
	}
	return fromReply(key, reply), nil
}

// atLeader runs call against the leader, and again against whoever leads
// after an answer that promises nothing happened or a failed connection,
// until ctx ends. Only reads and listings use it: they are safe to repeat.
//
// When this node itself becomes the leader meanwhile, local serves it.
func (n *Node) atLeader(ctx context.Context, leader string, call func(ctx context.Context, to string) error, local func() error) error {
	backoff := retryBackoff()
	var lastErr error
	for {
		if leader == n.cfg.Self {
			return local()
		}
		err := call(ctx, leader)
		if err == nil || (OutcomeOf(err) != NotApplied && errors.As(err, new(*transport.Error))) {
			return err
		}
		lastErr = err
		if !sleep(ctx, backoff.Step()) {
			return fmt.Errorf("%w: the leader could not serve the read within %s (%v); retry", ErrNoLeader, n.cfg.ForwardTimeout, lastErr)
		}
		if _, open := n.cfg.Leadership.WriteGate(); open {
			leader = n.cfg.Self
		} else if l, _ := n.cfg.Leadership.Leader(); l != "" && l != n.cfg.Self {
			leader = l
		}
	}
}

// readCandidates orders the nodes that may serve key: its owners other
// than the leader first, then the leader (which holds every key). A
// follower that owns the key serves it itself.
func (n *Node) readCandidates(key string) []string {
	leader, _ := n.cfg.Leadership.Leader()
	owners := n.cfg.Replication.Owners(key)
	if slices.Contains(owners, n.cfg.Self) && n.cfg.Self != leader {
		return []string{n.cfg.Self}
	}
	var out []string
	for _, id := range owners {
		if id != leader {
			out = append(out, id)
		}
	}
	if leader != "" {
		out = append(out, leader)
	}
	return out
}

// readRemote asks the candidates other than this node in turn (a read is
// safe to try twice) and returns the first answer; with redirect it
// returns a Redirect to the first instead. If every candidate that
// answered refused with "cannot confirm now" (a replica catching up, too
// stale), the last refusal is the answer. answered is false if nobody
// answered.
func (n *Node) readRemote(ctx context.Context, key string, opts ReadOptions, cands []string, redirect bool) (res ReadResult, err error, answered bool) {
	if redirect {
		for _, id := range cands {
			if id != n.cfg.Self {
				return ReadResult{}, &Redirect{To: id}, true
			}
		}
	}
	var refusal error
	for _, id := range cands {
		if id == n.cfg.Self {
			continue
		}
		_, seen := n.cfg.Leadership.Leader()
		cctx, cancel := context.WithTimeout(ctx, n.cfg.ForwardTimeout)
		reply, err := n.cfg.Peers.Read(cctx, id, transport.Read{From: n.cfg.Self, Key: key, Stale: opts.Stale, MaxStale: opts.MaxStale, SeenEpoch: seen})
		cancel()
		if err == nil {
			return fromReply(key, reply), nil, true
		}
		te, isRefusal := errors.AsType[*transport.Error](err)
		switch {
		case !isRefusal:
			continue // not reached, or lost: the next one may answer
		case te.NotApplied():
			refusal = err // that replica cannot confirm now; the next may
			continue
		}
		return ReadResult{}, err, true // its final word (not found, ...)
	}
	if refusal != nil {
		return ReadResult{}, refusal, true
	}
	return ReadResult{}, nil, false
}

func fromReply(key string, r transport.ReadReply) ReadResult {
	return ReadResult{
		Entry:    storage.Entry{Key: key, Value: r.Value, Version: storage.Version(r.Version)},
		ServedBy: r.ServedBy, Consistency: r.Consistency,
		HasLastContact: r.HasLastContact, LastContact: r.LastContact,
	}
}

// readReplica serves a read from this node's replica.
func (n *Node) readReplica(ctx context.Context, key string, opts ReadOptions) (ReadResult, error) {
	res := ReadResult{ServedBy: n.cfg.Self}
	var (
		e     storage.Entry
		found bool
		err   error
	)
	if opts.Stale {
		var age time.Duration
		e, found, age, err = n.cfg.Replication.ReadStale(key)
		res.Consistency, res.HasLastContact, res.LastContact = "stale", true, age
		if err == nil && opts.MaxStale > 0 && age > opts.MaxStale {
			err = fmt.Errorf("%w: %s last heard from the leader %s ago, more than max_stale=%s", ErrTooStale, n.cfg.Self, age.Round(time.Millisecond), opts.MaxStale)
		}
	} else {
		res.Consistency = "strong"
		if e, found, err = n.cfg.Replication.ReadStrong(ctx, key); err != nil {
			err = readError(err)
		}
	}
	if err != nil {
		return res, err
	}
	if !found || e.Deleted {
		return res, fmt.Errorf("%w: %q", storage.ErrNotFound, key)
	}
	res.Entry = e
	return res, nil
}

// readError keeps the codes of known strong-read failures and says "no
// leader" for the rest (the leader could not be asked). All mean nothing
// happened: a read can be retried anywhere.
func readError(err error) error {
	switch {
	case errors.Is(err, storage.ErrStaleEpoch):
		return err
	case errors.Is(err, replication.ErrReadTimeout), errors.Is(err, replication.ErrDiverged):
		return fmt.Errorf("%w: %w", ErrReadUnconfirmed, err)
	}
	return fmt.Errorf("%w: the strong read could not be confirmed with the leader: %w", ErrNoLeader, err)
}

// ListOptions is one page of a listing.
type ListOptions struct {
	Prefix, After string
	Limit         int
}

// ListResult is one page; More says another follows after the last key. A
// page may hold fewer than Limit entries when their values are large.
type ListResult struct {
	Entries []storage.Entry
	More    bool
}

// List serves a page of the listing. In cluster mode the leader answers
// from its complete copy; other nodes forward the listing to it.
func (n *Node) List(ctx context.Context, opts ListOptions, o Origin) (res ListResult, err error) {
	if n.cfg.Leadership == nil {
		return n.listLocal(opts)
	}
	ctx, cancel := context.WithTimeout(ctx, n.cfg.ForwardTimeout)
	defer cancel()
	epoch, leader, local, err := n.route(ctx, o)
	served := false
	switch {
	case err != nil:
		return ListResult{}, err
	case local:
		return n.listAtLeader(ctx, epoch, opts)
	case o.Redirect:
		return ListResult{}, &Redirect{To: leader, Leader: true}
	}
	var reply transport.ListReply
	err = n.atLeader(ctx, leader, func(ctx context.Context, to string) (err error) {
		_, seen := n.cfg.Leadership.Leader()
		reply, err = n.cfg.Peers.List(ctx, to, transport.List{From: n.cfg.Self, Prefix: opts.Prefix, After: opts.After, Limit: opts.Limit, SeenEpoch: seen})
		return err
	}, func() (err error) {
		served = true
		epoch, open := n.cfg.Leadership.WriteGate()
		if !open {
			return fmt.Errorf("%w: leadership moved while the listing waited; retry", ErrNoLeader)
		}
		res, err = n.listAtLeader(ctx, epoch, opts)
		return err
	})
	if err != nil || served {
		return res, err
	}
	out := ListResult{Entries: make([]storage.Entry, len(reply.Items)), More: reply.More}
	for i, it := range reply.Items {
		out.Entries[i] = storage.Entry{Key: it.Key, Version: storage.Version(it.Version), Value: it.Value}
	}
	return out, nil
}

// listAtLeader serves a page on the leader of term epoch once every
// partition holds what earlier terms acknowledged: a page spans partitions,
// and a new leader pulls them in the background while it accepts writes.
func (n *Node) listAtLeader(ctx context.Context, epoch uint64, opts ListOptions) (ListResult, error) {
	if n.cfg.Replication != nil {
		if err := n.cfg.Replication.AwaitCaughtUp(ctx, epoch); err != nil {
			return ListResult{}, err
		}
	}
	return n.listLocal(opts)
}

// listLocal reads a page from this node's store. A page also stops before
// it passes transport.PageBytes, so a listing of large values never holds
// more than about one page in memory per hop, and the reply always fits
// what a forwarding peer accepts.
func (n *Node) listLocal(opts ListOptions) (ListResult, error) {
	entries, more, err := n.cfg.Store.Scan(opts.Prefix, opts.After, opts.Limit, transport.PageBytes)
	return ListResult{Entries: entries, More: more}, err
}
