package replication

import (
	"context"
	"errors"
	"fmt"

	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// maxPageBytes bounds the values one Entries answer carries: a page of
// keys stops growing once it passes this size (it always holds at least
// one entry), and the caller asks again for the rest.
const maxPageBytes = 8 << 20

// Service is what this node serves to the other members' replication
// calls: batches (receiver), digests, entries and the read index.
func (c *Cluster) Service() transport.ReplicaService { return replicaService{c} }

type replicaService struct{ c *Cluster }

func (s replicaService) Replicate(ctx context.Context, b transport.Batch) (transport.BatchReply, error) {
	return s.c.follower.Replicate(ctx, b)
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
	epoch, open := c.WriteGate()
	if !open {
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

// Entries answers the keys and versions of partitions (VersionsOnly), or
// the entries of exactly the keys asked for, a page of at most about
// maxPageBytes of them.
func (s replicaService) Entries(ctx context.Context, req transport.Sync) (transport.EntriesReply, error) {
	env, err := s.c.authority(ctx, req)
	if err != nil {
		return transport.EntriesReply{}, err
	}
	reply := transport.EntriesReply{Envelope: env}
	switch {
	case req.VersionsOnly:
		entries, err := s.c.cfg.Local.PartitionVersions(req.Partitions)
		if err != nil {
			return reply, fmt.Errorf("%w: %w", ErrInvalidCall, err)
		}
		reply.Entries = make([]transport.Entry, len(entries))
		for i, e := range entries {
			reply.Entries[i] = toWire(e)
		}
		return reply, nil
	case len(req.Keys) == 0:
		return reply, fmt.Errorf("%w: ask for versions of partitions or for keys", ErrInvalidCall)
	}
	// A few keys at a time, so a page of large values stops near the bound.
	const step = 16
	size := 0
	for reply.Covered < len(req.Keys) && (reply.Covered == 0 || size < maxPageBytes) {
		keys := req.Keys[reply.Covered:min(reply.Covered+step, len(req.Keys))]
		entries, err := s.c.cfg.Local.LookupMany(keys)
		if err != nil {
			return reply, err
		}
		for _, e := range entries {
			w := toWire(e)
			size += w.Size()
			reply.Entries = append(reply.Entries, w)
		}
		reply.Covered += len(keys)
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
	entries, found, epoch, err := s.c.ri.leaderRead(ctx, req.Keys)
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
// it asks for their keys and versions first (no values), then for the
// values of exactly the keys the peer holds newer, page by page, and
// applies them here in term epoch (newer versions win). Steady-state
// differences, a few keys in flight, thus cost a few keys, not whole
// partitions. It returns how many entries changed this node.
func (c *Cluster) fetchNewer(ctx context.Context, from string, env *envelope, epoch uint64, parts []int) (int, error) {
	sync := transport.Sync{Partitions: parts, VersionsOnly: true}
	if env != nil {
		sync.HasEnvelope, sync.Envelope = true, *env
	}
	versions, err := c.cfg.Peers.Entries(ctx, from, sync)
	c.note(from, err)
	if err != nil {
		return 0, err
	}
	var want []string
	const chunk = 1024
	for i := 0; i < len(versions.Entries); i += chunk {
		batch := versions.Entries[i:min(i+chunk, len(versions.Entries))]
		keys := make([]string, len(batch))
		for j, we := range batch {
			keys[j] = we.Key
		}
		local, err := c.cfg.Local.LookupMany(keys)
		if err != nil {
			return 0, err
		}
		have := make(map[string]storage.Version, len(local))
		for _, e := range local {
			have[e.Key] = e.Version
		}
		for _, we := range batch {
			v := storage.Version(we.Version)
			if v.IsZero() {
				return 0, fmt.Errorf("versions from %s: %q without a version", from, we.Key)
			}
			if cur, ok := have[we.Key]; !ok || cur.Less(v) {
				want = append(want, we.Key)
			}
		}
	}
	applied := 0
	for len(want) > 0 {
		sync.VersionsOnly, sync.Partitions, sync.Keys = false, nil, want[:min(chunk, len(want))]
		reply, err := c.cfg.Peers.Entries(ctx, from, sync)
		c.note(from, err)
		if err != nil {
			return applied, err
		}
		if reply.Covered < 1 || reply.Covered > len(sync.Keys) {
			return applied, fmt.Errorf("entries from %s: a page covering %d of %d keys", from, reply.Covered, len(sync.Keys))
		}
		want = want[reply.Covered:]
		entries, err := fromWireAll(reply.Entries)
		if err != nil {
			return applied, fmt.Errorf("entries from %s: %w", from, err)
		}
		k, err := c.cfg.Local.ApplyReplicated(ctx, epoch, entries)
		applied += k
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
