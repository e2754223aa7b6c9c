package storage

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// FormatVersion is the on-disk format this binary writes and reads. Bump it
// (and add a migration in Open) whenever DESIGN.md's layout changes.
const FormatVersion = 1

// Limits the store enforces itself, well below bbolt's 32 KiB key limit, so
// no write can fail half-way through a batch.
const (
	MaxKeyBytes       = 4096
	MaxRequestIDBytes = 256
)

// FileName is the bbolt file inside the data directory.
const FileName = "store.db"

var (
	bucketMeta     = []byte("meta")
	bucketKV       = []byte("kv")
	bucketRequests = []byte("requests")
	// requests_by_time indexes request ids by when they were applied, so the
	// sweep walks only what expired.
	bucketRequestsByTime = []byte("requests_by_time")

	metaFormat = []byte("format")
	metaSeq    = []byte("seq")
	// seq_reserved bounds every seq handed out before its commit was
	// fsynced (Mutation.BeforeSync); after a crash the counter resumes
	// above it, so no version can be assigned twice.
	metaReserved = []byte("seq_reserved")
	metaFence    = []byte("fence_epoch")
)

// Options configures Open. The zero value is usable.
type Options struct {
	// MaxBatch caps how many mutations share one commit (one fsync).
	// Default 1024.
	MaxBatch int

	// NoSync turns fsync off. Only benchmarks that measure the cost of fsync
	// set it; the store itself never does.
	NoSync bool

	// Registerer receives the storage metrics; nil registers nothing.
	Registerer prometheus.Registerer

	// LockTimeout bounds the wait for the file lock held by another process.
	// Default 2s.
	LockTimeout time.Duration

	// RequestTTL is how long a mutation's RequestID is remembered, i.e. the
	// window in which a retried write is recognised and not applied twice.
	// Default 10 minutes.
	RequestTTL time.Duration

	// MaxRequestBytes bounds the request-id records kept (both buckets,
	// keys and values). Past it the oldest ids are forgotten before their
	// RequestTTL, so a burst of writes cannot grow the window without
	// limit; a retry of an id forgotten early is applied again. Default
	// 64 MiB (some 400 000 ids of 36 bytes on 64-byte keys).
	MaxRequestBytes int64

	// Partitions and PartitionOf let replicas compare their contents
	// cheaply: the DB keeps one digest per partition (see Digests). Zero
	// Partitions keeps none (a single node needs none).
	Partitions  int
	PartitionOf func(key string) int
}

// Mutation is one write: a put of Value, or a delete, under an optional
// precondition.
type Mutation struct {
	Key   string
	Value []byte // ignored for deletes
	// Delete writes a tombstone. Deleting a missing key fails with
	// ErrNotFound and writes nothing.
	Delete bool
	// Epoch is the leadership term assigning the version; must be > 0.
	Epoch uint64
	// IfMatch, when non-zero, requires the key's live version to equal it.
	IfMatch Version
	// IfExists requires the key to exist (HTTP If-Match: *).
	IfExists bool
	// IfAbsent requires the key not to exist (HTTP If-None-Match: *).
	IfAbsent bool
	// RequestID, when set, makes the mutation idempotent: applying a
	// mutation whose RequestID was already applied (within RequestTTL)
	// writes nothing and returns the first result with Replayed set.
	RequestID string
	// BeforeSync, if set, may be called with the mutation's result after it
	// is applied in its transaction and before that transaction is fsynced,
	// so the caller can start replicating while the disk syncs. It runs on
	// the committer goroutine and must not block. It is not called for a
	// replayed or failed mutation, nor when the version is not yet covered
	// by a durable reservation (then the caller learns the result from
	// Apply as usual). If the commit then fails, Apply returns an error
	// wrapping ErrSyncFailed: the version was handed out but is not durable
	// here.
	BeforeSync func(Result)
}

// Result is the outcome of an applied Mutation.
type Result struct {
	Entry Entry
	// Created is true when the key had no live value before a put.
	Created bool
	// Replayed is true when the RequestID had been applied before and this
	// result is the remembered one. Entry.Value is not filled in then.
	Replayed bool
}

