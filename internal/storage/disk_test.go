package storage

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// steadyWorkload is a fixed key set written in rounds: every round
// overwrites each key with a value of a new size and deletes a share of
// them (deleted keys come back the next round), each write under a fresh
// request id as the HTTP layer sends them.
type steadyWorkload struct {
	keys   int
	rounds int
	// size draws a value's size.
	size func(r *rand.Rand) int
	// deleteEvery deletes every n-th key after the round's overwrites.
	deleteEvery int
}

// run applies w to db, calling after(round) once each round is written.
func (w steadyWorkload) run(t testing.TB, db *DB, after func(round int)) {
	t.Helper()
	ctx := context.Background()
	r := rand.New(rand.NewPCG(1, 2))
	pad := make([]byte, 2<<20)
	for i := range pad {
		pad[i] = 'a' + byte(i%26)
	}
	id := 0
	for round := range w.rounds {
		for k := range w.keys {
			n := w.size(r)
			val := append(append([]byte(`"`), pad[:n]...), '"')
			id++
			m := Mutation{Key: fmt.Sprintf("key-%05d", k), Value: val, Epoch: 1, RequestID: "req-" + strconv.Itoa(id)}
			if _, err := db.Apply(ctx, m); err != nil {
				t.Fatal(err)
			}
		}
		for k := 0; k < w.keys; k += w.deleteEvery {
			id++
			m := Mutation{Key: fmt.Sprintf("key-%05d", k), Delete: true, Epoch: 1, RequestID: "req-" + strconv.Itoa(id)}
			if _, err := db.Apply(ctx, m); err != nil {
				t.Fatal(err)
			}
		}
		after(round)
	}
}

func fileSize(t testing.TB, dir string) int64 {
	t.Helper()
	fi, err := os.Stat(filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// TestDisk_SteadyWorkload_Plateaus checks that the file stops growing
// under overwrites and deletes of a fixed key set once bbolt reuses its
// freed pages, with request ids bounded by bytes (their TTL never passes
// in a test this short, so without the bound they alone would grow the
// file every round).
func TestDisk_SteadyWorkload_Plateaus(t *testing.T) {
	const (
		warmUp = 3
		// bbolt grows the file in steps (doubling to 1 GiB), so one more
		// step after warm-up is allowed; a file that kept growing with the
		// rounds would pass it well before the last one.
		factor = 1.5
	)
	dir := t.TempDir()
	// No fsync: page allocation is the same with or without it, and the
	// test stays a few seconds.
	db, err := Open(dir, Options{NoSync: true, MaxRequestBytes: 256 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = db.Close() }()
	w := steadyWorkload{keys: 2000, rounds: 12, deleteEvery: 5, size: func(r *rand.Rand) int { return 64 + r.IntN(4096) }}
	// The high-water mark (the pages bbolt has ever handed out) is the
	// finer measure: the file only moves in bbolt's growth steps.
	var files, used []int64
	start := time.Now()
	w.run(t, db, func(int) {
		files = append(files, fileSize(t, dir))
		used = append(used, db.Size())
	})
	t.Logf("after each round (bytes): file %v, high-water mark %v (%s)", files, used, time.Since(start).Round(time.Millisecond))
	for _, s := range []struct {
		what   string
		sizes  []int64
		factor float64
	}{{"file", files, factor}, {"high-water mark", used, 1.2}} {
		if last, base := s.sizes[len(s.sizes)-1], s.sizes[warmUp-1]; float64(last) > s.factor*float64(base) {
			t.Errorf("%s grew from %d bytes after round %d to %d after round %d, more than %.1fx: it does not plateau", s.what, base, warmUp, last, len(s.sizes), s.factor)
		}
	}
}

// TestDisk_Measure prints the figures DESIGN.md quotes: the file's size
// round by round under the steady workload, with small values only and
// with 1% of values at 1 MiB, and what Compact then makes of it. It takes
// a minute or so and asserts nothing, so it runs only when asked:
//
//	STORE_DISK_MEASURE=1 go test ./internal/storage -run TestDisk_Measure -v
//
// STORE_DISK_ROUNDS (default 12) and STORE_DISK_KEYS (default 2000)
// change the workload's length and key set; with STORE_DISK_DIR each case
// writes its store to a folder there and leaves it, uncompacted, for
// `store compact`.
func TestDisk_Measure(t *testing.T) {
	if os.Getenv("STORE_DISK_MEASURE") == "" {
		t.Skip("set STORE_DISK_MEASURE=1 to measure")
	}
	rounds, keys := 12, 2000
	if n, err := strconv.Atoi(os.Getenv("STORE_DISK_ROUNDS")); err == nil && n > 0 {
		rounds = n
	}
	if n, err := strconv.Atoi(os.Getenv("STORE_DISK_KEYS")); err == nil && n > 0 {
		keys = n
	}
	small := func(r *rand.Rand) int { return 64 + r.IntN(4096) }
	tests := []struct {
		name string
		size func(r *rand.Rand) int
	}{
		{"small values (64 B to 4 KiB)", small},
		{"1% of values 1 MiB", func(r *rand.Rand) int {
			if r.IntN(100) == 0 {
				return 1 << 20
			}
			return small(r)
		}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir, keep := t.TempDir(), os.Getenv("STORE_DISK_DIR")
			if keep != "" {
				dir = filepath.Join(keep, strconv.Itoa(i))
			}
			db, err := Open(dir, Options{NoSync: true, MaxRequestBytes: 256 << 10})
			if err != nil {
				t.Fatal(err)
			}
			w := steadyWorkload{keys: keys, rounds: rounds, deleteEvery: 5, size: tt.size}
			var files []string
			w.run(t, db, func(int) { files = append(files, fmt.Sprintf("%.1f", float64(fileSize(t, dir))/(1<<20))) })
			if err := db.Close(); err != nil {
				t.Fatal(err)
			}
			t.Logf("file MiB after each round: %v", files)
			if keep != "" {
				t.Logf("left in %s", dir)
				return
			}
			res, err := Compact(context.Background(), dir, CompactOptions{})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("compact: %.1f MiB (%.1f MiB free) -> %.1f MiB in %s",
				float64(res.BeforeBytes)/(1<<20), float64(res.FreeBytes)/(1<<20), float64(res.AfterBytes)/(1<<20), res.Took.Round(time.Millisecond))
		})
	}
}
