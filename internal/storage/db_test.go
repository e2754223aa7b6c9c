package storage

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	bolt "go.etcd.io/bbolt"
)

func openTest(t testing.TB, dir string) *DB {
	t.Helper()
	db, err := Open(dir, Options{})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db
}

func put(t testing.TB, db *DB, key, value string) Result {
	t.Helper()
	res, err := db.Apply(context.Background(), Mutation{Key: key, Value: []byte(value), Epoch: 1})
	if err != nil {
		t.Fatalf("put %q: %v", key, err)
	}
	return res
}

func TestDB_PutGet_CopiesOut(t *testing.T) {
	db := openTest(t, t.TempDir())
	in := []byte(`{"a":1}`)
	res, err := db.Apply(context.Background(), Mutation{Key: "k", Value: in, Epoch: 3})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Created || res.Entry.Version != (Version{Epoch: 3, Seq: 1}) {
		t.Fatalf("result = %+v, want created at 3.1", res)
	}
	in[0] = 'X' // the caller's buffer must not alias the stored value
	got, err := db.Get("k")
	if err != nil {
		t.Fatal(err)
	}
	if string(got.Value) != `{"a":1}` {
		t.Fatalf("value = %s", got.Value)
	}
	got.Value[0] = 'Y' // nor may a returned value alias the store
	again, _ := db.Get("k")
	if string(again.Value) != `{"a":1}` {
		t.Fatalf("value after caller mutation = %s", again.Value)
	}
}

func TestDB_Conditions(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name    string
		seed    bool // key exists at version 1.1 before the mutation
		m       Mutation
		wantErr error
		wantCur Version
	}{
		{"if-absent on missing key writes", false, Mutation{IfAbsent: true}, nil, Version{}},
		{"if-absent on existing key fails", true, Mutation{IfAbsent: true}, ErrConditionFailed, Version{1, 1}},
		{"if-exists on missing key fails", false, Mutation{IfExists: true}, ErrConditionFailed, Version{}},
		{"if-exists on existing key writes", true, Mutation{IfExists: true}, nil, Version{}},
		{"if-match current writes", true, Mutation{IfMatch: Version{1, 1}}, nil, Version{}},
		{"if-match stale fails", true, Mutation{IfMatch: Version{1, 7}}, ErrConditionFailed, Version{1, 1}},
		{"if-match on missing key fails", false, Mutation{IfMatch: Version{1, 1}}, ErrConditionFailed, Version{}},
		{"delete missing key is not found", false, Mutation{Delete: true}, ErrNotFound, Version{}},
		{"delete with stale if-match fails", true, Mutation{Delete: true, IfMatch: Version{2, 1}}, ErrConditionFailed, Version{1, 1}},
		{"delete with current if-match deletes", true, Mutation{Delete: true, IfMatch: Version{1, 1}}, nil, Version{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			db := openTest(t, t.TempDir())
			if tt.seed {
				put(t, db, "k", `"seed"`)
			}
			m := tt.m
			m.Key, m.Epoch, m.Value = "k", 1, []byte(`"new"`)
			_, err := db.Apply(ctx, m)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if errors.Is(err, ErrConditionFailed) {
				var ce *ConditionError
				if !errors.As(err, &ce) || ce.Current != tt.wantCur {
					t.Fatalf("condition error = %#v, want current %v", err, tt.wantCur)
				}
			}
			// A failed mutation changes nothing, not even the sequence.
			if err != nil {
				want := uint64(0)
				if tt.seed {
					want = 1
				}
				if got := db.LastSeq(); got != want {
					t.Fatalf("LastSeq after failure = %d, want %d", got, want)
				}
			}
		})
	}
}

func TestDB_Delete_TombstoneHidesKeyAndKeepsOrder(t *testing.T) {
	db := openTest(t, t.TempDir())
	put(t, db, "a", "1")
	res, err := db.Apply(context.Background(), Mutation{Key: "a", Delete: true, Epoch: 1})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Entry.Deleted || res.Entry.Version != (Version{1, 2}) {
		t.Fatalf("delete result = %+v", res)
	}
	if _, err := db.Get("a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get after delete: %v", err)
	}
	if got, _, _ := db.Scan("", "", 10, 0); len(got) != 0 {
		t.Fatalf("Scan shows tombstone: %+v", got)
	}
	// Re-creating gets a higher version than the tombstone.
	if res := put(t, db, "a", "2"); !res.Created || res.Entry.Version != (Version{1, 3}) {
		t.Fatalf("recreate = %+v", res)
	}
}

