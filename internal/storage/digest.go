package storage

import (
	"encoding/binary"
	"fmt"
	"slices"

	"github.com/cespare/xxhash/v2"
	bolt "go.etcd.io/bbolt"
)

// change is one key's move from version old (zero: absent) to new (zero:
// forgotten), noted by the committer so digests and the tombstone count
// follow every commit.
type change struct {
	key                    string
	old, new               Version
	oldDeleted, newDeleted bool
}

// entryHash is what a (key, version) pair contributes to its partition's
// digest. A version is assigned once, with one value, so two replicas
// holding the same versions of the same keys hold the same data.
func entryHash(key string, v Version) uint64 {
	var b [16]byte
	binary.BigEndian.PutUint64(b[0:8], v.Epoch)
	binary.BigEndian.PutUint64(b[8:16], v.Seq)
	d := xxhash.New()
	_, _ = d.WriteString(key)
	_, _ = d.Write(b[:])
	return d.Sum64()
}

// loadDigests builds the partition digests and counts the live keys and
// tombstones from the file once, at Open; commits keep them current after
// that.
func (db *DB) loadDigests() error {
	var dig []uint64
	if db.opts.Partitions > 0 {
		dig = make([]uint64, db.opts.Partitions)
	}
	live, tombs := 0, 0
	err := db.bolt.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketKV).ForEach(func(k, raw []byte) error {
			v, deleted, ok := recordVersion(raw)
			if !ok {
				return fmt.Errorf("%w: key %q", ErrCorrupt, k)
			}
			if deleted {
				tombs++
			} else {
				live++
			}
			if dig != nil {
				dig[db.partition(string(k))] ^= entryHash(string(k), v)
			}
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("build partition digests: %w", err)
	}
	db.digests, db.live, db.tombstones = dig, live, tombs
	db.metrics.setCounts(live, tombs)
	return nil
}

func (db *DB) partition(key string) int {
	p := db.opts.PartitionOf(key)
	if p < 0 || p >= db.opts.Partitions {
		// A partition function that disagrees with the count is a wiring
		// bug; failing loudly beats silently wrong digests.
		panic(fmt.Sprintf("storage: PartitionOf(%q) = %d, outside [0, %d)", key, p, db.opts.Partitions))
	}
	return p
}

// noteChanges folds a committed transaction's changes into the digests and
// wakes everyone waiting in Changed.
func (db *DB) noteChanges(changes []change) {
	if len(changes) == 0 {
		return
	}
	db.digMu.Lock()
	for _, c := range changes {
		db.count(c.old, c.oldDeleted, -1)
		db.count(c.new, c.newDeleted, +1)
		if db.digests == nil {
			continue
		}
		p := db.partition(c.key)
		if !c.old.IsZero() {
			db.digests[p] ^= entryHash(c.key, c.old)
		}
		if !c.new.IsZero() {
			db.digests[p] ^= entryHash(c.key, c.new)
		}
	}
	db.metrics.setCounts(db.live, db.tombstones)
	close(db.changed)
	db.changed = make(chan struct{})
	db.digMu.Unlock()
}

// count adds by to the live keys or the tombstones for a record at version
// v (zero: no record), under digMu.
func (db *DB) count(v Version, deleted bool, by int) {
	switch {
	case v.IsZero():
	case deleted:
		db.tombstones += by
	default:
		db.live += by
	}
}

// Keys is how many keys this node holds a live (not deleted) record of:
// on a follower, its share of the ring plus any copies not yet collected.
func (db *DB) Keys() int {
	db.digMu.Lock()
	defer db.digMu.Unlock()
	return db.live
}

// Tombstones is how many deleted keys this node still keeps a tombstone of.
func (db *DB) Tombstones() int {
	db.digMu.Lock()
	defer db.digMu.Unlock()
	return db.tombstones
}

// TombstonesUpTo returns a page of the tombstones whose seq is at most
// maxSeq and whose keys sort after the key after, in key order, of at most
// about maxBytes of keys; more reports whether the scan stopped before the
// end of the file. Collection works through the file with it a page per
// round.
func (db *DB) TombstonesUpTo(maxSeq uint64, after string, maxBytes int) (entries []Entry, more bool, err error) {
	err = db.bolt.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketKV).Cursor()
		k, raw := seekAfter(c, after, "")
		size := 0
		for ; k != nil; k, raw = c.Next() {
			v, deleted, ok := recordVersion(raw)
			if !ok {
				return fmt.Errorf("%w: key %q", ErrCorrupt, k)
			}
			if !deleted || v.Seq > maxSeq {
				continue
			}
			if len(entries) > 0 && size+len(k)+versionCost > maxBytes {
				more = true
				return nil
			}
			size += len(k) + versionCost
			entries = append(entries, Entry{Key: string(k), Version: v, Deleted: true})
		}
		return nil
	})
	if err != nil {
		return nil, false, fmt.Errorf("storage: tombstones: %w", err)
	}
	return entries, more, nil
}

// Changed returns a channel that is closed by the next commit that changes
// any key. Readers waiting for a version to arrive select on it instead of
// polling.
func (db *DB) Changed() <-chan struct{} {
	db.digMu.Lock()
	defer db.digMu.Unlock()
	return db.changed
}

// Digests returns one digest per partition: the XOR of a hash of every
// (key, version) stored in it, tombstones included. Two replicas of a
// partition hold the same versions exactly when their digests match (up to
// 64-bit hash collisions). Nil when Options.Partitions is 0.
func (db *DB) Digests() []uint64 {
	db.digMu.Lock()
	defer db.digMu.Unlock()
	return slices.Clone(db.digests)
}

