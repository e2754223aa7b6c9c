package storage

import (
	"context"
	"encoding/binary"
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// value256 is the value size the project's load figures use.
var value256 = []byte(`"` + string(make([]byte, 254)) + `"`)

// runWriters runs put from the given number of concurrent writers: exactly
// one goroutine for 1, else RunParallel with that many goroutines. ns/op is
// per write across all writers.
func runWriters(b *testing.B, writers int, put func(i int64) error) {
	var n atomic.Int64
	b.ResetTimer()
	if writers == 1 {
		for b.Loop() {
			if err := put(n.Add(1)); err != nil {
				b.Fatal(err)
			}
		}
		return
	}
	b.SetParallelism(max(writers/runtime.GOMAXPROCS(0), 1))
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := put(n.Add(1)); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkPut_GroupCommit measures DB.Apply (group commit, fsync on).
func BenchmarkPut_GroupCommit(b *testing.B) {
	for _, writers := range []int{1, 64} {
		b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) {
			db, err := Open(b.TempDir(), Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer db.Close()
			runWriters(b, writers, func(i int64) error {
				_, err := db.Apply(context.Background(), Mutation{Key: fmt.Sprintf("k%d", i), Value: value256, Epoch: 1})
				return err
			})
		})
	}
}

// BenchmarkPut_NoGroupCommit is the baseline: one bbolt Update (one fsync)
// per write, serialised by bbolt's writer lock.
func BenchmarkPut_NoGroupCommit(b *testing.B) {
	for _, writers := range []int{1, 64} {
		b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) {
			db, err := Open(b.TempDir(), Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer db.Close()
			runWriters(b, writers, func(i int64) error {
				return db.bolt.Update(func(tx *bolt.Tx) error {
					meta := tx.Bucket(bucketMeta)
					seq := readSeq(meta)
					if _, err := applyOne(tx.Bucket(bucketKV), &seq, Mutation{Key: fmt.Sprintf("k%d", i), Value: value256, Epoch: 1}, new([]change)); err != nil {
						return err
					}
					return meta.Put(metaSeq, binary.BigEndian.AppendUint64(nil, seq))
				})
			})
		})
	}
}

func BenchmarkGet(b *testing.B) {
	db, err := Open(b.TempDir(), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	for i := range 1000 {
		if _, err := db.Apply(context.Background(), Mutation{Key: fmt.Sprintf("k%d", i), Value: value256, Epoch: 1}); err != nil {
			b.Fatal(err)
		}
	}
	var n atomic.Int64
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := db.Get(fmt.Sprintf("k%d", n.Add(1)%1000)); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
