package transport

import "context"

// Paths of the replication calls. Like Paths, they sit under /internal/.
const (
	ReplicatePath = "/internal/v1/replicate"
	DigestsPath   = "/internal/v1/digests"
	EntriesPath   = "/internal/v1/entries"
	ReadIndexPath = "/internal/v1/read-index"
	ForgetPath    = "/internal/v1/forget"
)

// ReplicaPaths lists the replication calls NewHandler serves (all POST).
var ReplicaPaths = []string{ReplicatePath, DigestsPath, EntriesPath, ReadIndexPath, ForgetPath}

// Envelope heads every leader-to-follower message: the sender's term and
// identity, which the follower admits through its fence.
type Envelope struct {
	Epoch  uint64
	Leader string
	// Repair, on a heartbeat, tells the follower that entries for it were
	// dropped and it should run a repair pass.
	Repair bool
}

func (m *Envelope) encode(e *encoder) {
	e.uvarint(m.Epoch)
	e.str(m.Leader)
	e.bool(m.Repair)
}

func (m *Envelope) decode(d *decoder) { m.Epoch, m.Leader, m.Repair = d.uvarint(), d.str(), d.bool() }

// Entry is one replicated entry: the value's exact bytes, or a tombstone.
type Entry struct {
	Key     string
	Value   []byte
	Version Version
	Deleted bool
}

// Size is what an entry costs on the wire, near enough to bound batches.
func (m *Entry) Size() int { return len(m.Key) + len(m.Value) + 24 }

func encodeEntries(e *encoder, es []Entry) {
	e.uvarint(uint64(len(es)))
	for i := range es {
		e.str(es[i].Key)
		e.bytes(es[i].Value)
		e.version(es[i].Version)
		e.bool(es[i].Deleted)
	}
}

func decodeEntries(d *decoder) []Entry {
	// An entry takes at least 5 bytes: key and value lengths, two version
	// varints and the flag.
	es := make([]Entry, d.count(5))
	for i := range es {
		es[i] = Entry{Key: d.str(), Value: d.bytes(), Version: d.version(), Deleted: d.bool()}
	}
	return es
}

// Batch is what a leader sends a follower: entries of one term, applied in
// one durable transaction. An empty batch is a heartbeat.
type Batch struct {
	Envelope
	Entries []Entry
}

func (m *Batch) encode(e *encoder) { m.Envelope.encode(e); encodeEntries(e, m.Entries) }
func (m *Batch) decode(d *decoder) { m.Envelope.decode(d); m.Entries = decodeEntries(d) }

// BatchReply says how many entries changed the follower and the newest
// term it has admitted.
type BatchReply struct {
	Applied int
	Fence   uint64
}

func (m *BatchReply) encode(e *encoder) { e.uvarint(uint64(max(m.Applied, 0))); e.uvarint(m.Fence) }
func (m *BatchReply) decode(d *decoder) {
	m.Applied, m.Fence = int(min(d.uvarint(), 1<<31)), d.uvarint()
}

// Sync asks for digests or entries. A leader catching up sends its
// envelope (HasEnvelope), which the peer admits through its fence first; a
// follower repairing from the leader sends none, and the peer must be the
// caught-up leader.
type Sync struct {
	HasEnvelope bool
	Envelope    Envelope
	Partitions  []int
	// VersionsOnly asks for the partitions' keys and versions without
	// values, a page of those sorting after After (EntriesReply.More says
	// another follows); Keys asks for exactly these keys, values included.
	VersionsOnly bool
	After        string
	Keys         []string
}

func (m *Sync) encode(e *encoder) {
	e.bool(m.HasEnvelope)
	m.Envelope.encode(e)
	e.uvarint(uint64(len(m.Partitions)))
	for _, p := range m.Partitions {
		e.uvarint(uint64(max(p, 0)))
	}
	e.bool(m.VersionsOnly)
	e.str(m.After)
	e.uvarint(uint64(len(m.Keys)))
	for _, k := range m.Keys {
		e.str(k)
	}
}

func (m *Sync) decode(d *decoder) {
	m.HasEnvelope = d.bool()
	m.Envelope.decode(d)
	m.Partitions = make([]int, d.count(1))
	for i := range m.Partitions {
		m.Partitions[i] = int(min(d.uvarint(), 1<<31))
	}
	m.VersionsOnly, m.After = d.bool(), d.str()
	m.Keys = make([]string, d.count(1))
	for i := range m.Keys {
		m.Keys[i] = d.str()
	}
}

// DigestsReply is the peer's partition digests, under the envelope it
// answered with.
type DigestsReply struct {
	Envelope
	Digests []uint64
}