// DB is the durable key-value store on one bbolt file. Reads run in their own
// read transactions; writes go through a single committer goroutine that
// groups whatever arrived while the previous commit was syncing into the next
// transaction (group commit). A lone writer therefore pays one fsync and no
// added delay, and many writers share fsyncs.
//
// All methods are safe for concurrent use.
type DB struct {
	bolt    *bolt.DB
	opts    Options
	metrics *metrics

	mu     sync.RWMutex // guards closed against sends on reqs
	closed bool
	reqs   chan *request
	done   chan struct{}

	// Owned by the committer goroutine: reserved is the seq bound durable
	// on disk; seqFloor keeps versions handed out by BeforeSync from being
	// assigned again after a failed commit.
	reserved, seqFloor uint64
	// requestBytes is what the request-id records hold (see
	// requestRecordBytes), also owned by the committer once Open returns.
	requestBytes int64

	// digests and the change broadcast; see digest.go. live counts the
	// keys held undeleted and tombstones the deleted keys still kept,
	// under digMu.
	digMu      sync.Mutex
	digests    []uint64
	live       int
	tombstones int
	changed    chan struct{}
}

// request is one unit of work for the committer: a local Mutation, or (when
// repl is set) a batch of replicated entries.
type request struct {
	m     Mutation
	repl  *replBatch
	res   Result
	err   error
	early bool // m.BeforeSync was called
	done  chan struct{}
}

type replBatch struct {
	epoch   uint64
	entries []Entry
	applied int
	// forget removes the entries' records instead of storing them.
	forget bool
}

// Open opens (creating if needed) the store in dir.
func Open(dir string, opts Options) (*DB, error) {
	if opts.MaxBatch <= 0 {
		opts.MaxBatch = 1024
	}
	if opts.LockTimeout <= 0 {
		opts.LockTimeout = 2 * time.Second
	}
	if opts.RequestTTL <= 0 {
		opts.RequestTTL = 10 * time.Minute
	}
	if opts.MaxRequestBytes <= 0 {
		opts.MaxRequestBytes = 64 << 20
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("storage: create data dir: %w", err)
	}
	path := filepath.Join(dir, FileName)
	bdb, err := openBolt(path, opts.LockTimeout, opts.NoSync)
	if err != nil {
		return nil, fmt.Errorf("storage: open %s: %w", path, err)
	}
	// A compaction interrupted before its rename leaves its copy behind.
	// Holding the file lock means no compaction is running now (Compact
	// holds it from start to rename), so the copy is garbage.
	if err := removeCompactTemp(dir); err != nil {
		_ = bdb.Close()
		return nil, fmt.Errorf("storage: %w", err)
	}
	if err := initFormat(bdb); err != nil {
		_ = bdb.Close()
		return nil, fmt.Errorf("storage: %s: %w", path, err)
	}
	if opts.Partitions < 0 || (opts.Partitions > 0 && opts.PartitionOf == nil) {
		_ = bdb.Close()
		return nil, fmt.Errorf("storage: Options.Partitions %d needs a PartitionOf", opts.Partitions)
	}
	db := &DB{
		bolt:    bdb,
		opts:    opts,
		metrics: newMetrics(opts.Registerer),
		reqs:    make(chan *request, opts.MaxBatch),
		done:    make(chan struct{}),
		changed: make(chan struct{}),
	}
	if err := db.loadDigests(); err != nil {
		_ = bdb.Close()
		return nil, fmt.Errorf("storage: %s: %w", path, err)
	}
	_ = bdb.View(func(tx *bolt.Tx) error {
		// Versions up to the reservation may have left this node before a
		// crash; new ones start above it.
		db.reserved = readUint(tx.Bucket(bucketMeta), metaReserved)
		db.seqFloor = db.reserved
		// The total is not stored (no format change); counting costs one
		// walk of the ids, at most MaxRequestBytes of them.
		return tx.Bucket(bucketRequests).ForEach(func(k, v []byte) error {
			db.requestBytes += requestRecordBytes(len(k), len(v))
			return nil
		})
	})
	db.metrics.setRequestBytes(db.requestBytes)
	db.metrics.watchFile(opts.Registerer, func() (file, free int64) {
		fi, err := os.Stat(path)
		if err != nil {
			return 0, 0
		}
		free, _ = freeBytes(db.bolt, fi.Size())
		return fi.Size(), free
	})
	go db.commitLoop()
	return db, nil
}

