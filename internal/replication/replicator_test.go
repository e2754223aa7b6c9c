package replication

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// follower is a real store behind a receiver on an in-memory network,
// which a test can take down (its calls are never sent) and bring back.
type follower struct {
	db   *storage.DB
	f    *receiver
	down atomic.Bool
}

func newFollower(t *testing.T) *follower {
	t.Helper()
	db, err := storage.Open(t.TempDir(), storage.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return &follower{db: db, f: &receiver{DB: db, Fence: newFence(db.FenceEpoch())}}
}

// onlyBatches serves a receiver's batches and nothing else.
type onlyBatches struct{ *receiver }

func (onlyBatches) Digests(context.Context, transport.Sync) (transport.DigestsReply, error) {
	return transport.DigestsReply{}, ErrInvalidCall
}
func (onlyBatches) Entries(context.Context, transport.Sync) (transport.EntriesReply, error) {
	return transport.EntriesReply{}, ErrInvalidCall
}
func (onlyBatches) ReadIndex(context.Context, transport.ReadIndex) (transport.ReadIndexReply, error) {
	return transport.ReadIndexReply{}, ErrInvalidCall
}

func newTestReplicator(t *testing.T, followers map[string]*follower, onStale func(uint64)) *replicator {
	t.Helper()
	net := transport.NewInMem()
	for id, f := range followers {
		net.Register(id, transport.Services{Replica: onlyBatches{f.f}, ErrorOf: wireError})
	}
	net.SetFault(func(c transport.Call) transport.Fault {
		f, ok := followers[c.To]
		return transport.Fault{Unreachable: ok && f.down.Load()}
	})
	r, err := newReplicator(replicatorConfig{Self: "leader", OnStaleEpoch: onStale, Peers: net.Client("leader")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r
}

func entry(key, val string, epoch, seq uint64) storage.Entry {
	return storage.Entry{Key: key, Value: []byte(val), Version: storage.Version{Epoch: epoch, Seq: seq}}
}

func TestReplicator_Quorum_DurableOnOwnersBeforeReturn(t *testing.T) {
	fs := map[string]*follower{"a": newFollower(t), "b": newFollower(t)}
	r := newTestReplicator(t, fs, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.Replicate(ctx, 1, entry("k", `{"v":1}`, 1, 1), []string{"leader", "a", "b"}, 2); err != nil {
		t.Fatal(err)
	}
	for id, f := range fs {
		got, err := f.db.Get("k")
		if err != nil || string(got.Value) != `{"v":1}` || got.Version != (storage.Version{Epoch: 1, Seq: 1}) {
			t.Fatalf("%s after an acknowledged replicate: %+v %v", id, got, err)
		}
	}
}

// With one follower down, need=1 is met by the other; need=2 times out
// (ErrAckTimeout), and the entry still reaches the follower when it returns.
func TestReplicator_FollowerDown_AckLevelsAndHintedHandoff(t *testing.T) {
	fs := map[string]*follower{"a": newFollower(t), "b": newFollower(t)}
	fs["b"].down.Store(true)
	r := newTestReplicator(t, fs, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.Replicate(ctx, 1, entry("one", "1", 1, 1), []string{"a", "b"}, 1); err != nil {
		t.Fatalf("need 1 with one follower up: %v", err)
	}
	short, cancelShort := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancelShort()
	if err := r.Replicate(short, 1, entry("two", "2", 1, 2), []string{"a", "b"}, 2); !errors.Is(err, ErrAckTimeout) {
		t.Fatalf("need 2 with one follower down: %v", err)
	}
	fs["b"].down.Store(false)
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err1 := fs["b"].db.Get("one")
		_, err2 := fs["b"].db.Get("two")
		if err1 == nil && err2 == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the returning follower did not catch up from the queue")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A follower that has admitted a newer term refuses the old leader: the
// write is not confirmed and the leader is told to step down.
func TestReplicator_StaleEpoch_RefusedAndReported(t *testing.T) {
	fs := map[string]*follower{"a": newFollower(t)}
	if _, err := fs["a"].db.ApplyReplicated(context.Background(), 5, []storage.Entry{entry("x", "5", 5, 1)}); err != nil {
		t.Fatal(err)
	}
	var fenced atomic.Uint64
	r := newTestReplicator(t, fs, func(f uint64) { fenced.Store(f) })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := r.Replicate(ctx, 4, entry("x", "4", 4, 9), []string{"a"}, 1)
	if !errors.Is(err, storage.ErrStaleEpoch) {
		t.Fatalf("replicate from term 4 to a follower at 5: %v", err)
	}
	if fenced.Load() != 5 {
		t.Fatalf("OnStaleEpoch got %d, want 5", fenced.Load())
	}
	if got, _ := fs["a"].db.Get("x"); string(got.Value) != "5" {
		t.Fatalf("the refused batch changed the follower: %s", got.Value)
	}
}

// Many concurrent writers of one key: the follower ends at the newest version
// whatever order batches form in.
func TestReplicator_ConcurrentWrites_FollowerEndsAtNewest(t *testing.T) {
	fs := map[string]*follower{"a": newFollower(t)}
	r := newTestReplicator(t, fs, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for i := 1; i <= 200; i++ {
		wg.Go(func() {
			if err := r.Replicate(ctx, 1, entry("hot", fmt.Sprint(i), 1, uint64(i)), []string{"a"}, 1); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if got, _ := fs["a"].db.Get("hot"); string(got.Value) != "200" || got.Version.Seq != 200 {
		t.Fatalf("follower has %s at %v, want 200", got.Value, got.Version)
	}
}

func TestFollower_RejectsMalformedBatches(t *testing.T) {
	f := newFollower(t)
	env := transport.Envelope{Epoch: 1, Leader: "l"}
	for _, b := range []transport.Batch{
		{Envelope: transport.Envelope{Leader: "l"}},
		{Envelope: transport.Envelope{Epoch: 1}},
		{Envelope: env, Entries: []transport.Entry{{Key: "k", Value: []byte("1")}}},                                                   // no version
		{Envelope: env, Entries: []transport.Entry{{Key: "k", Value: []byte(`{"x"}`), Version: transport.Version{Epoch: 1, Seq: 1}}}}, // not JSON
		{Envelope: env, Entries: []transport.Entry{{Value: []byte("1"), Version: transport.Version{Epoch: 1, Seq: 1}}}},               // no key
	} {
		if _, err := f.f.Replicate(context.Background(), b); !errors.Is(err, ErrInvalidCall) || wireError(err).Status != http.StatusBadRequest {
			t.Errorf("%+v: %v, want a 400 invalid call", b, err)
		}
	}
	if f.db.LastSeq() != 0 || f.db.FenceEpoch() != 0 || f.f.Fence.Highest() != 0 {
		t.Fatal("a malformed batch changed the store or the fence")
	}
}

func TestReplicator_DuplicateOwnersCountOnce_AndCloseUnblocks(t *testing.T) {
	fs := map[string]*follower{"a": newFollower(t)}
	fs["a"].down.Store(true)
	r := newTestReplicator(t, fs, nil)
	done := make(chan error, 1)
	go func() {
		// need 2 from one follower listed twice can never be met.
		done <- r.Replicate(context.Background(), 1, entry("k", "1", 1, 1), []string{"a", "a"}, 2)
	}()
	select {
	case err := <-done:
		if !errors.Is(err, ErrAckTimeout) {
			t.Fatalf("need 2 from one follower: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Replicate did not fail fast for a duplicate owner")
	}
	go func() { done <- r.Replicate(context.Background(), 1, entry("k", "1", 1, 1), []string{"a"}, 1) }()
	r.Close()
	select {
	case err := <-done:
		if !errors.Is(err, ErrAckTimeout) {
			t.Fatalf("Replicate across Close: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Replicate hung after Close")
	}
	if err := r.Replicate(context.Background(), 1, entry("k", "1", 1, 1), []string{"a"}, 1); !errors.Is(err, ErrAckTimeout) {
		t.Fatalf("Replicate after Close: %v", err)
	}
}

// refusesBig refuses, as too large, every batch with more than one entry,
// and any entry whose key is "poison"; it applies the rest.
type refusesBig struct {
	onlyBatches
	calls atomic.Int32
}

func (r *refusesBig) Replicate(ctx context.Context, b transport.Batch) (transport.BatchReply, error) {
	r.calls.Add(1)
	if len(b.Entries) > 1 || (len(b.Entries) == 1 && b.Entries[0].Key == "poison") {
		return transport.BatchReply{}, &transport.Error{Status: http.StatusRequestEntityTooLarge, Code: "value_too_large", Message: "too large"}
	}
	return r.onlyBatches.Replicate(ctx, b)
}

// A batch the follower refuses for its content is never sent again
// unchanged: it is split until its entries go alone, and a single entry the
// follower will not take is left to repair (the follower is marked behind)
// instead of being retried for ever.
func TestReplicator_RefusedBatch_SplitNeverResentUnchanged(t *testing.T) {
	f := newFollower(t)
	svc := &refusesBig{onlyBatches: onlyBatches{f.f}}
	net := transport.NewInMem()
	net.Register("a", transport.Services{Replica: svc})
	r, err := newReplicator(replicatorConfig{Self: "leader", Peers: net.Client("leader")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	// Hold the sender on a first entry, so the next ones queue up and
	// leave together as one batch.
	held := make(chan struct{})
	net.SetFault(func(transport.Call) transport.Fault {
		select {
		case <-held:
			return transport.Fault{}
		default:
			return transport.Fault{Delay: 50 * time.Millisecond}
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var ps []*pending
	for i := range 8 {
		p, _, err := r.Submit(1, entry(fmt.Sprintf("k%d", i), fmt.Sprint(i), 1, uint64(i+1)), []string{"a"}, nil, 1, 1, nil)
		if err != nil {
			t.Fatal(err)
		}
		ps = append(ps, p)
	}
	poison, _, err := r.Submit(1, entry("poison", "1", 1, 9), []string{"a"}, nil, 1, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	close(held)
	for i, p := range ps {
		if err := p.Wait(ctx); err != nil {
			t.Fatalf("entry %d after the batch was refused: %v", i, err)
		}
		if got, err := f.db.Get(fmt.Sprintf("k%d", i)); err != nil || string(got.Value) != fmt.Sprint(i) {
			t.Fatalf("k%d at the follower: %q %v", i, got.Value, err)
		}
	}
	if err := poison.Wait(ctx); !errors.Is(err, ErrAckTimeout) {
		t.Fatalf("an entry the follower refuses alone: %v, want ErrAckTimeout", err)
	}
	if !slices.Contains(r.Behind(), "a") {
		t.Fatal("the follower missed an entry but is not marked behind (repair would not fetch it)")
	}
	// Halving ends: at most one call per entry and per split, never a loop.
	if n := svc.calls.Load(); n <= 9 || n > 2*9 {
		t.Fatalf("%d replicate calls for 9 entries: want more than 9 (a batch of several was refused and split) and at most 18 (never resent unchanged)", n)
	}
}