// Lookup returns key's newest entry, tombstones included, and whether the
// key has ever been written (and not forgotten). Replication compares
// versions with it; clients use Get.
func (db *DB) Lookup(key string) (e Entry, found bool, err error) {
	err = db.bolt.View(func(tx *bolt.Tx) error {
		raw := tx.Bucket(bucketKV).Get([]byte(key))
		if raw == nil {
			return nil
		}
		found = true
		e, err = decodeRecord(key, raw)
		return err
	})
	if err != nil {
		return Entry{}, false, fmt.Errorf("storage: lookup: %w", err)
	}
	return e, found, nil
}

// PartitionEntries returns a page of the entries, tombstones included, of
// the given partitions whose keys sort after the key after, in key order,
// stopping before the page's keys and values pass maxBytes (at least one
// entry; maxBytes <= 0 bounds nothing). more reports whether entries remain
// after the last one returned: ask again with after set to its key. The
// pages of one listing read the file once in all, so callers ask for many
// partitions at a time rather than one by one.
func (db *DB) PartitionEntries(parts []int, after string, maxBytes int) (entries []Entry, more bool, err error) {
	return db.scanPartitions(parts, after, maxBytes, true)
}

// PartitionVersions is PartitionEntries without the values: each entry's
// key, version and tombstone flag, for comparing replicas cheaply. maxBytes
// counts keys plus a fixed cost per entry.
func (db *DB) PartitionVersions(parts []int, after string, maxBytes int) (entries []Entry, more bool, err error) {
	return db.scanPartitions(parts, after, maxBytes, false)
}

// versionCost is what an entry without its value counts towards a page.
const versionCost = 24

func (db *DB) scanPartitions(parts []int, after string, maxBytes int, values bool) ([]Entry, bool, error) {
	if db.opts.Partitions == 0 {
		return nil, false, fmt.Errorf("storage: partition scan: %w: the DB keeps no partitions", ErrInvalidMutation)
	}
	want := make([]bool, db.opts.Partitions)
	for _, p := range parts {
		if p < 0 || p >= len(want) {
			return nil, false, fmt.Errorf("storage: partition scan: %w: partition %d outside [0, %d)", ErrInvalidMutation, p, len(want))
		}
		want[p] = true
	}
	var (
		out  []Entry
		more bool
	)
	err := db.bolt.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketKV).Cursor()
		k, raw := seekAfter(c, after, "")
		size := 0
		for ; k != nil; k, raw = c.Next() {
			if !want[db.partition(string(k))] {
				continue
			}
			cost := len(k) + versionCost
			if values {
				cost += len(raw)
			}
			if len(out) > 0 && maxBytes > 0 && size+cost > maxBytes {
				more = true
				return nil
			}
			size += cost
			if values {
				e, err := decodeRecord(string(k), raw)
				if err != nil {
					return err
				}
				out = append(out, e)
				continue
			}
			v, deleted, ok := recordVersion(raw)
			if !ok {
				return fmt.Errorf("%w: key %q", ErrCorrupt, k)
			}
			out = append(out, Entry{Key: string(k), Version: v, Deleted: deleted})
		}
		return nil
	})
	if err != nil {
		return nil, false, fmt.Errorf("storage: partition scan: %w", err)
	}
	return out, more, nil
}

// LookupMany is Lookup for a prefix of keys in one read transaction,
// stopping before the values would pass maxBytes (it always covers at
// least one key; maxBytes <= 0 bounds nothing): covered says how many of
// keys it answered. Keys never written are left out. The sizes are read
// from the file before anything is copied, so a page of large values costs
// what it returns.
func (db *DB) LookupMany(keys []string, maxBytes int) (entries []Entry, covered int, err error) {
	err = db.bolt.View(func(tx *bolt.Tx) error {
		kv := tx.Bucket(bucketKV)
		size := 0
		for _, key := range keys {
			raw := kv.Get([]byte(key))
			if covered > 0 && maxBytes > 0 && size+len(key)+len(raw) > maxBytes {
				return nil
			}
			covered++
			if raw == nil {
				continue
			}
			size += len(key) + len(raw)
			e, err := decodeRecord(key, raw)
			if err != nil {
				return err
			}
			entries = append(entries, e)
		}
		return nil
	})
	if err != nil {
		return nil, 0, fmt.Errorf("storage: lookup many: %w", err)
	}
	return entries, covered, nil
}

// LookupVersions is Lookup without the values, for many keys in one read
// transaction: each written key's version and tombstone flag. Keys never
// written are left out. Comparing versions this way costs the keys, not
// the values.
func (db *DB) LookupVersions(keys []string) ([]Entry, error) {
	out := make([]Entry, 0, len(keys))
	err := db.bolt.View(func(tx *bolt.Tx) error {
		kv := tx.Bucket(bucketKV)
		for _, key := range keys {
			raw := kv.Get([]byte(key))
			if raw == nil {
				continue
			}
			v, deleted, ok := recordVersion(raw)
			if !ok {
				return fmt.Errorf("%w: key %q", ErrCorrupt, key)
			}
			out = append(out, Entry{Key: key, Version: v, Deleted: deleted})
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("storage: lookup versions: %w", err)
	}
	return out, nil
}

// seekAfter positions c at the first key after the key after (from the
// first key with prefix when after is "" or sorts before prefix): where a
// page that ended at after resumes.
func seekAfter(c *bolt.Cursor, after, prefix string) (k, v []byte) {
	if after == "" || after < prefix {
		return c.Seek([]byte(prefix))
	}
	if k, v = c.Seek([]byte(after)); k != nil && string(k) == after {
		k, v = c.Next()
	}
	return k, v
}