// openBolt opens the bbolt file at path the one way this package uses it,
// mapping a lock held elsewhere to ErrLocked.
func openBolt(path string, lockTimeout time.Duration, noSync bool) (*bolt.DB, error) {
	bdb, err := bolt.Open(path, 0o600, &bolt.Options{
		Timeout: lockTimeout,
		NoSync:  noSync,
		// The freelist is rebuilt on open instead of written on every commit:
		// less to fsync per write, at the cost of a slower open.
		NoFreelistSync: true,
		FreelistType:   bolt.FreelistMapType,
	})
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, ErrLocked
	}
	return bdb, err
}

func initFormat(bdb *bolt.DB) error {
	return bdb.Update(func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucketIfNotExists(bucketMeta)
		if err != nil {
			return err
		}
		for _, b := range [][]byte{bucketKV, bucketRequests, bucketRequestsByTime} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		raw := meta.Get(metaFormat)
		if raw == nil {
			return meta.Put(metaFormat, []byte(strconv.Itoa(FormatVersion)))
		}
		if got, err := strconv.Atoi(string(raw)); err != nil || got != FormatVersion {
			return fmt.Errorf("%w: file has format %q, this binary reads %d", ErrUnsupportedFormat, raw, FormatVersion)
		}
		return nil
	})
}

// Close stops accepting writes, commits those already queued, and closes
// the file. It is safe to call more than once.
func (db *DB) Close() error {
	db.mu.Lock()
	if db.closed {
		db.mu.Unlock()
		return nil
	}
	db.closed = true
	close(db.reqs)
	db.mu.Unlock()
	<-db.done
	if err := db.bolt.Close(); err != nil {
		return fmt.Errorf("storage: close: %w", err)
	}
	return nil
}

// Get returns the live entry for key, or ErrNotFound.
//
// The value is copied once out of the mmap, and the read transaction ends
// with the copy; it is never held while the value is written to a client
// or a peer. A read transaction pins the mmap: bbolt cannot remap to grow
// the file until every reader is done (mmaplock), so one GET stalled on a
// slow client (seconds, up to the server's write timeout) would stall every
// write that grows the file, and a long-lived reader also keeps freed pages
// from reuse. Writing from inside the transaction would save this one copy
// of at most --max-value-bytes per read in flight; bounding the stall with
// a write deadline would still leave writes hostage to readers. One private
// copy per read, freed when the response is written, is the cheaper bound.
func (db *DB) Get(key string) (Entry, error) {
	var e Entry
	err := db.bolt.View(func(tx *bolt.Tx) error {
		raw := tx.Bucket(bucketKV).Get([]byte(key))
		if raw == nil {
			return ErrNotFound
		}
		var err error
		if e, err = decodeRecord(key, raw); err != nil {
			return err
		}
		if e.Deleted {
			return ErrNotFound
		}
		return nil
	})
	if err != nil {
		return Entry{}, fmt.Errorf("storage: get: %w", err)
	}
	return e, nil
}

