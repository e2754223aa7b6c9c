package storage

import (
	"context"
	"errors"
	"fmt"
	"testing"
)

// modelEntry is the reference model's view of one key.
type modelEntry struct {
	value   string
	version Version
}

// FuzzDB_MatchesMapModel drives a random sequence of puts, deletes,
// conditional writes, reopens and scans against the real store and an
// in-memory map, and fails on the first difference. Each input byte triple is
// one operation: (op, key, argument).
func FuzzDB_MatchesMapModel(f *testing.F) {
	f.Add([]byte{0, 1, 5, 1, 1, 0, 2, 1, 1, 3, 1, 9, 4, 0, 0, 5, 0, 0})
	f.Add([]byte{3, 2, 0, 0, 2, 1, 3, 2, 0, 1, 2, 0, 6, 0, 0, 2, 2, 1})
	f.Add([]byte{0, 0, 0, 0, 1, 1, 0, 2, 2, 5, 0, 0, 1, 0, 1, 6, 3, 3})
	f.Fuzz(func(t *testing.T, ops []byte) {
		if len(ops) > 3*200 {
			ops = ops[:3*200]
		}
		dir := t.TempDir()
		db, err := Open(dir, Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = db.Close() }()
		keys := []string{"a", "a/b", "b", "c/d/e"}
		model := map[string]modelEntry{}
		var seq uint64
		ctx := context.Background()

		for i := 0; i+2 < len(ops); i += 3 {
			op, key, arg := ops[i]%7, keys[int(ops[i+1])%len(keys)], ops[i+2]
			cur, exists := model[key]
			m := Mutation{Key: key, Value: []byte(fmt.Sprint(arg)), Epoch: 1}
			var wantErr error
			switch op {
			case 0: // plain put
			case 1: // delete
				m.Delete = true
				if !exists {
					wantErr = ErrNotFound
				}
			case 2: // create-only
				m.IfAbsent = true
				if exists {
					wantErr = ErrConditionFailed
				}
			case 3: // compare-and-set against the current or a stale version
				m.IfMatch = cur.version
				if arg%2 == 1 || !exists {
					m.IfMatch = Version{Epoch: 1, Seq: seq + 1 + uint64(arg)}
					wantErr = ErrConditionFailed
				}
			case 4: // update-only
				m.IfExists = true
				if !exists {
					wantErr = ErrConditionFailed
				}
			case 5: // reopen: everything acknowledged must survive
				if err := db.Close(); err != nil {
					t.Fatal(err)
				}
				if db, err = Open(dir, Options{}); err != nil {
					t.Fatal(err)
				}
				continue
			case 6: // scan everything in pages of arg%3+1
				checkScan(t, db, model, int(arg%3)+1)
				continue
			}
			res, err := db.Apply(ctx, m)
			if !errors.Is(err, wantErr) {
				t.Fatalf("op %d %+v: err = %v, want %v", i/3, m, err, wantErr)
			}
			if err == nil {
				seq++
				want := Version{Epoch: 1, Seq: seq}
				if res.Entry.Version != want || res.Created != (!exists && !m.Delete) {
					t.Fatalf("op %d: result %+v, want version %v", i/3, res, want)
				}
				if m.Delete {
					delete(model, key)
				} else {
					model[key] = modelEntry{value: string(m.Value), version: want}
				}
			}
			for _, k := range keys {
				got, err := db.Get(k)
				want, ok := model[k]
				if !ok {
					if !errors.Is(err, ErrNotFound) {
						t.Fatalf("op %d: Get(%q) = %+v, %v; want not found", i/3, k, got, err)
					}
					continue
				}
				if err != nil || string(got.Value) != want.value || got.Version != want.version {
					t.Fatalf("op %d: Get(%q) = %+v, %v; want %+v", i/3, k, got, err, want)
				}
			}
		}
		checkScan(t, db, model, 2)
	})
}

func checkScan(t *testing.T, db *DB, model map[string]modelEntry, page int) {
	t.Helper()
	var got []string
	after := ""
	for {
		es, more, err := db.Scan("", after, page, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range es {
			if w := model[e.Key]; w.value != string(e.Value) {
				t.Fatalf("scan %q = %s, model %s", e.Key, e.Value, w.value)
			}
			got = append(got, e.Key)
		}
		if !more {
			break
		}
		after = es[len(es)-1].Key
	}
	if len(got) != len(model) {
		t.Fatalf("scan saw %v, model has %d keys", got, len(model))
	}
	for i := 1; i < len(got); i++ {
		if got[i-1] >= got[i] {
			t.Fatalf("scan out of order: %v", got)
		}
	}
}
