package storage

import (
	"context"
	"fmt"
	"slices"
	"strings"
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
	es, _, err := a.PartitionEntries([]int{p}, "", 0)
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

// Paged reads stop before a page passes its byte bound (but always hold
// one entry, so any value is listed), and the pages of a listing cover
// every entry exactly once.
func TestPages_BoundedByBytes_CoverEverythingOnce(t *testing.T) {
	ctx := context.Background()
	db, err := Open(t.TempDir(), partitionedOpts())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var entries []Entry
	for i := range 60 {
		size := 10
		if i%10 == 0 {
			size = 50 << 10 // a value larger than the smallest bound below
		}
		entries = append(entries, Entry{Key: fmt.Sprintf("k%02d", i), Value: []byte(`"` + strings.Repeat("x", size) + `"`), Version: Version{Epoch: 1, Seq: uint64(i + 1)}, Deleted: i%7 == 3})
	}
	if _, err := db.ApplyReplicated(ctx, 1, entries); err != nil {
		t.Fatal(err)
	}
	all := make([]int, 7)
	for p := range all {
		all[p] = p
	}
	type pager func(after string, maxBytes int) (keys []string, size int, more bool, err error)
	cost := func(e Entry, values bool) int {
		if !values {
			return len(e.Key) + versionCost
		}
		return len(e.Key) + len(e.Value) + recordHeader
	}
	partitionPager := func(values bool) pager {
		return func(after string, maxBytes int) ([]string, int, bool, error) {
			page, more, err := db.PartitionVersions(all, after, maxBytes)
			if values {
				page, more, err = db.PartitionEntries(all, after, maxBytes)
			}
			var keys []string
			size := 0
			for _, e := range page {
				keys, size = append(keys, e.Key), size+cost(e, values)
			}
			return keys, size, more, err
		}
	}
	scanPager := func(after string, maxBytes int) ([]string, int, bool, error) {
		page, more, err := db.Scan("", after, 1000, maxBytes)
		var keys []string
		size := 0
		for _, e := range page {
			keys, size = append(keys, e.Key), size+cost(e, true)
		}
		return keys, size, more, err
	}
	live := 0
	for _, e := range entries {
		if !e.Deleted {
			live++
		}
	}
	tests := []struct {
		name     string
		page     pager
		maxBytes int
		want     int // entries listed in all
	}{
		{"versions, 200-byte pages", partitionPager(false), 200, len(entries)},
		{"entries, 1 KiB pages", partitionPager(true), 1 << 10, len(entries)},
		{"entries, 100 KiB pages", partitionPager(true), 100 << 10, len(entries)},
		{"scan, 1 KiB pages", scanPager, 1 << 10, live},
		{"scan, unbounded", scanPager, 0, live},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			seen := map[string]bool{}
			for after, more := "", true; more; {
				keys, size, m, err := tt.page(after, tt.maxBytes)
				if err != nil {
					t.Fatal(err)
				}
				if len(keys) == 0 {
					t.Fatalf("empty page after %q", after)
				}
				if tt.maxBytes > 0 && len(keys) > 1 && size > tt.maxBytes {
					t.Fatalf("page of %d entries, %d bytes, bound %d", len(keys), size, tt.maxBytes)
				}
				for _, k := range keys {
					if seen[k] || k <= after {
						t.Fatalf("%s listed twice or out of order (after %q)", k, after)
					}
					seen[k] = true
				}
				after, more = keys[len(keys)-1], m
			}
			if len(seen) != tt.want {
				t.Fatalf("listed %d entries, want %d", len(seen), tt.want)
			}
		})
	}
	// LookupMany covers a prefix of the keys within the bound, at least one.
	keys := []string{"k00", "k01", "nope", "k10", "k11"}
	got, covered, err := db.LookupMany(keys, 1<<10)
	if err != nil || covered != 1 || len(got) != 1 || got[0].Key != "k00" {
		t.Fatalf("LookupMany with a 1 KiB bound: %d entries covering %d keys, %v; want k00 alone", len(got), covered, err)
	}
	// k10's 50 KiB value would pass the bound: the page stops before it.
	got, covered, err = db.LookupMany(keys[1:], 1<<10)
	if err != nil || covered != 2 || len(got) != 1 {
		t.Fatalf("LookupMany(k01, nope, k10, k11) with a 1 KiB bound: %d entries covering %d keys, %v; want k01 covering 2", len(got), covered, err)
	}
}

// The live-key and tombstone counts (store_storage_keys and
// store_storage_tombstones) follow every kind of commit, and a reopen
// counts the same from the file.
func TestCounts_FollowEveryCommitAndReopen(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	db, err := Open(dir, partitionedOpts())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = db.Close() }()
	var last Result
	for _, tc := range []struct {
		name             string
		do               func() error
		live, tombstones int
	}{
		{"two puts", func() error {
			put(t, db, "a", "1")
			last = put(t, db, "b", "1")
			return nil
		}, 2, 0},
		{"an overwrite", func() error { put(t, db, "a", "2"); return nil }, 2, 0},
		{"a delete", func() error {
			var err error
			last, err = db.Apply(ctx, Mutation{Key: "b", Delete: true, Epoch: 1})
			return err
		}, 1, 1},
		{"a replicated tombstone of a key never held", func() error {
			_, err := db.ApplyReplicated(ctx, 2, []Entry{{Key: "never", Version: Version{2, 99}, Deleted: true}})
			return err
		}, 1, 2},
		{"a replicated put over a tombstone", func() error {
			_, err := db.ApplyReplicated(ctx, 2, []Entry{{Key: "never", Value: []byte("3"), Version: Version{2, 100}}})
			return err
		}, 2, 1},
		{"a replicated older put changes nothing", func() error {
			_, err := db.ApplyReplicated(ctx, 2, []Entry{{Key: "b", Value: []byte("0"), Version: Version{1, 1}}})
			return err
		}, 2, 1},
		{"forget of the tombstone", func() error {
			_, err := db.Forget(ctx, 2, []Entry{last.Entry})
			return err
		}, 2, 0},
		{"forget of a version no longer held changes nothing", func() error {
			_, err := db.Forget(ctx, 2, []Entry{{Key: "a", Version: Version{1, 1}}})
			return err
		}, 2, 0},
		{"forget of a live copy", func() error {
			_, err := db.Forget(ctx, 2, []Entry{{Key: "never", Version: Version{2, 100}}})
			return err
		}, 1, 0},
	} {
		if err := tc.do(); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if live, tombs := db.Keys(), db.Tombstones(); live != tc.live || tombs != tc.tombstones {
			t.Fatalf("after %s: %d live keys and %d tombstones, want %d and %d", tc.name, live, tombs, tc.live, tc.tombstones)
		}
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if db, err = Open(dir, partitionedOpts()); err != nil {
		t.Fatal(err)
	}
	if live, tombs := db.Keys(), db.Tombstones(); live != 1 || tombs != 0 {
		t.Fatalf("after reopen: %d live keys and %d tombstones, want 1 and 0", live, tombs)
	}
}