// Scan returns up to limit live entries whose keys start with prefix and sort
// strictly after the key after, in key order, stopping before the page's
// keys and values pass maxBytes (a page always holds at least one entry, so
// a value of any size is listed; maxBytes <= 0 bounds nothing). more reports
// whether further entries exist beyond the last one returned.
func (db *DB) Scan(prefix, after string, limit, maxBytes int) (entries []Entry, more bool, err error) {
	if limit <= 0 {
		return nil, false, nil
	}
	p := []byte(prefix)
	err = db.bolt.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketKV).Cursor()
		k, v := seekAfter(c, after, prefix)
		size := 0
		for ; k != nil && bytes.HasPrefix(k, p); k, v = c.Next() {
			if _, deleted, ok := recordVersion(v); ok && deleted {
				continue
			}
			if len(entries) == limit || (len(entries) > 0 && maxBytes > 0 && size+len(k)+len(v) > maxBytes) {
				more = true
				return nil
			}
			e, err := decodeRecord(string(k), v)
			if err != nil {
				return err
			}
			size += len(k) + len(v)
			entries = append(entries, e)
		}
		return nil
	})
	if err != nil {
		return nil, false, fmt.Errorf("storage: scan: %w", err)
	}
	return entries, more, nil
}

// Size returns the size of the database file in bytes.
func (db *DB) Size() int64 {
	var n int64
	_ = db.bolt.View(func(tx *bolt.Tx) error {
		n = tx.Size()
		return nil
	})
	return n
}

// LastSeq returns the highest sequence number assigned so far.
func (db *DB) LastSeq() uint64 {
	var seq uint64
	_ = db.bolt.View(func(tx *bolt.Tx) error {
		seq = readSeq(tx.Bucket(bucketMeta))
		return nil
	})
	return seq
}

// Apply durably applies m and returns the entry it produced. It returns only
// after the commit holding m has been fsynced. Failed preconditions return a
// *ConditionError (errors.Is ErrConditionFailed); deleting a missing key
// returns ErrNotFound; a mutation from an older term than this node has
// admitted returns ErrStaleEpoch. In all these cases nothing is written.
//
// If ctx ends first Apply returns ctx.Err(), but the mutation may still be
// committed: the caller must treat the outcome as unknown.
func (db *DB) Apply(ctx context.Context, m Mutation) (Result, error) {
	if m.Key == "" || len(m.Key) > MaxKeyBytes || len(m.RequestID) > MaxRequestIDBytes || m.Epoch == 0 ||
		(m.IfAbsent && (m.IfExists || !m.IfMatch.IsZero())) {
		return Result{}, fmt.Errorf("storage: apply: %w", ErrInvalidMutation)
	}
	r := &request{m: m, done: make(chan struct{})}
	if err := db.submit(ctx, r); err != nil {
		return Result{}, fmt.Errorf("storage: apply: %w", err)
	}
	return r.res, nil
}

// ApplyReplicated durably applies entries sent by the leader of term epoch
// and returns after fsync. Each entry is stored only if its version is
// newer than the key's current one, so duplicates and reordering are
// harmless; applied counts the entries that changed the store. If this node
// has already admitted a newer term, the whole batch is refused with
// ErrStaleEpoch and nothing changes. Admitting a batch raises the node's
// fence (FenceEpoch) in the same transaction.
func (db *DB) ApplyReplicated(ctx context.Context, epoch uint64, entries []Entry) (applied int, err error) {
	if epoch == 0 {
		return 0, fmt.Errorf("storage: apply replicated: %w: epoch 0", ErrInvalidMutation)
	}
	// Validate the whole batch first: a bad entry must not leave the ones
	// before it applied while the batch reports an error.
	for _, e := range entries {
		if e.Key == "" || len(e.Key) > MaxKeyBytes || e.Version.IsZero() {
			return 0, fmt.Errorf("storage: apply replicated: %w: entry without key or version, or key over %d bytes", ErrInvalidMutation, MaxKeyBytes)
		}
	}
	r := &request{repl: &replBatch{epoch: epoch, entries: entries}, done: make(chan struct{})}
	if err := db.submit(ctx, r); err != nil {
		return 0, fmt.Errorf("storage: apply replicated: %w", err)
	}
	return r.repl.applied, nil
}

