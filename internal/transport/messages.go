package transport

import "time"

// Version is a value's version, (epoch, seq), as storage assigns it. The
// zero Version means "none".
type Version struct {
	Epoch, Seq uint64
}

// IsZero reports whether v is the zero version.
func (v Version) IsZero() bool { return v == Version{} }

// Write is a PUT or DELETE a node forwards to the leader.
type Write struct {
	// From is the forwarding node. The receiver never forwards the write
	// again: if it does not lead, it refuses (not applied).
	From string
	// SeenEpoch is the newest term From has seen; a leader of an older term
	// learns from it that it was superseded and steps down first.
	SeenEpoch uint64
	// RequestID makes retries of the forward apply at most once.
	RequestID string
	Key       string
	Delete    bool
	Value     []byte
	// IfMatch, IfExists and IfAbsent are the client's preconditions.
	IfMatch            Version
	IfExists, IfAbsent bool
	// Ack is the client's ack= level as it sent it ("" is the default).
	Ack string
}

func (m *Write) encode(e *encoder) {
	e.str(m.From)
	e.uvarint(m.SeenEpoch)
	e.str(m.RequestID)
	e.str(m.Key)
	e.bool(m.Delete)
	e.bytes(m.Value)
	e.version(m.IfMatch)
	e.bool(m.IfExists)
	e.bool(m.IfAbsent)
	e.str(m.Ack)
}

func (m *Write) decode(d *decoder) {
	m.From, m.SeenEpoch, m.RequestID, m.Key = d.str(), d.uvarint(), d.str(), d.str()
	m.Delete, m.Value = d.bool(), d.bytes()
	m.IfMatch, m.IfExists, m.IfAbsent, m.Ack = d.version(), d.bool(), d.bool(), d.str()
}

// WriteReply is the leader's answer to an applied Write.
type WriteReply struct {
	Version          Version
	Created, Deleted bool
	// Leader and Epoch name who applied it, in which term.
	Leader string
	Epoch  uint64
}

func (m *WriteReply) encode(e *encoder) {
	e.version(m.Version)
	e.bool(m.Created)
	e.bool(m.Deleted)
	e.str(m.Leader)
	e.uvarint(m.Epoch)
}

func (m *WriteReply) decode(d *decoder) {
	m.Version, m.Created, m.Deleted, m.Leader, m.Epoch = d.version(), d.bool(), d.bool(), d.str(), d.uvarint()
}

// Read asks a node to serve a GET of one key from its own replica (or, on
// a cluster without replication, the leader's copy).
type Read struct {
	From     string
	Key      string
	Stale    bool
	MaxStale time.Duration
	// SeenEpoch is as in Write.
	SeenEpoch uint64
}

func (m *Read) encode(e *encoder) {
	e.str(m.From)
	e.str(m.Key)
	e.bool(m.Stale)
	e.uvarint(uint64(max(m.MaxStale, 0)))
	e.uvarint(m.SeenEpoch)
}

func (m *Read) decode(d *decoder) {
	m.From, m.Key, m.Stale = d.str(), d.str(), d.bool()
	m.MaxStale, m.SeenEpoch = time.Duration(min(d.uvarint(), 1<<62)), d.uvarint()
}

// ReadReply is a served read.
type ReadReply struct {
	Value   []byte
	Version Version
	// ServedBy names the node whose replica answered; Consistency is what
	// it was served at ("strong", "stale"; "" when the node does not say).
	ServedBy, Consistency string
	// LastContact, when HasLastContact, is the answering replica's time
	// since it last heard from the leader (stale reads).
	HasLastContact bool
	LastContact    time.Duration
}

func (m *ReadReply) encode(e *encoder) {
	e.bytes(m.Value)
	e.version(m.Version)
	e.str(m.ServedBy)
	e.str(m.Consistency)
	e.bool(m.HasLastContact)
	e.uvarint(uint64(max(m.LastContact, 0)))
}

func (m *ReadReply) decode(d *decoder) {
	m.Value, m.Version, m.ServedBy, m.Consistency = d.bytes(), d.version(), d.str(), d.str()
	m.HasLastContact, m.LastContact = d.bool(), time.Duration(min(d.uvarint(), 1<<62))
}

// List asks the leader for one page of a listing.
type List struct {
	From          string
	Prefix, After string
	Limit         int
	SeenEpoch     uint64
}

func (m *List) encode(e *encoder) {
	e.str(m.From)
	e.str(m.Prefix)
	e.str(m.After)
	e.uvarint(uint64(max(m.Limit, 0)))
	e.uvarint(m.SeenEpoch)
}

func (m *List) decode(d *decoder) {
	m.From, m.Prefix, m.After = d.str(), d.str(), d.str()
	m.Limit, m.SeenEpoch = int(min(d.uvarint(), 1<<31)), d.uvarint()
}

// Item is one entry of a listing.
type Item struct {
	Key     string
	Version Version
	Value   []byte
}

// ListReply is one page; More says another follows (after the last key).
type ListReply struct {
	Items []Item
	More  bool
}

func (m *ListReply) encode(e *encoder) {
	e.uvarint(uint64(len(m.Items)))
	for _, it := range m.Items {
		e.str(it.Key)
		e.version(it.Version)
		e.bytes(it.Value)
	}
	e.bool(m.More)
}

func (m *ListReply) decode(d *decoder) {
	// An item takes at least 4 bytes: key length, two version varints and
	// the value length.
	m.Items = make([]Item, d.count(4))
	for i := range m.Items {
		m.Items[i] = Item{Key: d.str(), Version: d.version(), Value: d.bytes()}
	}
	m.More = d.bool()
}

// LeaderNotice tells a peer that Leader now leads term Epoch, so it sends
// writes there at once instead of after its next poll of the Lease.
type LeaderNotice struct {
	Leader string
	Epoch  uint64
}

func (m *LeaderNotice) encode(e *encoder) {
	e.str(m.Leader)
	e.uvarint(m.Epoch)
}

func (m *LeaderNotice) decode(d *decoder) { m.Leader, m.Epoch = d.str(), d.uvarint() }

// LeaseReleased tells a peer that From has just released the Lease on
// shutdown, so it campaigns now.
type LeaseReleased struct {
	From string
}

func (m *LeaseReleased) encode(e *encoder) { e.str(m.From) }
func (m *LeaseReleased) decode(d *decoder) { m.From = d.str() }

// empty is the body of a reply that carries nothing.
type empty struct{}

func (*empty) encode(*encoder) {}
func (*empty) decode(*decoder) {}

// PageBytes bounds the entries of one paged call or reply: a replication
// batch, an Entries page, a List page. A page stops before it would pass
// PageBytes, except that it always holds one entry, so a value of any
// allowed size still moves; a call or reply is therefore at most
// MaxMessageBytes.
const PageBytes = 8 << 20

// MaxMessageBytes is the largest call or reply a node sends or accepts
// when values are at most maxValue bytes: one page, one more value, and
// room for keys and framing. Receivers size their limits with it, so
// nothing a sender builds within the pages' bounds is ever refused for
// its size.
func MaxMessageBytes(maxValue int64) int64 { return PageBytes + maxValue + 1<<20 }
