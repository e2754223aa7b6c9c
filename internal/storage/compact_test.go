package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"
)

// fragmented writes a store in dir whose file is mostly free pages: many
// large values, most of them then deleted, plus request ids.
func fragmented(t *testing.T, dir string) {
	t.Helper()
	db, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	big := []byte(`"` + strings.Repeat("x", 64<<10) + `"`)
	for i := range 200 {
		m := Mutation{Key: fmt.Sprintf("k%03d", i), Value: big, Epoch: 1, RequestID: fmt.Sprintf("req-%d", i)}
		if _, err := db.Apply(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 190 {
		if _, err := db.Apply(ctx, Mutation{Key: fmt.Sprintf("k%03d", i), Delete: true, Epoch: 1}); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
}

// dump reads every bucket, key, value and sequence of the file in dir.
func dump(t *testing.T, dir string) map[string]string {
	t.Helper()
	bdb, err := bolt.Open(filepath.Join(dir, FileName), 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = bdb.Close() }()
	out := map[string]string{}
	err = bdb.View(func(tx *bolt.Tx) error {
		return tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			out[string(name)+"/"] = fmt.Sprint(b.Sequence())
			return b.ForEach(func(k, v []byte) error {
				out[string(name)+"/"+string(k)] = string(v)
				return nil
			})
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestCompact_SameDataSmallerFile(t *testing.T) {
	dir := t.TempDir()
	fragmented(t, dir)
	before := dump(t, dir)

	res, err := Compact(context.Background(), dir, CompactOptions{TxMaxBytes: 256 << 10})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Compacted || res.AfterBytes >= res.BeforeBytes || res.FreeBytes <= 0 {
		t.Fatalf("result %+v: want a compacted, smaller file", res)
	}
	// Ten 64 KiB values are left; the copy holds them and little else.
	if res.AfterBytes > 2<<20 {
		t.Errorf("after = %d bytes, want at most 2 MiB for 10 values of 64 KiB", res.AfterBytes)
	}
	if diff := cmp.Diff(before, dump(t, dir)); diff != "" {
		t.Fatalf("contents changed by compaction (-before +after):\n%s", diff)
	}
	if _, err := os.Stat(filepath.Join(dir, compactTempName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("copy left behind: %v", err)
	}
	// The compacted file opens as a store: reads, request-id replays and
	// new writes all work.
	db := openTest(t, dir)
	if _, err := db.Get("k195"); err != nil {
		t.Fatal(err)
	}
	r, err := db.Apply(context.Background(), Mutation{Key: "k199", Value: []byte(`1`), Epoch: 1, RequestID: "req-199"})
	if err != nil || !r.Replayed {
		t.Fatalf("replay after compaction: %+v, %v", r, err)
	}
	if got := put(t, db, "new", `2`); got.Entry.Version.Seq != 391 {
		t.Errorf("first write after compaction has seq %d, want 391", got.Entry.Version.Seq)
	}
}

func TestCompact_Thresholds(t *testing.T) {
	tests := []struct {
		name string
		opts CompactOptions
		want bool
	}{
		{"no threshold", CompactOptions{}, true},
		{"free ratio met", CompactOptions{MinFreeRatio: 0.5}, true},
		{"free ratio not met", CompactOptions{MinFreeRatio: 0.999}, false},
		{"free bytes not met", CompactOptions{MinFreeRatio: 0.5, MinFreeBytes: 1 << 40}, false},
		{"free bytes met", CompactOptions{MinFreeBytes: 1 << 20}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			fragmented(t, dir)
			res, err := Compact(context.Background(), dir, tt.opts)
			if err != nil {
				t.Fatal(err)
			}
			if res.Compacted != tt.want || (!tt.want && res.AfterBytes != res.BeforeBytes) {
				t.Fatalf("result %+v, want compacted=%v", res, tt.want)
			}
		})
	}
}

func TestCompact_RefusesFileOfRunningStore(t *testing.T) {
	dir := t.TempDir()
	db := openTest(t, dir)
	put(t, db, "k", `1`)
	start := time.Now()
	_, err := Compact(context.Background(), dir, CompactOptions{LockTimeout: 100 * time.Millisecond})
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("err = %v, want ErrLocked", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("refusal took %s, want about the lock timeout", took)
	}
	if got, err := db.Get("k"); err != nil || string(got.Value) != "1" {
		t.Fatalf("store after the refused compaction: %+v, %v", got, err)
	}
}

func TestCompact_CancelledLeavesFileUntouched(t *testing.T) {
	dir := t.TempDir()
	fragmented(t, dir)
	path := filepath.Join(dir, FileName)
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Compact(ctx, dir, CompactOptions{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	after, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Error("a cancelled compaction changed the file")
	}
	if _, err := os.Stat(filepath.Join(dir, compactTempName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("copy left behind: %v", err)
	}
}

func TestCompact_MissingFileIsAnErrorAndCreatesNothing(t *testing.T) {
	dir := t.TempDir()
	if _, err := Compact(context.Background(), dir, CompactOptions{}); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("err = %v, want os.ErrNotExist", err)
	}
	if _, err := os.Stat(filepath.Join(dir, FileName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Compact created %s: %v", FileName, err)
	}
}

func TestOpen_RemovesInterruptedCompactCopy(t *testing.T) {
	dir := t.TempDir()
	tmp := filepath.Join(dir, compactTempName)
	if err := os.WriteFile(tmp, []byte("half a copy"), 0o600); err != nil {
		t.Fatal(err)
	}
	openTest(t, dir)
	if _, err := os.Stat(tmp); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Open left the interrupted copy: %v", err)
	}
}

func TestDB_FileMetrics_ShowWhatCompactWouldFree(t *testing.T) {
	dir := t.TempDir()
	fragmented(t, dir)
	reg := prometheus.NewRegistry()
	db, err := Open(dir, Options{Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	gauge := func(name string) float64 {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == name {
				return mf.GetMetric()[0].GetGauge().GetValue()
			}
		}
		t.Fatalf("no metric %s", name)
		return 0
	}
	file, free := gauge("store_storage_file_bytes"), gauge("store_storage_free_bytes")
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	res, err := Compact(context.Background(), dir, CompactOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if file != float64(fi.Size()) || free != float64(res.FreeBytes) || free < file/2 {
		t.Fatalf("file_bytes %v, free_bytes %v; want %d and Compact's free bytes %d, over half the file", file, free, fi.Size(), res.FreeBytes)
	}
}