// Forget durably removes the records of entries, each only if its key
// still holds exactly that version and tombstone flag, on behalf of the
// leader of term epoch (which passes the fence as ApplyReplicated does),
// and returns how many it removed. Replication uses it to collect
// tombstones no replica needs any more and to drop copies a node no longer
// owns; its callers carry the argument for why nothing can come back
// (internal/replication/DESIGN.md).
func (db *DB) Forget(ctx context.Context, epoch uint64, entries []Entry) (forgot int, err error) {
	if epoch == 0 {
		return 0, fmt.Errorf("storage: forget: %w: epoch 0", ErrInvalidMutation)
	}
	for _, e := range entries {
		if e.Key == "" || len(e.Key) > MaxKeyBytes || e.Version.IsZero() {
			return 0, fmt.Errorf("storage: forget: %w: entry without key or version, or key over %d bytes", ErrInvalidMutation, MaxKeyBytes)
		}
	}
	r := &request{repl: &replBatch{epoch: epoch, entries: entries, forget: true}, done: make(chan struct{})}
	if err := db.submit(ctx, r); err != nil {
		return 0, fmt.Errorf("storage: forget: %w", err)
	}
	return r.repl.applied, nil
}

// FenceEpoch returns the newest leadership term this node has admitted,
// locally or by replication. It survives restarts.
func (db *DB) FenceEpoch() uint64 {
	var e uint64
	_ = db.bolt.View(func(tx *bolt.Tx) error {
		e = readUint(tx.Bucket(bucketMeta), metaFence)
		return nil
	})
	return e
}

// submit queues r for the committer and waits for its outcome.
func (db *DB) submit(ctx context.Context, r *request) error {
	db.mu.RLock()
	if db.closed {
		db.mu.RUnlock()
		return ErrClosed
	}
	db.reqs <- r
	db.mu.RUnlock()
	select {
	case <-r.done:
		return r.err
	case <-ctx.Done():
		return fmt.Errorf("outcome unknown: %w", ctx.Err())
	}
}

// commitLoop is the single writer. Each round takes every request already
// queued (up to MaxBatch) and commits them in one transaction, so the batch
// size adapts to load: one request when idle, many when writers pile up
// behind an fsync.
func (db *DB) commitLoop() {
	defer close(db.done)
	batch := make([]*request, 0, db.opts.MaxBatch)
	// Expired request ids are swept by this same goroutine, between
	// batches, so bbolt only ever has one writer.
	sweep := time.NewTicker(db.opts.RequestTTL / 4)
	defer sweep.Stop()
	// A file opened with a lower MaxRequestBytes than it was written with
	// is brought under the bound before the first write.
	db.sweepRequests(time.Now().Add(-db.opts.RequestTTL))
	for {
		var first *request
		select {
		case r, ok := <-db.reqs:
			if !ok {
				return
			}
			first = r
		case <-sweep.C:
			db.sweepRequests(time.Now().Add(-db.opts.RequestTTL))
			continue
		}
		batch = append(batch[:0], first)
	fill:
		for len(batch) < db.opts.MaxBatch {
			select {
			case r, ok := <-db.reqs:
				if !ok {
					break fill
				}
				batch = append(batch, r)
			default:
				break fill
			}
		}
		db.commit(batch)
	}
}

// sweepRequests forgets request ids recorded before cutoff, and the oldest
// beyond them while the records exceed MaxRequestBytes. Failure only delays
// the cleanup.
func (db *DB) sweepRequests(cutoff time.Time) {
	var dropped requestsDropped
	err := db.bolt.Update(func(tx *bolt.Tx) error {
		reqs := requestBuckets{ids: tx.Bucket(bucketRequests), byTime: tx.Bucket(bucketRequestsByTime)}
		var err error
		dropped, err = dropRequests(reqs, cutoff.UnixNano(), db.requestBytes, db.opts.MaxRequestBytes)
		return err
	})
	if err == nil {
		db.noteRequestsDropped(0, dropped)
	}
}

// requestRecordBytes is what one request id costs across both buckets:
// the id and its record in requests, the time-prefixed id in
// requests_by_time. The bound counts these bytes, not bbolt's page
// overhead.
func requestRecordBytes(idLen, recordLen int) int64 {
	return int64(idLen + recordLen + 8 + idLen)
}

