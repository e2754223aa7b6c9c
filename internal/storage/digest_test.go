package storage

import (
	"context"
	"fmt"
	"slices"
	"testing"

	"github.com/cespare/xxhash/v2"
)

func partitionedOpts() Options {
	return Options{Partitions: 7, PartitionOf: func(k string) int { return int(xxhash.Sum64String(k) % 7) }}
}

// Replicas that reach the same versions by different paths (local writes
// on one, replicated batches in another order on the other) have equal
// digests, and the digests survive a reopen.
func TestDigests_MatchAcrossPathsAndReopen(t *testing.T) {
	ctx := context.Background()
	dirA := t.TempDir()
	a, err := Open(dirA, partitionedOpts())
	if err != nil {
		t.Fatal(err)
	}
	b, err := Open(t.TempDir(), partitionedOpts())
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	var written []Entry
	for i := range 40 {
		res, err := a.Apply(ctx, Mutation{Key: fmt.Sprintf("k%d", i%25), Value: []byte(fmt.Sprint(i)), Epoch: 3})
		if err != nil {
			t.Fatal(err)
		}
		written = append(written, res.Entry)
	}
	res, err := a.Apply(ctx, Mutation{Key: "k3", Delete: true, Epoch: 3})
	if err != nil {
		t.Fatal(err)
	}
	written = append(written, res.Entry)
	if slices.Equal(a.Digests(), b.Digests()) {
		t.Fatal("digests equal before b holds anything")
	}
	// Newest first: newer-wins must make the older ones no-ops.
	slices.Reverse(written)
	if _, err := b.ApplyReplicated(ctx, 3, written); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(a.Digests(), b.Digests()) {
		t.Fatalf("digests differ after replication:\n%v\n%v", a.Digests(), b.Digests())
	}
	want := a.Digests()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	a, err = Open(dirA, partitionedOpts())
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if got := a.Digests(); !slices.Equal(got, want) {
		t.Fatalf("digests after reopen %v, want %v", got, want)
	}
	// PartitionEntries returns exactly the partition's keys, tombstones too.
	p := a.partition("k3")
	es, err := a.PartitionEntries([]int{p})
	if err != nil {
		t.Fatal(err)
	}
	var sawTomb bool
	for _, e := range es {
		if a.partition(e.Key) != p {
			t.Errorf("entry %s is in partition %d, asked for %d", e.Key, a.partition(e.Key), p)
		}
		sawTomb = sawTomb || (e.Key == "k3" && e.Deleted)
	}
	if !sawTomb {
		t.Error("tombstone of k3 missing from its partition's entries")
	}
}

func TestChanged_ClosesOnCommit(t *testing.T) {
	db, err := Open(t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ch := db.Changed()
	select {
	case <-ch:
		t.Fatal("closed before any commit")
	default:
	}
	if _, err := db.Apply(context.Background(), Mutation{Key: "k", Value: []byte("1"), Epoch: 1}); err != nil {
		t.Fatal(err)
	}
	<-ch // Apply returned after the commit, so this must not block
	e, found, err := db.Lookup("k")
	if err != nil || !found || e.Version.Seq != 1 {
		t.Fatalf("Lookup = %+v, %v, %v", e, found, err)
	}
}

// BeforeSync hands out versions only under a durable reservation, and a
// reopened DB assigns versions above every one handed out.
func TestBeforeSync_ReservedVersionsNeverReused(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	db, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	var early []Version
	apply := func(key string) Result {
		t.Helper()
		var got *Result
		res, err := db.Apply(ctx, Mutation{Key: key, Value: []byte("1"), Epoch: 1, BeforeSync: func(r Result) { got = &r }})
		if err != nil {
			t.Fatal(err)
		}
		if got != nil {
			if got.Entry.Version != res.Entry.Version {
				t.Fatalf("BeforeSync saw %s, Apply returned %s", got.Entry.Version, res.Entry.Version)
			}
			early = append(early, got.Entry.Version)
		}
		return res
	}
	apply("first") // no reservation is durable yet: not early
	if len(early) != 0 {
		t.Fatalf("first commit handed out %v before any reservation was durable", early)
	}
	for i := range 5 {
		apply(fmt.Sprintf("k%d", i))
	}
	if len(early) != 5 {
		t.Fatalf("%d of 5 writes under a durable reservation were handed out early", len(early))
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if db, err = Open(dir, Options{}); err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	res, err := db.Apply(ctx, Mutation{Key: "after", Value: []byte("1"), Epoch: 1})
	if err != nil {
		t.Fatal(err)
	}
	if res.Entry.Version.Seq <= early[len(early)-1].Seq+reserveBlock/2 {
		t.Fatalf("after reopen version %s, not above the reservation covering %s", res.Entry.Version, early[len(early)-1])
	}
}
