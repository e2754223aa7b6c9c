package storage

import (
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Version orders every write the store ever assigns. Epoch is the leadership
// term that assigned it and Seq a per-database counter that never goes back,
// so versions compare as (Epoch, Seq) and a new leader never reuses one.
type Version struct {
	Epoch uint64
	Seq   uint64
}

// String renders the version as "<epoch>.<seq>", the form used in ETags.
func (v Version) String() string {
	return strconv.FormatUint(v.Epoch, 10) + "." + strconv.FormatUint(v.Seq, 10)
}

// IsZero reports whether v is the zero version, which no write ever has.
func (v Version) IsZero() bool { return v == Version{} }

// Less reports whether v orders before o.
func (v Version) Less(o Version) bool {
	if v.Epoch != o.Epoch {
		return v.Epoch < o.Epoch
	}
	return v.Seq < o.Seq
}

// ParseVersion parses the "<epoch>.<seq>" form produced by Version.String.
func ParseVersion(s string) (Version, error) {
	e, q, ok := strings.Cut(s, ".")
	if !ok {
		return Version{}, fmt.Errorf("%w: %q is not <epoch>.<seq>", ErrBadVersion, s)
	}
	epoch, err1 := strconv.ParseUint(e, 10, 64)
	seq, err2 := strconv.ParseUint(q, 10, 64)
	if err1 != nil || err2 != nil || epoch == 0 || seq == 0 {
		return Version{}, fmt.Errorf("%w: %q is not <epoch>.<seq> with positive integers", ErrBadVersion, s)
	}
	return Version{Epoch: epoch, Seq: seq}, nil
}

// Entry is one key's latest state. Value is a private copy the caller owns.
type Entry struct {
	Key     string
	Value   []byte
	Version Version
	// Deleted marks a tombstone: the key was deleted at Version. Get and Scan
	// never return tombstones; they exist so that a delete is ordered against
	// the writes around it (replication needs that).
	Deleted bool
}

// Record layout in the kv bucket (see DESIGN.md):
//
//	[0]     record format (recordFormat)
//	[1]     flags (bit 0: tombstone)
//	[2:10]  epoch, big endian
//	[10:18] seq, big endian
//	[18:]   the JSON value exactly as the client sent it
const (
	recordFormat    = 1
	recordHeader    = 18
	flagTombstone   = 1 << 0
	errCorruptShort = "record shorter than its header"
)

func encodeRecord(v Version, value []byte, deleted bool) []byte {
	buf := make([]byte, recordHeader+len(value))
	buf[0] = recordFormat
	if deleted {
		buf[1] = flagTombstone
	}
	binary.BigEndian.PutUint64(buf[2:10], v.Epoch)
	binary.BigEndian.PutUint64(buf[10:18], v.Seq)
	copy(buf[recordHeader:], value)
	return buf
}

// decodeRecord copies the record out of bbolt's memory map: bbolt's slices are
// only valid inside the transaction that produced them.
func decodeRecord(key string, raw []byte) (Entry, error) {
	if len(raw) < recordHeader {
		return Entry{}, fmt.Errorf("%w: key %q: %s", ErrCorrupt, key, errCorruptShort)
	}
	if raw[0] != recordFormat {
		return Entry{}, fmt.Errorf("%w: key %q: record format %d", ErrCorrupt, key, raw[0])
	}
	e := Entry{
		Key:     key,
		Deleted: raw[1]&flagTombstone != 0,
		Version: Version{
			Epoch: binary.BigEndian.Uint64(raw[2:10]),
			Seq:   binary.BigEndian.Uint64(raw[10:18]),
		},
	}
	if !e.Deleted {
		e.Value = append([]byte(nil), raw[recordHeader:]...)
	}
	return e, nil
}

// recordVersion reads only the header, for condition checks that need no value.
func recordVersion(raw []byte) (v Version, deleted bool, ok bool) {
	if len(raw) < recordHeader || raw[0] != recordFormat {
		return Version{}, false, false
	}
	return Version{
		Epoch: binary.BigEndian.Uint64(raw[2:10]),
		Seq:   binary.BigEndian.Uint64(raw[10:18]),
	}, raw[1]&flagTombstone != 0, true
}

// ConditionError is returned (wrapping ErrConditionFailed) when a write's
// precondition does not hold. Current is the key's live version, zero when
// the key does not exist.
type ConditionError struct {
	Key     string
	Current Version
}

func (e *ConditionError) Error() string {
	if e.Current.IsZero() {
		return fmt.Sprintf("condition failed: key %q does not exist", e.Key)
	}
	return fmt.Sprintf("condition failed: key %q is at version %s", e.Key, e.Current)
}

// Unwrap lets errors.Is(err, ErrConditionFailed) match.
func (e *ConditionError) Unwrap() error { return ErrConditionFailed }

// Request records in the requests bucket (see DESIGN.md):
//
//	[0:8]   unix nanos when applied (for expiry)
//	[8]     flags (bit 0: deleted, bit 1: created)
//	[9:17]  epoch
//	[17:25] seq
//	[25:]   key
func encodeRequest(res Result, at time.Time) []byte {
	buf := make([]byte, 25+len(res.Entry.Key))
	binary.BigEndian.PutUint64(buf[0:8], uint64(at.UnixNano()))
	if res.Entry.Deleted {
		buf[8] |= 1
	}
	if res.Created {
		buf[8] |= 2
	}
	binary.BigEndian.PutUint64(buf[9:17], res.Entry.Version.Epoch)
	binary.BigEndian.PutUint64(buf[17:25], res.Entry.Version.Seq)
	copy(buf[25:], res.Entry.Key)
	return buf
}

func decodeRequest(raw []byte) (res Result, key string, ok bool) {
	if len(raw) < 25 {
		return Result{}, "", false
	}
	key = string(raw[25:])
	res = Result{
		Entry: Entry{
			Key:     key,
			Deleted: raw[8]&1 != 0,
			Version: Version{Epoch: binary.BigEndian.Uint64(raw[9:17]), Seq: binary.BigEndian.Uint64(raw[17:25])},
		},
		Created:  raw[8]&2 != 0,
		Replayed: true,
	}
	return res, key, true
}
