package storage

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
)

// compactTempName is the copy Compact writes beside FileName and renames
// over it once complete and fsynced.
const compactTempName = FileName + ".compact"

// CompactOptions configures Compact. The zero value compacts unconditionally.
type CompactOptions struct {
	// MinFreeRatio, when above 0, compacts only if the free part of the
	// file (free pages plus the tail bbolt grew but has not used) is at
	// least this fraction of the file. Below it Compact only measures.
	MinFreeRatio float64

	// MinFreeBytes, when above 0, compacts only if at least this many
	// bytes are free, so a small file is not rewritten for a few pages.
	MinFreeBytes int64

	// LockTimeout bounds the wait for the file lock. Default 1s: a running
	// store holds the lock for its whole life, so waiting longer only
	// delays the refusal.
	LockTimeout time.Duration

	// TxMaxBytes bounds the keys and values copied per write transaction
	// of the copy, so memory stays bounded whatever the file holds.
	// Default 64 MiB.
	TxMaxBytes int64
}

// CompactResult is what Compact measured and did.
type CompactResult struct {
	// Compacted is false when the thresholds of CompactOptions were not met.
	Compacted bool
	// BeforeBytes and AfterBytes are the file's size on disk (equal when
	// nothing was compacted).
	BeforeBytes, AfterBytes int64
	// FreeBytes is what was free in the file before.
	FreeBytes int64
	// Took covers the whole call, lock to directory fsync.
	Took time.Duration
}

