package replication

import (
	"context"
	"errors"
	"fmt"

	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// Service is what this node serves to the other members' replication
// calls: batches (receiver), digests, entries and the read index.
func (c *Cluster) Service() transport.ReplicaService { return replicaService{c} }

type replicaService struct{ c *Cluster }

func (s replicaService) Replicate(ctx context.Context, b transport.Batch) (transport.BatchReply, error) {
	return s.c.follower.Replicate(ctx, b)
}

func (s replicaService) Forget(ctx context.Context, b transport.Batch) (transport.BatchReply, error) {
	return s.c.follower.Forget(ctx, b)
}

// authority decides whether a sync request may be answered: a catching up
// leader's envelope must pass the fence; without one, this node must be
// the caught-up leader, whose envelope heads the reply.
func (c *Cluster) authority(ctx context.Context, req transport.Sync) (envelope, error) {
	if req.HasEnvelope {
		env := req.Envelope
		if err := c.admit(env); err != nil {
			return env, &StaleError{Fence: c.fence.Highest(), Err: err}
		}
		// A catching-up leader's term must survive a restart of this node.
		if err := c.persistFence(ctx, env.Epoch); err != nil {
			if errors.Is(err, storage.ErrStaleEpoch) {
				return env, &StaleError{Fence: c.fence.Highest(), Err: err}
			}
			return env, fmt.Errorf("persist the fence of epoch %d: %w", env.Epoch, err)
		}
		return env, nil
	}
	// A follower's repair (no envelope) takes this node's copy as the
	// truth, so only a leader that has pulled every partition answers it:
	// one still catching up would tell an owner that missed a write that
	// nothing is newer, and it would not look again for a minute.
	epoch, open := c.WriteGate()
	if !open || c.gate.caughtUp.Load() != epoch {
		return envelope{}, fmt.Errorf("%w: %s is not a caught-up leader", ErrNotCaughtUp, c.cfg.Self)
	}
	return envelope{Epoch: epoch, Leader: c.cfg.Self}, nil
}

func (s replicaService) Digests(ctx context.Context, req transport.Sync) (transport.DigestsReply, error) {
	env, err := s.c.authority(ctx, req)
	if err != nil {
		return transport.DigestsReply{}, err
	}
	return transport.DigestsReply{Envelope: env, Digests: s.c.cfg.Local.Digests()}, nil
}

// Entries answers one page, of at most about transport.PageBytes: the keys
// and versions of partitions after req.After (VersionsOnly), or the
// entries of a prefix of exactly the keys asked for (Covered says how
// many).
func (s replicaService) Entries(ctx context.Context, req transport.Sync) (transport.EntriesReply, error) {
	env, err := s.c.authority(ctx, req)
	if err != nil {
		return transport.EntriesReply{}, err
	}
	reply := transport.EntriesReply{Envelope: env}
	var entries []storage.Entry
	switch {
	case req.VersionsOnly:
		entries, reply.More, err = s.c.cfg.Local.PartitionVersions(req.Partitions, req.After, transport.PageBytes)
		if err != nil {
			return reply, fmt.Errorf("%w: %w", ErrInvalidCall, err)
		}
	case len(req.Keys) == 0:
		return reply, fmt.Errorf("%w: ask for versions of partitions or for keys", ErrInvalidCall)
	default:
		if entries, reply.Covered, err = s.c.cfg.Local.LookupMany(req.Keys, transport.PageBytes); err != nil {
			return reply, err
		}
	}
	reply.Entries = make([]transport.Entry, len(entries))
	for i, e := range entries {
		reply.Entries[i] = toWire(e)
	}
	return reply, nil
}

// ReadIndex answers the committed version of each key: the leader's
// version once no write to the key is in flight. Every write acknowledged
// before the call is at or below it.
func (s replicaService) ReadIndex(ctx context.Context, req transport.ReadIndex) (transport.ReadIndexReply, error) {
	if len(req.Keys) == 0 {
		return transport.ReadIndexReply{}, fmt.Errorf("%w: a read index needs at least one key", ErrInvalidCall)
	}
	entries, found, epoch, err := s.c.ri.leaderRead(ctx, req.Keys, false)
	if err != nil {
		return transport.ReadIndexReply{}, err
	}
	reply := transport.ReadIndexReply{Envelope: transport.Envelope{Epoch: epoch, Leader: s.c.cfg.Self}, Versions: make([]transport.Version, len(req.Keys))}
	for i := range req.Keys {
		if found[i] {
			reply.Versions[i] = transport.Version(entries[i].Version)
		}
	}
	return reply, nil
}

// note records a call's outcome for member id's liveness.
func (c *Cluster) note(id string, err error) { c.repl.note(id, err) }

// digestsOf asks member id for its digests (env: this node's catch-up
// envelope, or nil for a repair against the leader).
func (c *Cluster) digestsOf(ctx context.Context, id string, env *envelope) (transport.DigestsReply, error) {
	req := transport.Sync{}
	if env != nil {
		req.HasEnvelope, req.Envelope = true, *env
	}
	reply, err := c.cfg.Peers.Digests(ctx, id, req)
	c.note(id, err)
	return reply, err
}

// fetchNewer brings this node level with a peer on the given partitions:
// page by page, it asks for their keys and versions (no values), then for
// the values of exactly the keys the peer holds newer, and applies them
// here in term epoch (newer versions win). Steady-state differences, a few
// keys in flight, thus cost a few keys, not whole partitions, and memory
// stays within a page of versions and a page of values whatever the size
// of the partitions. It returns how many entries changed this node.
func (c *Cluster) fetchNewer(ctx context.Context, from string, env *envelope, epoch uint64, parts []int) (int, error) {
	list := transport.Sync{Partitions: parts, VersionsOnly: true}
	if env != nil {
		list.HasEnvelope, list.Envelope = true, *env
	}
	applied := 0
	for {
		versions, err := c.cfg.Peers.Entries(ctx, from, list)
		c.note(from, err)
		if err != nil {
			return applied, err
		}
		want, err := c.newerThanLocal(from, versions.Entries)
		if err != nil {
			return applied, err
		}
		n, err := c.pullKeys(ctx, from, env, epoch, want)
		applied += n
		if err != nil {
			return applied, err
		}
		if !versions.More {
			return applied, nil
		}
		if len(versions.Entries) == 0 {
			return applied, fmt.Errorf("versions from %s: an empty page that says more follow", from)
		}
		last := versions.Entries[len(versions.Entries)-1].Key
		if last <= list.After {
			return applied, fmt.Errorf("versions from %s: a page ending at %q, not after %q", from, last, list.After)
		}
		list.After = last
	}
}

// newerThanLocal returns the keys of a page of a peer's versions that the
// peer holds newer than this node does.
func (c *Cluster) newerThanLocal(from string, page []transport.Entry) ([]string, error) {
	keys := make([]string, len(page))
	for i, we := range page {
		keys[i] = we.Key
	}
	local, err := c.cfg.Local.LookupVersions(keys)
	if err != nil {
		return nil, err
	}
	have := make(map[string]storage.Version, len(local))
	for _, e := range local {
		have[e.Key] = e.Version
	}
	var want []string
	for _, we := range page {
		v := storage.Version(we.Version)
		if v.IsZero() {
			return nil, fmt.Errorf("versions from %s: %q without a version", from, we.Key)
		}
		if cur, ok := have[we.Key]; !ok || cur.Less(v) {
			want = append(want, we.Key)
		}
	}
	return want, nil
}

// pullKeys fetches the entries of keys from a peer, a page at a time, and
// applies them here in term epoch.
func (c *Cluster) pullKeys(ctx context.Context, from string, env *envelope, epoch uint64, keys []string) (int, error) {
	req := transport.Sync{}
	if env != nil {
		req.HasEnvelope, req.Envelope = true, *env
	}
	// A request of keys stays small too: 1024 keys of at most 4 KiB.
	const chunk = 1024
	applied := 0
	for len(keys) > 0 {
		req.Keys = keys[:min(chunk, len(keys))]
		reply, err := c.cfg.Peers.Entries(ctx, from, req)
		c.note(from, err)
		if err != nil {
			return applied, err
		}
		if reply.Covered < 1 || reply.Covered > len(req.Keys) {
			return applied, fmt.Errorf("entries from %s: a page covering %d of %d keys", from, reply.Covered, len(req.Keys))
		}
		keys = keys[reply.Covered:]
		entries, err := fromWireAll(reply.Entries)
		if err != nil {
			return applied, fmt.Errorf("entries from %s: %w", from, err)
		}
		n, err := c.cfg.Local.ApplyReplicated(ctx, epoch, entries)
		applied += n
		if err != nil {
			return applied, err
		}
	}
	return applied, nil
}

// differing lists the partitions whose digests differ, limited to those
// for which keep returns true.
func differing(mine, theirs []uint64, keep func(int) bool) ([]int, error) {
	if len(mine) != len(theirs) {
		return nil, fmt.Errorf("%w: peer has %d partitions, this node %d (the partition count must match across the cluster)", ErrInvalidRing, len(theirs), len(mine))
	}
	var out []int
	for p := range mine {
		if mine[p] != theirs[p] && keep(p) {
			out = append(out, p)
		}
	}
	return out, nil
}