func TestDB_Scan_PrefixAfterLimit(t *testing.T) {
	db := openTest(t, t.TempDir())
	for _, k := range []string{"a", "b/1", "b/2", "b/3", "b/4", "c"} {
		put(t, db, k, "0")
	}
	if _, err := db.Apply(context.Background(), Mutation{Key: "b/2", Delete: true, Epoch: 1}); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		prefix, after string
		limit         int
		want          []string
		more          bool
	}{
		{"", "", 100, []string{"a", "b/1", "b/3", "b/4", "c"}, false},
		{"b/", "", 2, []string{"b/1", "b/3"}, true},
		{"b/", "b/3", 2, []string{"b/4"}, false},
		{"b/", "b/1", 2, []string{"b/3", "b/4"}, false},
		{"b/", "a", 10, []string{"b/1", "b/3", "b/4"}, false},
		{"b/", "zzz", 10, nil, false},
		{"x", "", 10, nil, false},
		{"", "b/4", 1, []string{"c"}, false},
		{"", "", 0, nil, false},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s|%s|%d", tt.prefix, tt.after, tt.limit), func(t *testing.T) {
			got, more, err := db.Scan(tt.prefix, tt.after, tt.limit, 0)
			if err != nil {
				t.Fatal(err)
			}
			var keys []string
			for _, e := range got {
				keys = append(keys, e.Key)
			}
			if diff := cmp.Diff(tt.want, keys); diff != "" || more != tt.more {
				t.Fatalf("keys (-want +got):\n%s more=%v want %v", diff, more, tt.more)
			}
		})
	}
}

func TestDB_Reopen_KeepsDataAndSequence(t *testing.T) {
	dir := t.TempDir()
	db, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	put(t, db, "k", `[1,2]`)
	put(t, db, "k", `[3]`)
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := db.Apply(context.Background(), Mutation{Key: "k", Epoch: 1}); !errors.Is(err, ErrClosed) {
		t.Fatalf("Apply after Close: %v", err)
	}

	db = openTest(t, dir)
	e, err := db.Get("k")
	if err != nil || string(e.Value) != `[3]` || e.Version != (Version{1, 2}) {
		t.Fatalf("after reopen: %+v, %v", e, err)
	}
	if res := put(t, db, "other", "null"); res.Entry.Version.Seq != 3 {
		t.Fatalf("sequence restarted: %v", res.Entry.Version)
	}
}