// Compact rewrites dir's bbolt file without its free pages: a fresh copy,
// written as bbolt's own Compact does (every bucket and key in order,
// pages filled, transactions bounded by TxMaxBytes), is fsynced and
// renamed over the file, then the directory is fsynced. A crash at any
// point leaves the old file or the new one, never a mix; Open removes a
// copy left behind.
//
// Compact holds the file's lock from start to rename, so it refuses a file
// a running store has open (ErrLocked after LockTimeout) and no store can
// open the file while it runs. If ctx ends first it returns ctx's error,
// removes the copy and leaves the file as it was.
func Compact(ctx context.Context, dir string, opts CompactOptions) (CompactResult, error) {
	start := time.Now()
	if opts.LockTimeout <= 0 {
		opts.LockTimeout = time.Second
	}
	if opts.TxMaxBytes <= 0 {
		opts.TxMaxBytes = 64 << 20
	}
	path := filepath.Join(dir, FileName)
	// bbolt would create a missing file; compacting nothing is a mistake
	// (a wrong --data-dir, most likely).
	fi, err := os.Stat(path)
	if err != nil {
		return CompactResult{}, fmt.Errorf("storage: compact: %w", err)
	}
	src, err := openBolt(path, opts.LockTimeout, true)
	if err != nil {
		return CompactResult{}, fmt.Errorf("storage: compact %s: %w", path, err)
	}
	defer func() { _ = src.Close() }()
	if err := removeCompactTemp(dir); err != nil {
		return CompactResult{}, fmt.Errorf("storage: compact: %w", err)
	}
	res := CompactResult{BeforeBytes: fi.Size(), AfterBytes: fi.Size()}
	var used int64
	res.FreeBytes, used = freeBytes(src, fi.Size())
	if !compactWanted(opts, res.FreeBytes, res.BeforeBytes) {
		res.Took = time.Since(start)
		return res, nil
	}

	tmp := filepath.Join(dir, compactTempName)
	if err := writeCopy(ctx, src, tmp, used, opts.TxMaxBytes); err != nil {
		_ = os.Remove(tmp)
		return CompactResult{}, fmt.Errorf("storage: compact %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return CompactResult{}, fmt.Errorf("storage: compact: %w", err)
	}
	// The rename is durable only once the directory entry is.
	if err := syncDir(dir); err != nil {
		return CompactResult{}, fmt.Errorf("storage: compact: %w", err)
	}
	if fi, err = os.Stat(path); err != nil {
		return CompactResult{}, fmt.Errorf("storage: compact: %w", err)
	}
	res.Compacted, res.AfterBytes, res.Took = true, fi.Size(), time.Since(start)
	return res, nil
}

// compactWanted reports whether free of size bytes passes opts' thresholds.
func compactWanted(opts CompactOptions, free, size int64) bool {
	if opts.MinFreeBytes > 0 && free < opts.MinFreeBytes {
		return false
	}
	if opts.MinFreeRatio > 0 && (size == 0 || float64(free)/float64(size) < opts.MinFreeRatio) {
		return false
	}
	return true
}

// freeBytes returns how much of a file of size bytes holds no live page
// (the freelist, which bbolt rebuilds when it opens a file read-write,
// pages freed but still pinned by a reader, and the tail past the
// high-water mark), and how much does.
func freeBytes(bdb *bolt.DB, size int64) (free, used int64) {
	var hwm int64
	_ = bdb.View(func(tx *bolt.Tx) error {
		hwm = tx.Size()
		return nil
	})
	st := bdb.Stats()
	free = int64(st.FreePageN+st.PendingPageN)*int64(bdb.Info().PageSize) + max(size-hwm, 0)
	return free, max(size-free, 0)
}

// writeCopy copies src into a new bbolt file at path and fsyncs it. The
// copy is written without fsyncs (nothing refers to it until the rename)
// and synced once at the end.
func writeCopy(ctx context.Context, src *bolt.DB, path string, used, txMaxBytes int64) error {
	dst, err := bolt.Open(path, 0o600, &bolt.Options{
		NoSync:         true,
		NoGrowSync:     true,
		NoFreelistSync: true,
		FreelistType:   bolt.FreelistMapType,
		// Mapped once at about its final size instead of remapped as it
		// grows.
		InitialMmapSize: int(min(used, 1<<30)),
	})
	if err != nil {
		return fmt.Errorf("create copy: %w", err)
	}
	if err := copyAll(ctx, dst, src, txMaxBytes); err != nil {
		_ = dst.Close()
		return fmt.Errorf("copy: %w", err)
	}
	if err := dst.Close(); err != nil {
		return fmt.Errorf("close copy: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return fmt.Errorf("fsync copy: %w", err)
	}
	return f.Close()
}

// copyAll is bolt.Compact with a context: bbolt's takes none, and a copy
// of gigabytes must stop when the operator interrupts it. Like bolt.Compact
// it walks every bucket (nested ones too) in key order inside one read
// transaction of src, fills dst's pages completely, and commits whenever
// the next key would take the open transaction past txMaxBytes.
func copyAll(ctx context.Context, dst, src *bolt.DB, txMaxBytes int64) error {
	c := &copier{ctx: ctx, dst: dst, max: txMaxBytes}
	var err error
	if c.tx, err = dst.Begin(true); err != nil {
		return err
	}
	// Rollback after Commit is a no-op error; the deferred call only
	// matters when the copy stops early.
	defer func() {
		if c.tx != nil {
			_ = c.tx.Rollback()
		}
	}()
	if err := src.View(func(stx *bolt.Tx) error {
		return stx.ForEach(func(name []byte, b *bolt.Bucket) error {
			return c.bucket([][]byte{name}, b)
		})
	}); err != nil {
		return err
	}
	return c.tx.Commit()
}

type copier struct {
	ctx       context.Context
	dst       *bolt.DB
	tx        *bolt.Tx
	size, max int64
}

// bucket creates path in dst and copies src's keys and sub-buckets into it.
func (c *copier) bucket(path [][]byte, src *bolt.Bucket) error {
	if err := c.room(int64(len(path[len(path)-1]))); err != nil {
		return err
	}
	var (
		b   *bolt.Bucket
		err error
	)
	if len(path) == 1 {
		b, err = c.tx.CreateBucket(path[0])
	} else {
		b, err = c.open(path[:len(path)-1]).CreateBucket(path[len(path)-1])
	}
	if err != nil {
		return err
	}
	if err := b.SetSequence(src.Sequence()); err != nil {
		return err
	}
	return src.ForEach(func(k, v []byte) error {
		if err := c.ctx.Err(); err != nil {
			return err
		}
		if v == nil {
			// Nil is how ForEach shows a sub-bucket; an empty value (the
			// time index's) may show the same way.
			if sub := src.Bucket(k); sub != nil {
				return c.bucket(append(path[:len(path):len(path)], k), sub)
			}
			v = []byte{}
		}
		if err := c.room(int64(len(k) + len(v))); err != nil {
			return err
		}
		// The bucket is looked up again: room may have started a new
		// transaction, which invalidates the handles of the old one.
		b := c.open(path)
		b.FillPercent = 1.0
		return b.Put(k, v)
	})
}

// room commits the open transaction if n more bytes would take it past
// the bound, and starts the next.
func (c *copier) room(n int64) error {
	if c.size > 0 && c.size+n > c.max {
		if err := c.tx.Commit(); err != nil {
			return err
		}
		var err error
		if c.tx, err = c.dst.Begin(true); err != nil {
			return err
		}
		c.size = 0
	}
	c.size += n
	return nil
}

// open finds path in the open transaction; copyAll created it.
func (c *copier) open(path [][]byte) *bolt.Bucket {
	b := c.tx.Bucket(path[0])
	for _, k := range path[1:] {
		b = b.Bucket(k)
	}
	return b
}

// removeCompactTemp removes a copy an interrupted Compact left in dir. The
// caller must hold the file's lock.
func removeCompactTemp(dir string) error {
	err := os.Remove(filepath.Join(dir, compactTempName))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove an interrupted compaction's copy: %w", err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	if err := d.Sync(); err != nil {
		_ = d.Close()
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return d.Close()
}
