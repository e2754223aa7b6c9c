package replication

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// Peers carries replication's calls to other members: transport.HTTP in a
// real node, transport.InMemClient in tests. A call that never reached the
// peer wraps transport.ErrNotSent; a refusal is a *transport.Error; any
// other error means the peer may have served it.
type Peers interface {
	Replicate(ctx context.Context, to string, b transport.Batch) (transport.BatchReply, error)
	Forget(ctx context.Context, to string, b transport.Batch) (transport.BatchReply, error)
	Digests(ctx context.Context, to string, s transport.Sync) (transport.DigestsReply, error)
	Entries(ctx context.Context, to string, s transport.Sync) (transport.EntriesReply, error)
	ReadIndex(ctx context.Context, to string, r transport.ReadIndex) (transport.ReadIndexReply, error)
}

// ErrInvalidCall means a peer's replication call made no sense (a batch
// without a term, an entry that is not JSON); nothing was applied.
var ErrInvalidCall = errors.New("invalid replication call")

// ErrTermRefused is what a member answers a replication call of a term
// older than one it has admitted: a *StaleError, which also matches
// storage.ErrStaleEpoch.
var ErrTermRefused = errors.New("term refused")

// StaleError is a refusal of the sender's term: this node has admitted a
// newer one, Fence.
type StaleError struct {
	Fence uint64
	Err   error
}

func (e *StaleError) Error() string   { return e.Err.Error() }
func (e *StaleError) Unwrap() []error { return []error{ErrTermRefused, e.Err} }

// FenceEpoch is the newest term the refusing node has admitted (the API
// sends it back to the caller with the refusal).
func (e *StaleError) FenceEpoch() uint64 { return e.Fence }

// refusedTerm reports whether err is a peer's refusal of this node's term,
// and the newer term the peer has seen.
func refusedTerm(err error) (fence uint64, ok bool) {
	if te, isRefusal := errors.AsType[*transport.Error](err); isRefusal && te.Code == "stale_epoch" {
		return te.Fence, true
	}
	if se, isStale := errors.AsType[*StaleError](err); isStale {
		return se.Fence, true
	}
	return 0, false
}

// answered reports whether a call's peer is alive: it answered, and not
// with a failure of its own (a refusal of the term is an answer).
func answered(err error) bool {
	if err == nil {
		return true
	}
	te, ok := errors.AsType[*transport.Error](err)
	return ok && (te.Status < 500 || te.Code == "stale_epoch")
}

func toWire(e storage.Entry) transport.Entry {
	w := transport.Entry{Key: e.Key, Version: transport.Version(e.Version), Deleted: e.Deleted}
	if !e.Deleted {
		w.Value = e.Value
	}
	return w
}

func fromWire(w transport.Entry) (storage.Entry, error) {
	v := storage.Version(w.Version)
	switch {
	case w.Key == "":
		return storage.Entry{}, fmt.Errorf("%w: entry without a key", ErrInvalidCall)
	case v.Epoch == 0 || v.Seq == 0:
		return storage.Entry{}, fmt.Errorf("%w: entry %q without a version", ErrInvalidCall, w.Key)
	case !w.Deleted && !json.Valid(w.Value):
		return storage.Entry{}, fmt.Errorf("%w: entry %q: the value is not JSON", ErrInvalidCall, w.Key)
	}
	return storage.Entry{Key: w.Key, Value: w.Value, Version: v, Deleted: w.Deleted}, nil
}

func fromWireAll(ws []transport.Entry) ([]storage.Entry, error) {
	out := make([]storage.Entry, 0, len(ws))
	for _, w := range ws {
		e, err := fromWire(w)
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, nil
}

// Applier is what a follower needs from its local store. *storage.DB
// implements it.
type Applier interface {
	// ApplyReplicated durably applies newer entries; it refuses an older
	// term with storage.ErrStaleEpoch.
	ApplyReplicated(ctx context.Context, epoch uint64, entries []storage.Entry) (int, error)
	// Forget durably removes the records still exactly at the entries'
	// versions, under the same fence.
	Forget(ctx context.Context, epoch uint64, entries []storage.Entry) (int, error)
	// FenceEpoch is the newest term admitted.
	FenceEpoch() uint64
}

// receiver applies the batches a leader sends: it admits each through the
// fence (an older term, or another leader claiming the current one, is
// refused with a *StaleError) and through the store's durable fence, and
// applies it durably before answering. A refused batch changes nothing. An
// empty batch is a heartbeat. OnAdmit, if set, hears every admitted
// envelope.
type receiver struct {
	DB      Applier
	Fence   *termFence
	OnAdmit func(envelope)
}

// Replicate is the follower's side of a batch.
func (f *receiver) Replicate(ctx context.Context, b transport.Batch) (transport.BatchReply, error) {
	env := b.Envelope
	if env.Epoch == 0 || env.Leader == "" {
		return transport.BatchReply{}, fmt.Errorf("%w: batch without epoch or leader", ErrInvalidCall)
	}
	// Validate before admitting: a malformed batch must not move the fence.
	entries, err := fromWireAll(b.Entries)
	if err != nil {
		return transport.BatchReply{}, err
	}
	if err := f.Fence.Admit(env); err != nil {
		return transport.BatchReply{}, &StaleError{Fence: f.DB.FenceEpoch(), Err: err}
	}
	if f.OnAdmit != nil {
		f.OnAdmit(env)
	}
	if len(entries) == 0 && f.DB.FenceEpoch() >= env.Epoch {
		// A heartbeat of a term already persisted: nothing to sync.
		return transport.BatchReply{Fence: env.Epoch}, nil
	}
	n, err := f.DB.ApplyReplicated(ctx, env.Epoch, entries)
	if errors.Is(err, storage.ErrStaleEpoch) {
		return transport.BatchReply{}, &StaleError{Fence: f.DB.FenceEpoch(), Err: err}
	}
	if err != nil {
		return transport.BatchReply{}, fmt.Errorf("apply batch: %w", err)
	}
	return transport.BatchReply{Applied: n, Fence: f.DB.FenceEpoch()}, nil
}

// Forget is the member's side of the leader's collection (see gc.go): it
// admits the envelope like a batch and removes the records still exactly
// at the entries' versions.
func (f *receiver) Forget(ctx context.Context, b transport.Batch) (transport.BatchReply, error) {
	env := b.Envelope
	if env.Epoch == 0 || env.Leader == "" {
		return transport.BatchReply{}, fmt.Errorf("%w: forget without epoch or leader", ErrInvalidCall)
	}
	entries := make([]storage.Entry, len(b.Entries))
	for i, w := range b.Entries {
		v := storage.Version(w.Version)
		if w.Key == "" || v.Epoch == 0 || v.Seq == 0 {
			return transport.BatchReply{}, fmt.Errorf("%w: forget of an entry without key or version", ErrInvalidCall)
		}
		entries[i] = storage.Entry{Key: w.Key, Version: v, Deleted: w.Deleted}
	}
	if err := f.Fence.Admit(env); err != nil {
		return transport.BatchReply{}, &StaleError{Fence: f.DB.FenceEpoch(), Err: err}
	}
	if f.OnAdmit != nil {
		f.OnAdmit(env)
	}
	n, err := f.DB.Forget(ctx, env.Epoch, entries)
	if errors.Is(err, storage.ErrStaleEpoch) {
		return transport.BatchReply{}, &StaleError{Fence: f.DB.FenceEpoch(), Err: err}
	}
	if err != nil {
		return transport.BatchReply{}, fmt.Errorf("forget: %w", err)
	}
	return transport.BatchReply{Applied: n, Fence: f.DB.FenceEpoch()}, nil
}
