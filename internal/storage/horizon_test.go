package storage

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"testing/synctest"
	"time"
)

// The horizon is the seq sampled at least the TTL ago, and moves on as time
// passes; before a TTL has passed since the first sample it is 0.
func TestSeqHorizon(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := NewSeqHorizon(10 * time.Second)
		if got := h.Seq(); got != 0 {
			t.Fatalf("no samples: %d", got)
		}
		steps := []struct {
			sample uint64
			after  time.Duration // then wait this long
			want   uint64
		}{
			{sample: 5, after: 4 * time.Second, want: 0},    // 4s old
			{sample: 9, after: 6 * time.Second, want: 5},    // 5 is 10s old
			{sample: 20, after: 4 * time.Second, want: 9},   // 9 is 10s old
			{sample: 21, after: 30 * time.Second, want: 21}, // all old
		}
		for i, s := range steps {
			h.Sample(s.sample)
			time.Sleep(s.after)
			if got := h.Seq(); got != s.want {
				t.Fatalf("step %d: horizon %d, want %d", i, got, s.want)
			}
		}
	})
}

// CollectLocal removes every tombstone at or below the horizon, across
// pages, and nothing else: newer tombstones and live keys stay, and a
// collected key is still absent and can be created again.
func TestDB_CollectLocal_TombstonesUpToTheHorizonOnly(t *testing.T) {
	db := openTest(t, t.TempDir())
	ctx := context.Background()
	long := strings.Repeat("k", 3000) // 1 MiB of keys is a page: several pages
	for i := range 1000 {
		put(t, db, fmt.Sprintf("%s%04d", long, i), "1")
	}
	for i := range 900 {
		if _, err := db.Apply(ctx, Mutation{Key: fmt.Sprintf("%s%04d", long, i), Delete: true, Epoch: 1}); err != nil {
			t.Fatal(err)
		}
	}
	horizon := db.LastSeq()
	if _, err := db.Apply(ctx, Mutation{Key: fmt.Sprintf("%s%04d", long, 950), Delete: true, Epoch: 1}); err != nil {
		t.Fatal(err)
	}
	n, err := db.CollectLocal(ctx, 1, horizon)
	if err != nil || n != 900 {
		t.Fatalf("collected %d (%v), want the 900 tombstones at or below seq %d", n, err, horizon)
	}
	if got := db.Tombstones(); got != 1 {
		t.Fatalf("%d tombstones left, want the one above the horizon", got)
	}
	if got := db.Keys(); got != 99 {
		t.Fatalf("%d live keys, want 99", got)
	}
	if _, err := db.Get(long + "0001"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a collected key: %v, want %v", err, ErrNotFound)
	}
	res, err := db.Apply(ctx, Mutation{Key: long + "0001", Value: []byte("2"), Epoch: 1, IfAbsent: true})
	if err != nil || !res.Created || res.Entry.Version.Seq <= horizon {
		t.Fatalf("create-only of a collected key: %+v %v, want created above seq %d", res, err, horizon)
	}
}
