package storage

import (
	"context"
	"fmt"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// oneRequest is what each id of TestDB_RequestIDs_BoundedByBytes costs: id
// "req-NN" (6 bytes) twice, its 25-byte record with key "kNN" (3 bytes),
// and the 8-byte time prefix.
const oneRequest = 6 + 25 + 3 + 8 + 6

func TestDB_RequestIDs_BoundedByBytes(t *testing.T) {
	tests := []struct {
		name     string
		maxBytes int64
		writes   int
		// kept is how many of the newest ids are still recognised.
		kept int
	}{
		{"under the bound: every id kept", 100 * oneRequest, 30, 30},
		{"exactly the bound", 30 * oneRequest, 30, 30},
		{"past the bound: the oldest forgotten first", 10 * oneRequest, 30, 10},
		{"bound below one id: none kept", 1, 5, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			db, err := Open(t.TempDir(), Options{MaxRequestBytes: tt.maxBytes, Registerer: prometheus.NewRegistry()})
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = db.Close() }()
			m := func(i int) Mutation {
				return Mutation{Key: fmt.Sprintf("k%02d", i), Value: []byte(`1`), Epoch: 1, RequestID: fmt.Sprintf("req-%02d", i)}
			}
			for i := range tt.writes {
				if _, err := db.Apply(ctx, m(i)); err != nil {
					t.Fatal(err)
				}
			}
			if got := testutil.ToFloat64(db.metrics.requestBytes); got != float64(tt.kept*oneRequest) {
				t.Errorf("request_id_bytes = %v, want %d", got, tt.kept*oneRequest)
			}
			if got := testutil.ToFloat64(db.metrics.requestsEvicted); got != float64(tt.writes-tt.kept) {
				t.Errorf("request_ids_evicted_total = %v, want %d", got, tt.writes-tt.kept)
			}
			// Newest first: a replay of a kept id writes nothing, so the
			// retries of forgotten ids are the only ones to apply again.
			for i := tt.writes - 1; i >= 0; i-- {
				res, err := db.Apply(ctx, m(i))
				if err != nil {
					t.Fatal(err)
				}
				if want := i >= tt.writes-tt.kept; res.Replayed != want {
					t.Fatalf("retry of id %d: replayed = %v, want %v", i, res.Replayed, want)
				}
			}
		})
	}
}

func TestDB_RequestIDs_BytesCountedOnReopenAndTrimmedToANewBound(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	db, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if _, err := db.Apply(ctx, Mutation{Key: fmt.Sprintf("k%02d", i), Value: []byte(`1`), Epoch: 1, RequestID: fmt.Sprintf("req-%02d", i)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	db, err = Open(dir, Options{MaxRequestBytes: 5 * oneRequest})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = db.Close() }()
	// The committer trims before it takes its first write, so the write
	// below orders after the trim.
	if _, err := db.Apply(ctx, Mutation{Key: "other", Value: []byte(`1`), Epoch: 1}); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(db.metrics.requestBytes); got != 5*oneRequest {
		t.Errorf("request_id_bytes after reopen = %v, want %d", got, 5*oneRequest)
	}
	if got := testutil.ToFloat64(db.metrics.requestsEvicted); got != 15 {
		t.Errorf("request_ids_evicted_total = %v, want 15", got)
	}
}