func TestOpen_Errors(t *testing.T) {
	t.Run("second process is refused while the first holds the lock", func(t *testing.T) {
		dir := t.TempDir()
		openTest(t, dir)
		_, err := Open(dir, Options{LockTimeout: 50e6})
		if !errors.Is(err, ErrLocked) {
			t.Fatalf("err = %v, want ErrLocked", err)
		}
	})
	t.Run("unknown format is refused", func(t *testing.T) {
		dir := t.TempDir()
		db, err := Open(dir, Options{})
		if err != nil {
			t.Fatal(err)
		}
		if err := db.bolt.Update(func(tx *bolt.Tx) error {
			return tx.Bucket(bucketMeta).Put(metaFormat, []byte("99"))
		}); err != nil {
			t.Fatal(err)
		}
		_ = db.Close()
		if _, err := Open(dir, Options{}); !errors.Is(err, ErrUnsupportedFormat) {
			t.Fatalf("err = %v, want ErrUnsupportedFormat", err)
		}
	})
	t.Run("data dir that is a file", func(t *testing.T) {
		f := filepath.Join(t.TempDir(), "file")
		if err := os.WriteFile(f, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := Open(f, Options{}); err == nil {
			t.Fatal("Open on a file succeeded")
		}
	})
}

func TestDB_InvalidMutation(t *testing.T) {
	db := openTest(t, t.TempDir())
	for _, m := range []Mutation{
		{Key: "", Epoch: 1},
		{Key: "k", Epoch: 0},
		{Key: "k", Epoch: 1, IfAbsent: true, IfExists: true},
	} {
		if _, err := db.Apply(context.Background(), m); !errors.Is(err, ErrInvalidMutation) {
			t.Errorf("Apply(%+v) = %v, want ErrInvalidMutation", m, err)
		}
	}
}

// Concurrent compare-and-set loops on one key: group commit must evaluate each
// condition against the writes before it, so no increment is lost.
func TestDB_GroupCommit_ConcurrentCASLosesNothing(t *testing.T) {
	reg := prometheus.NewRegistry()
	db, err := Open(t.TempDir(), Options{Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	put(t, db, "counter", "0")

	const workers, each = 8, 25
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for done := 0; done < each; {
				cur, err := db.Get("counter")
				if err != nil {
					t.Error(err)
					return
				}
				var n int
				fmt.Sscan(string(cur.Value), &n)
				_, err = db.Apply(context.Background(), Mutation{
					Key: "counter", Value: []byte(fmt.Sprint(n + 1)), Epoch: 1, IfMatch: cur.Version,
				})
				switch {
				case err == nil:
					done++
				case !errors.Is(err, ErrConditionFailed):
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	got, _ := db.Get("counter")
	if string(got.Value) != fmt.Sprint(workers*each) {
		t.Fatalf("counter = %s, want %d", got.Value, workers*each)
	}
	if n := testutil.CollectAndCount(reg, "store_storage_commit_batch_size"); n != 1 {
		t.Fatalf("batch size metric series = %d", n)
	}
}

func TestDB_Apply_ContextCancelledBeforeCommitReportsUnknown(t *testing.T) {
	db := openTest(t, t.TempDir())
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := db.Apply(ctx, Mutation{Key: "k", Value: []byte("1"), Epoch: 1})
	// Either the commit won the race (nil) or the caller was told the
	// outcome is unknown; never a plain failure that hides a write.
	if err != nil && !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v", err)
	}
}

func TestParseVersion(t *testing.T) {
	tests := []struct {
		in   string
		want Version
		ok   bool
	}{
		{"1.1", Version{1, 1}, true},
		{"18446744073709551615.2", Version{18446744073709551615, 2}, true},
		{"0.1", Version{}, false},
		{"1.0", Version{}, false},
		{"1", Version{}, false},
		{"a.b", Version{}, false},
		{"1.2.3", Version{}, false},
		{"", Version{}, false},
		{"-1.2", Version{}, false},
	}
	for _, tt := range tests {
		got, err := ParseVersion(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("ParseVersion(%q) = %v, %v; want %v ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
		if err != nil && !errors.Is(err, ErrBadVersion) {
			t.Errorf("ParseVersion(%q) error %v is not ErrBadVersion", tt.in, err)
		}
		if tt.ok && got.String() != tt.in {
			t.Errorf("round trip %q -> %q", tt.in, got.String())
		}
	}
	if !(Version{1, 9}).Less(Version{2, 1}) || (Version{2, 1}).Less(Version{1, 9}) || !(Version{1, 1}).Less(Version{1, 2}) {
		t.Error("Less does not order by (epoch, seq)")
	}
}

func TestDB_RequestID_RetryIsNotAppliedTwice(t *testing.T) {
	db := openTest(t, t.TempDir())
	ctx := context.Background()
	m := Mutation{Key: "k", Value: []byte("1"), Epoch: 1, RequestID: "req-1"}
	first, err := db.Apply(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	m.Value = []byte("2") // a retry carries the same id; its body is ignored
	again, err := db.Apply(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	if !again.Replayed || again.Entry.Version != first.Entry.Version || again.Created != first.Created {
		t.Fatalf("retry = %+v, first = %+v", again, first)
	}
	if got, _ := db.Get("k"); string(got.Value) != "1" || db.LastSeq() != 1 {
		t.Fatalf("retry changed the store: %s seq %d", got.Value, db.LastSeq())
	}
	if _, err := db.Apply(ctx, Mutation{Key: "other", Value: []byte("1"), Epoch: 1, RequestID: "req-1"}); !errors.Is(err, ErrRequestIDReused) {
		t.Fatalf("same id on another key: %v", err)
	}
	// Once forgotten, the id is free again.
	db.sweepRequests(time.Now().Add(time.Hour))
	if res, err := db.Apply(ctx, m); err != nil || res.Replayed || res.Entry.Version.Seq != 2 {
		t.Fatalf("after sweep: %+v, %v", res, err)
	}
}

func TestDB_ApplyReplicated_NewerVersionWins(t *testing.T) {
	db := openTest(t, t.TempDir())
	ctx := context.Background()
	e := func(key, val string, epoch, seq uint64, del bool) Entry {
		return Entry{Key: key, Value: []byte(val), Version: Version{epoch, seq}, Deleted: del}
	}
	n, err := db.ApplyReplicated(ctx, 2, []Entry{e("a", "1", 2, 10, false), e("b", "1", 2, 11, false)})
	if err != nil || n != 2 {
		t.Fatalf("first batch: %d, %v", n, err)
	}
	// A re-sent batch and an older version change nothing; a newer one wins,
	// even within the same batch as an older one.
	n, err = db.ApplyReplicated(ctx, 2, []Entry{e("a", "1", 2, 10, false), e("a", "old", 1, 99, false), e("b", "2", 2, 12, false), e("b", "stale", 2, 11, false)})
	if err != nil || n != 1 {
		t.Fatalf("second batch applied %d (want 1), %v", n, err)
	}
	if got, _ := db.Get("b"); string(got.Value) != "2" || got.Version != (Version{2, 12}) {
		t.Fatalf("b = %s at %v", got.Value, got.Version)
	}
	// A replicated tombstone deletes; a late older put does not resurrect.
	if _, err := db.ApplyReplicated(ctx, 3, []Entry{e("a", "", 3, 1, true)}); err != nil {
		t.Fatal(err)
	}
	if _, err := db.ApplyReplicated(ctx, 3, []Entry{e("a", "zombie", 2, 50, false)}); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Get("a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a after tombstone and a late older put: %v", err)
	}
	if db.LastSeq() != 12 {
		t.Fatalf("LastSeq = %d, want the highest replicated seq 12", db.LastSeq())
	}
}

// Once a node has admitted term 5, term 4 can neither replicate to it nor
// write on it, and the mark survives a restart.
func TestDB_Fence_StaleEpochRefusedAndPersisted(t *testing.T) {
	dir := t.TempDir()
	db, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := db.ApplyReplicated(ctx, 5, []Entry{{Key: "k", Value: []byte("5"), Version: Version{5, 1}}}); err != nil {
		t.Fatal(err)
	}
	before := db.LastSeq()
	if _, err := db.ApplyReplicated(ctx, 4, []Entry{{Key: "other", Value: []byte("4"), Version: Version{4, 9}}}); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("replication from term 4: %v", err)
	}
	if _, err := db.Apply(ctx, Mutation{Key: "local", Value: []byte("4"), Epoch: 4}); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("local write in term 4: %v", err)
	}
	if _, err := db.Get("other"); !errors.Is(err, ErrNotFound) || db.LastSeq() != before {
		t.Fatal("a refused batch changed the store")
	}
	_ = db.Close()
	db = openTest(t, dir)
	if db.FenceEpoch() != 5 {
		t.Fatalf("fence after restart = %d", db.FenceEpoch())
	}
	if _, err := db.Apply(ctx, Mutation{Key: "local", Value: []byte("4"), Epoch: 4}); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("local write in term 4 after restart: %v", err)
	}
	if _, err := db.Apply(ctx, Mutation{Key: "local", Value: []byte("6"), Epoch: 6}); err != nil {
		t.Fatalf("term 6: %v", err)
	}
	if db.FenceEpoch() != 6 {
		t.Fatalf("fence = %d after a term-6 write", db.FenceEpoch())
	}
}

// Limits are checked before anything is written, so no write can fail half
// way through a batch and leave part of itself behind.
func TestDB_Limits_RefusedWholeBeforeWriting(t *testing.T) {
	db := openTest(t, t.TempDir())
	ctx := context.Background()
	long := strings.Repeat("k", MaxKeyBytes+1)
	for _, m := range []Mutation{
		{Key: long, Value: []byte("1"), Epoch: 1},
		{Key: "k", Value: []byte("1"), Epoch: 1, RequestID: strings.Repeat("r", MaxRequestIDBytes+1)},
	} {
		if _, err := db.Apply(ctx, m); !errors.Is(err, ErrInvalidMutation) {
			t.Fatalf("Apply(key %d B, id %d B) = %v", len(m.Key), len(m.RequestID), err)
		}
	}
	_, err := db.ApplyReplicated(ctx, 1, []Entry{
		{Key: "ok", Value: []byte("1"), Version: Version{1, 1}},
		{Key: long, Value: []byte("1"), Version: Version{1, 2}},
	})
	if !errors.Is(err, ErrInvalidMutation) {
		t.Fatalf("batch with an oversized key: %v", err)
	}
	if _, err := db.Get("ok"); !errors.Is(err, ErrNotFound) || db.LastSeq() != 0 {
		t.Fatal("a refused batch left an entry behind")
	}
}