func (m *DigestsReply) encode(e *encoder) {
	m.Envelope.encode(e)
	e.uvarint(uint64(len(m.Digests)))
	for _, x := range m.Digests {
		e.uvarint(x)
	}
}

func (m *DigestsReply) decode(d *decoder) {
	m.Envelope.decode(d)
	m.Digests = make([]uint64, d.count(1))
	for i := range m.Digests {
		m.Digests[i] = d.uvarint()
	}
}

// EntriesReply is the entries asked for, one page of at most about
// PageBytes. With Sync.Keys, Covered says how many of the asked keys it
// answers (a prefix of the list); the caller asks again for the rest. With
// Sync.VersionsOnly, More says versions remain after the last entry.
type EntriesReply struct {
	Envelope
	Entries []Entry
	Covered int
	More    bool
}

func (m *EntriesReply) encode(e *encoder) {
	m.Envelope.encode(e)
	encodeEntries(e, m.Entries)
	e.uvarint(uint64(max(m.Covered, 0)))
	e.bool(m.More)
}

func (m *EntriesReply) decode(d *decoder) {
	m.Envelope.decode(d)
	m.Entries = decodeEntries(d)
	m.Covered = int(min(d.uvarint(), 1<<31))
	m.More = d.bool()
}

// ReadIndex asks the leader for the committed versions of keys.
type ReadIndex struct {
	Keys []string
}

func (m *ReadIndex) encode(e *encoder) {
	e.uvarint(uint64(len(m.Keys)))
	for _, k := range m.Keys {
		e.str(k)
	}
}

func (m *ReadIndex) decode(d *decoder) {
	m.Keys = make([]string, d.count(1))
	for i := range m.Keys {
		m.Keys[i] = d.str()
	}
}

// ReadIndexReply holds each key's committed version, in request order
// (zero when the leader holds none).
type ReadIndexReply struct {
	Envelope
	Versions []Version
}

func (m *ReadIndexReply) encode(e *encoder) {
	m.Envelope.encode(e)
	e.uvarint(uint64(len(m.Versions)))
	for _, v := range m.Versions {
		e.version(v)
	}
}

func (m *ReadIndexReply) decode(d *decoder) {
	m.Envelope.decode(d)
	m.Versions = make([]Version, d.count(2))
	for i := range m.Versions {
		m.Versions[i] = d.version()
	}
}

// ReplicaService is what a node serves to replication's calls.
type ReplicaService interface {
	// Replicate admits a batch through the fence and applies it durably
	// before answering.
	Replicate(ctx context.Context, b Batch) (BatchReply, error)
	// Digests answers the partition digests; Entries the entries asked for.
	Digests(ctx context.Context, s Sync) (DigestsReply, error)
	Entries(ctx context.Context, s Sync) (EntriesReply, error)
	// ReadIndex (leader only) answers committed versions.
	ReadIndex(ctx context.Context, r ReadIndex) (ReadIndexReply, error)
	// Forget admits the batch's envelope through the fence and durably
	// removes the records of its entries (keys and versions; no values)
	// that are still exactly at those versions: the leader's collection
	// of tombstones and of copies a member no longer owns. Applied counts
	// the records removed.
	Forget(ctx context.Context, b Batch) (BatchReply, error)
}

// Replicate sends a batch (or a heartbeat) to the follower to.
func (c *HTTP) Replicate(ctx context.Context, to string, b Batch) (BatchReply, error) {
	var r BatchReply
	return r, c.call(ctx, to, ReplicatePath, &b, &r)
}

// Digests asks to for its partition digests.
func (c *HTTP) Digests(ctx context.Context, to string, s Sync) (DigestsReply, error) {
	var r DigestsReply
	return r, c.call(ctx, to, DigestsPath, &s, &r)
}

// Entries asks to for entries.
func (c *HTTP) Entries(ctx context.Context, to string, s Sync) (EntriesReply, error) {
	var r EntriesReply
	return r, c.call(ctx, to, EntriesPath, &s, &r)
}

// ReadIndex asks the leader to for committed versions.
func (c *HTTP) ReadIndex(ctx context.Context, to string, ri ReadIndex) (ReadIndexReply, error) {
	var r ReadIndexReply
	return r, c.call(ctx, to, ReadIndexPath, &ri, &r)
}

// Forget asks the member to to remove the records of b's entries.
func (c *HTTP) Forget(ctx context.Context, to string, b Batch) (BatchReply, error) {
	var r BatchReply
	return r, c.call(ctx, to, ForgetPath, &b, &r)
}