// requestsDropped is what dropRequests removed.
type requestsDropped struct {
	bytes int64
	// early counts ids dropped for the bytes bound before their TTL.
	early int
}

// dropRequests removes request ids oldest first, walking the time index
// from its start, for as long as they are older than cutoff (unix ns) or
// held, the records' bytes, exceeds maxBytes; so the cost is what it
// removes, not all ids. Keys are collected before deleting (deleting under
// a bbolt cursor can skip the next key).
func dropRequests(reqs requestBuckets, cutoff, held, maxBytes int64) (requestsDropped, error) {
	var (
		drop [][]byte
		d    requestsDropped
	)
	c := reqs.byTime.Cursor()
	for k, _ := c.First(); k != nil && len(k) >= 8; k, _ = c.Next() {
		expired := int64(binary.BigEndian.Uint64(k[:8])) < cutoff
		if !expired && held-d.bytes <= maxBytes {
			break
		}
		if !expired {
			d.early++
		}
		// An index entry whose record is gone (none should be) costs
		// only itself.
		n := int64(len(k))
		if rec := reqs.ids.Get(k[8:]); rec != nil {
			n = requestRecordBytes(len(k)-8, len(rec))
		}
		d.bytes += n
		drop = append(drop, k)
	}
	for _, k := range drop {
		if err := reqs.ids.Delete(k[8:]); err != nil {
			return requestsDropped{}, err
		}
		if err := reqs.byTime.Delete(k); err != nil {
			return requestsDropped{}, err
		}
	}
	return d, nil
}

// noteRequestsDropped accounts for a committed transaction that recorded
// added bytes of request ids and dropped d. Committer goroutine only.
func (db *DB) noteRequestsDropped(added int64, d requestsDropped) {
	db.requestBytes += added - d.bytes
	db.metrics.setRequestBytes(db.requestBytes)
	db.metrics.addRequestsEvicted(d.early)
}

// Seq reservation: handed-out versions stay below the durable bound, which
// each commit pushes reserveBlock ahead once fewer than reserveBlock/2
// remain. Only writers that use BeforeSync (a replicating leader) reserve,
// so a single node's versions stay dense.
const reserveBlock = 1 << 14

func wantsEarly(batch []*request) bool {
	for _, r := range batch {
		if r.repl == nil && r.m.BeforeSync != nil {
			return true
		}
	}
	return false
}

