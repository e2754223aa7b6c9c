package transport

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// The codec is a plain length-prefixed binary encoding: unsigned varints
// for numbers and lengths, raw bytes for strings and values. Values travel
// exactly as the client sent them, with no escaping: a JSON string carrier
// cost up to six bytes per '<' and replaced invalid UTF-8.
//
// Every message starts with codecVersion, so a node can refuse a body of a
// format it does not know instead of misreading it.
const codecVersion = 2

// errDecode wraps every decoding failure of a peer's body.
var errDecode = errors.New("transport: malformed message")

// encoder builds a message. With byRef set, a large bytes field is not
// copied: the encoder keeps a reference to it in segs and goes on in a
// fresh b, so writing a reply of a 64 MiB value costs no 64 MiB buffer.
// The referenced bytes must not change until the segments are written.
type encoder struct {
	b     []byte
	byRef bool
	segs  [][]byte // the message so far, before b
}

// refBytes is the size from which a bytes field is referenced rather than
// copied: below it a copy is cheaper than a separate write.
const refBytes = 32 << 10

func (e *encoder) uvarint(v uint64) { e.b = binary.AppendUvarint(e.b, v) }
func (e *encoder) bytes(p []byte) {
	e.uvarint(uint64(len(p)))
	if e.byRef && len(p) >= refBytes {
		e.segs = append(e.segs, e.b, p)
		e.b = make([]byte, 0, 64)
		return
	}
	e.b = append(e.b, p...)
}
func (e *encoder) str(s string) { e.uvarint(uint64(len(s))); e.b = append(e.b, s...) }
func (e *encoder) version(v Version) {
	e.uvarint(v.Epoch)
	e.uvarint(v.Seq)
}

func (e *encoder) bool(v bool) {
	if v {
		e.b = append(e.b, 1)
	} else {
		e.b = append(e.b, 0)
	}
}

// decoder reads what encoder wrote. The first failure sticks: later reads
// return zero values, and err reports it, so message decoders need not
// check every field.
type decoder struct {
	b   []byte
	err error
}

func newDecoder(b []byte) *decoder {
	d := &decoder{b: b}
	if v := d.uvarint(); d.err == nil && v != codecVersion {
		d.fail(fmt.Sprintf("codec version %d, this node speaks %d", v, codecVersion))
	}
	return d
}

func (d *decoder) fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: %s", errDecode, what)
	}
	d.b = nil
}

func (d *decoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail("bad varint")
		return 0
	}
	d.b = d.b[n:]
	return v
}

// take returns the next length-prefixed field without copying. A declared
// length beyond what is left is refused before anything is allocated.
func (d *decoder) take() []byte {
	n := d.uvarint()
	if d.err != nil {
		return nil
	}
	if n > uint64(len(d.b)) {
		d.fail(fmt.Sprintf("field of %d bytes with %d left", n, len(d.b)))
		return nil
	}
	p := d.b[:n:n]
	d.b = d.b[n:]
	return p
}

// bytes returns the field without copying it: it aliases the body, which
// unmarshal's callers hand over and never reuse. A value read from a peer
// is therefore held once, in the body it arrived in, and not a second time
// per field (an empty field is nil, as before).
func (d *decoder) bytes() []byte {
	p := d.take()
	if len(p) == 0 {
		return nil
	}
	return p
}

func (d *decoder) str() string { return string(d.take()) }

func (d *decoder) version() Version { return Version{Epoch: d.uvarint(), Seq: d.uvarint()} }

func (d *decoder) bool() bool {
	if d.err != nil {
		return false
	}
	if len(d.b) == 0 {
		d.fail("missing bool")
		return false
	}
	v := d.b[0]
	d.b = d.b[1:]
	if v > 1 {
		d.fail("bad bool")
	}
	return v == 1
}

// count reads a list length and refuses one that cannot fit in what is
// left (every element takes at least min bytes), so a peer cannot make
// this node allocate a huge slice with a few bytes.
func (d *decoder) count(min int) int {
	n := d.uvarint()
	if d.err != nil {
		return 0
	}
	if n > uint64(len(d.b)/min) {
		d.fail(fmt.Sprintf("list of %d elements in %d bytes", n, len(d.b)))
		return 0
	}
	return int(n)
}

// done reports the first failure, or trailing bytes nobody read.
func (d *decoder) done() error {
	if d.err == nil && len(d.b) != 0 {
		d.fail(fmt.Sprintf("%d trailing bytes", len(d.b)))
	}
	return d.err
}

// message is what travels in a request or reply body.
type message interface {
	encode(e *encoder)
	decode(d *decoder)
}

func marshal(m message) []byte {
	e := &encoder{b: make([]byte, 0, 64)}
	e.uvarint(codecVersion)
	m.encode(e)
	return e.b
}

// marshalSegments encodes m as segments to be written in order, the large
// values among them by reference (see encoder), and their total length.
func marshalSegments(m message) (segs [][]byte, n int) {
	e := &encoder{b: make([]byte, 0, 64), byRef: true}
	e.uvarint(codecVersion)
	m.encode(e)
	segs = append(e.segs, e.b)
	for _, s := range segs {
		n += len(s)
	}
	return segs, n
}

// unmarshal decodes b into m. The byte fields of m alias b (decoder.bytes):
// b must be the caller's own buffer, never written again.
func unmarshal(b []byte, m message) error {
	d := newDecoder(b)
	m.decode(d)
	return d.done()
}