func (db *DB) commit(batch []*request) {
	start := time.Now()
	var (
		changes  []change
		reserved = db.reserved
		// Request-id bytes this batch recorded, and what the bound made
		// it drop; counted only once the commit succeeds.
		reqAdded   int64
		reqDropped requestsDropped
	)
	err := db.bolt.Update(func(tx *bolt.Tx) error {
		meta, kv := tx.Bucket(bucketMeta), tx.Bucket(bucketKV)
		reqs := requestBuckets{ids: tx.Bucket(bucketRequests), byTime: tx.Bucket(bucketRequestsByTime)}
		seq, fence := max(readSeq(meta), db.seqFloor), readUint(meta, metaFence)
		seq0, fence0 := readSeq(meta), fence
		for _, r := range batch {
			// Every request, local or replicated, passes the same fence in
			// commit order: once a newer term has been admitted here, an
			// older term can neither write locally nor replicate.
			epoch := r.m.Epoch
			if r.repl != nil {
				epoch = r.repl.epoch
			}
			if epoch < fence {
				r.err = fmt.Errorf("%w: term %d, this node has admitted term %d", ErrStaleEpoch, epoch, fence)
				continue
			}
			switch {
			case r.repl != nil && r.repl.forget:
				r.err = applyForget(kv, r.repl, &changes)
			case r.repl != nil:
				r.err = applyReplicated(kv, &seq, r.repl, &changes)
			default:
				r.res, r.err = applyIdempotent(kv, reqs, &seq, r.m, start, &changes, &reqAdded)
			}
			if r.err == nil {
				fence = epoch
			}
		}
		// The bound holds at every commit, not just at the next sweep: a
		// burst recording more than the bound drops the oldest ids (its own
		// last) in the same transaction.
		if db.requestBytes+reqAdded > db.opts.MaxRequestBytes {
			var err error
			cutoff := start.Add(-db.opts.RequestTTL).UnixNano()
			if reqDropped, err = dropRequests(reqs, cutoff, db.requestBytes+reqAdded, db.opts.MaxRequestBytes); err != nil {
				return err
			}
		}
		if seq != seq0 {
			if err := meta.Put(metaSeq, binary.BigEndian.AppendUint64(nil, seq)); err != nil {
				return err
			}
		}
		if fence != fence0 {
			if err := meta.Put(metaFence, binary.BigEndian.AppendUint64(nil, fence)); err != nil {
				return err
			}
		}
		if seq+reserveBlock/2 > reserved && wantsEarly(batch) {
			reserved = seq + reserveBlock
			if err := meta.Put(metaReserved, binary.BigEndian.AppendUint64(nil, reserved)); err != nil {
				return err
			}
		}
		// Everything is applied; only the fsync is left. Versions under
		// the reservation already durable may leave now.
		for _, r := range batch {
			if r.err == nil && r.repl == nil && r.m.BeforeSync != nil && !r.res.Replayed && r.res.Entry.Version.Seq <= db.reserved {
				r.m.BeforeSync(r.res)
				r.early = true
				db.seqFloor = max(db.seqFloor, r.res.Entry.Version.Seq)
			}
		}
		return nil
	})
	if err == nil {
		db.reserved = reserved
	}
	db.metrics.observeCommit(time.Since(start), len(batch))
	if err == nil {
		db.noteChanges(changes)
		if reqAdded > 0 || reqDropped.bytes > 0 {
			db.noteRequestsDropped(reqAdded, reqDropped)
		}
	}
	for _, r := range batch {
		if err != nil {
			// The transaction rolled back: nothing in it was written.
			r.res, r.err = Result{}, err
			if r.early {
				r.err = fmt.Errorf("%w: %w", ErrSyncFailed, err)
			}
		}
		close(r.done)
	}
}

// applyIdempotent applies m unless its RequestID was applied already, in
// which case it returns the remembered result.
type requestBuckets struct{ ids, byTime *bolt.Bucket }

func applyIdempotent(kv *bolt.Bucket, reqs requestBuckets, seq *uint64, m Mutation, now time.Time, changes *[]change, reqBytes *int64) (Result, error) {
	if m.RequestID == "" {
		return applyOne(kv, seq, m, changes)
	}
	if raw := reqs.ids.Get([]byte(m.RequestID)); raw != nil {
		res, key, ok := decodeRequest(raw)
		if !ok {
			return Result{}, fmt.Errorf("%w: request id %q", ErrCorrupt, m.RequestID)
		}
		if key != m.Key {
			return Result{}, fmt.Errorf("%w: request id %q was used for key %q", ErrRequestIDReused, m.RequestID, key)
		}
		return res, nil
	}
	res, err := applyOne(kv, seq, m, changes)
	if err != nil {
		return res, err
	}
	// Apply validated the id's length, so these puts cannot fail for the
	// key; a failure here is a disk error that rolls the batch back.
	rec := encodeRequest(res, now)
	if err := reqs.ids.Put([]byte(m.RequestID), rec); err != nil {
		return Result{}, err
	}
	*reqBytes += requestRecordBytes(len(m.RequestID), len(rec))
	tk := binary.BigEndian.AppendUint64(make([]byte, 0, 8+len(m.RequestID)), uint64(now.UnixNano()))
	if err := reqs.byTime.Put(append(tk, m.RequestID...), nil); err != nil {
		return Result{}, err
	}
	return res, nil
}

// applyOne applies a single mutation inside the batch transaction. Mutations
// of one batch see each other in arrival order, so two compare-and-sets on
// one key in the same batch behave exactly as if committed separately.
func applyOne(kv *bolt.Bucket, seq *uint64, m Mutation, changes *[]change) (Result, error) {
	key := []byte(m.Key)
	var cur, stored Version
	exists, storedDeleted := false, false
	if raw := kv.Get(key); raw != nil {
		v, deleted, ok := recordVersion(raw)
		if !ok {
			return Result{}, fmt.Errorf("%w: key %q", ErrCorrupt, m.Key)
		}
		stored, storedDeleted = v, deleted
		if !deleted {
			cur, exists = v, true
		}
	}
	switch {
	case m.IfAbsent && exists,
		m.IfExists && !exists,
		!m.IfMatch.IsZero() && m.IfMatch != cur:
		return Result{}, &ConditionError{Key: m.Key, Current: cur}
	case m.Delete && !exists:
		return Result{}, ErrNotFound
	}
	*seq++
	v := Version{Epoch: m.Epoch, Seq: *seq}
	var value []byte
	if !m.Delete {
		value = m.Value
	}
	if err := kv.Put(key, encodeRecord(v, value, m.Delete)); err != nil {
		*seq--
		return Result{}, err
	}
	*changes = append(*changes, change{key: m.Key, old: stored, oldDeleted: storedDeleted, new: v, newDeleted: m.Delete})
	e := Entry{Key: m.Key, Version: v, Deleted: m.Delete}
	if !m.Delete {
		e.Value = append([]byte(nil), m.Value...)
	}
	return Result{Entry: e, Created: !exists && !m.Delete}, nil
}

func readSeq(meta *bolt.Bucket) uint64 { return readUint(meta, metaSeq) }

func readUint(meta *bolt.Bucket, key []byte) uint64 {
	if raw := meta.Get(key); len(raw) == 8 {
		return binary.BigEndian.Uint64(raw)
	}
	return 0
}

// applyReplicated stores each entry whose version is newer than the key's
// current one (live or tombstone). Older or equal versions are skipped, so
// a batch may be re-sent or arrive after a newer one without harm.
func applyReplicated(kv *bolt.Bucket, seq *uint64, b *replBatch, changes *[]change) error {
	b.applied = 0
	for _, e := range b.entries {
		if e.Key == "" || e.Version.IsZero() {
			return fmt.Errorf("%w: replicated entry without key or version", ErrInvalidMutation)
		}
		key := []byte(e.Key)
		var (
			cur        Version
			curDeleted bool
		)
		if raw := kv.Get(key); raw != nil {
			var ok bool
			if cur, curDeleted, ok = recordVersion(raw); !ok {
				return fmt.Errorf("%w: key %q", ErrCorrupt, e.Key)
			}
			if !cur.Less(e.Version) {
				continue
			}
		}
		if err := kv.Put(key, encodeRecord(e.Version, e.Value, e.Deleted)); err != nil {
			return err
		}
		*changes = append(*changes, change{key: e.Key, old: cur, oldDeleted: curDeleted, new: e.Version, newDeleted: e.Deleted})
		*seq = max(*seq, e.Version.Seq)
		b.applied++
	}
	return nil
}

// applyForget removes the record of each entry whose key still holds
// exactly that version (and tombstone flag); anything else, a newer write
// above all, is left alone.
func applyForget(kv *bolt.Bucket, b *replBatch, changes *[]change) error {
	b.applied = 0
	for _, e := range b.entries {
		raw := kv.Get([]byte(e.Key))
		if raw == nil {
			continue
		}
		cur, deleted, ok := recordVersion(raw)
		if !ok {
			return fmt.Errorf("%w: key %q", ErrCorrupt, e.Key)
		}
		if cur != e.Version || deleted != e.Deleted {
			continue
		}
		if err := kv.Delete([]byte(e.Key)); err != nil {
			return err
		}
		*changes = append(*changes, change{key: e.Key, old: cur, oldDeleted: deleted})
		b.applied++
	}
	return nil
}
