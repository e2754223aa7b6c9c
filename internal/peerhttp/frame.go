package peerhttp

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"sync"
	"time"
)

// Protocol is the Upgrade token of the connection.
const Protocol = "statefulkv-peer/1"

// MaxFrameBytes is the default bound of one request or response on the
// connection (Server.MaxFrameBytes, Transport.MaxFrameBytes). Larger
// requests go through the Fallback transport; a larger response is
// answered with an error. Values are at most 64 MiB (--max-value-bytes);
// main sets the bound from the value limit.
const MaxFrameBytes = 1 << 30

// frameLimit is a configured frame bound, or the default.
func frameLimit(configured int) int {
	if configured <= 0 || configured > MaxFrameBytes {
		return MaxFrameBytes
	}
	return configured
}

// Frame layout, all integers big-endian:
//
//	u32 payload length | u8 kind | u64 id | payload
//
// request payload:  str8 method | str16 request URI | headers | body
// response payload: u16 status | headers | body
// goaway payload:   empty; id is the last request id the server read
// headers:          u16 count, then count × (str16 name | str16 value)
//
// The body is whatever remains of the payload.
const (
	kindRequest  byte = 1
	kindResponse byte = 2
	kindGoAway   byte = 3

	frameHeaderBytes = 4 + 1 + 8
)

var (
	errFrameTooLarge = errors.New("peerhttp: frame too large")
	errBadFrame      = errors.New("peerhttp: malformed frame")
)

// frame is one decoded frame; its fields alias the read buffer.
type frame struct {
	kind    byte
	id      uint64
	payload []byte
}

// readFrame reads the next frame, of at most maxBytes, from r into a fresh
// buffer. The buffer grows with the bytes that actually arrive, never
// ahead of them by more than what has arrived, so a peer that declares a
// huge frame and sends little costs what it sent.
func readFrame(r *bufio.Reader, maxBytes int) (frame, error) {
	var hdr [frameHeaderBytes]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return frame{}, err
	}
	n := int(binary.BigEndian.Uint32(hdr[0:4]))
	if n > maxBytes {
		return frame{}, fmt.Errorf("%w: %d bytes, the limit is %d", errFrameTooLarge, n, maxBytes)
	}
	f := frame{kind: hdr[4], id: binary.BigEndian.Uint64(hdr[5:13])}
	// Each step doubles what has arrived, and the steps are chosen back
	// from n (n/2^k, ..., n/2, n), so the last one is exactly n and all of
	// them together allocate at most 2n; doubling up from a fixed start
	// would end just past a power of two with one more buffer of nearly n.
	shift := 0
	for n>>shift > 64<<10 {
		shift++
	}
	buf := make([]byte, 0, ceilShift(n, shift))
	for len(buf) < n {
		if len(buf) == cap(buf) {
			shift--
			next := make([]byte, len(buf), ceilShift(n, shift))
			buf = next[:copy(next, buf)]
		}
		m, err := io.ReadFull(r, buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+m]
		if err != nil {
			return frame{}, fmt.Errorf("%w: truncated: %w", errBadFrame, err)
		}
	}
	f.payload = buf
	return f, nil
}

// frameBody is the body of a request or response that arrived in a frame,
// already whole in memory. Bytes hands what is unread over without a copy,
// so a caller that keeps the whole body (internal/transport decodes a
// reply in place) holds a value once, in the frame it came in.
type frameBody struct {
	*bytes.Reader
	b []byte
}

func newFrameBody(b []byte) *frameBody { return &frameBody{Reader: bytes.NewReader(b), b: b} }

// Bytes returns the unread rest of the body, without copying it.
func (f *frameBody) Bytes() []byte { return f.b[len(f.b)-f.Len():] }

// Close implements io.Closer; there is nothing to release.
func (f *frameBody) Close() error { return nil }

// ceilShift is n / 2^shift, rounded up.
func ceilShift(n, shift int) int { return (n + 1<<shift - 1) >> shift }

// beginFrame appends a frame header with a placeholder length; endFrame
// fills it in once the payload is appended.
func beginFrame(b []byte, kind byte, id uint64) ([]byte, int) {
	start := len(b)
	b = append(b, 0, 0, 0, 0, kind)
	return binary.BigEndian.AppendUint64(b, id), start
}

func endFrame(b []byte, start int) []byte { return endFrameWith(b, start, 0) }

// endFrameWith fills in the length of a frame whose last tail bytes are
// not in b but follow it on the wire (frameWriter.send's tail).
func endFrameWith(b []byte, start, tail int) []byte {
	binary.BigEndian.PutUint32(b[start:], uint32(len(b)-start-frameHeaderBytes+tail))
	return b
}

// tailBytes is the size from which a body is written from where it lies,
// by reference, instead of being copied into the writer's buffer.
const tailBytes = 32 << 10

// headersFit reports whether h can be encoded (every name and value under
// 64 KiB, fewer than 64 Ki of them).
func headersFit(h http.Header) bool {
	n := 0
	for k, vs := range h {
		if len(k) > 0xffff {
			return false
		}
		for _, v := range vs {
			if len(v) > 0xffff {
				return false
			}
			n++
		}
	}
	return n <= 0xffff
}

func appendHeaders(b []byte, h http.Header) []byte {
	n := 0
	for _, vs := range h {
		n += len(vs)
	}
	b = binary.BigEndian.AppendUint16(b, uint16(n))
	for k, vs := range h {
		for _, v := range vs {
			b = appendStr16(b, k)
			b = appendStr16(b, v)
		}
	}
	return b
}

func appendStr16(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

// decoder reads the fields of a payload in order; the first short read
// sets err and every later read returns zero values.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) take(n int) []byte {
	if d.err != nil || n > len(d.b) {
		d.err = errBadFrame
		return nil
	}
	out := d.b[:n]
	d.b = d.b[n:]
	return out
}

func (d *decoder) u8() int {
	b := d.take(1)
	if b == nil {
		return 0
	}
	return int(b[0])
}

func (d *decoder) u16() int {
	b := d.take(2)
	if b == nil {
		return 0
	}
	return int(binary.BigEndian.Uint16(b))
}

func (d *decoder) str8() string  { return string(d.take(d.u8())) }
func (d *decoder) str16() string { return string(d.take(d.u16())) }

func (d *decoder) headers() http.Header {
	n := d.u16()
	h := make(http.Header, n)
	for range n {
		k := d.str16()
		h[k] = append(h[k], d.str16())
	}
	return h
}

// rest is the body: whatever the fields before it left.
func (d *decoder) rest() []byte {
	b := d.b
	d.b = nil
	return b
}

// frameWriter queues frames from any goroutine and sends them from one:
// everything queued while a write is under way goes out in the next
// single write, which is what makes many requests share a system call.
type frameWriter struct {
	conn net.Conn
	// timeout bounds one write: a peer that reads nothing for that long
	// (dead, or paused with its socket buffers full) loses the connection
	// rather than pinning frames in memory.
	timeout time.Duration

	mu  sync.Mutex
	buf []byte
	// queued is what was queued before buf, written first and in order. It
	// holds the large bodies by reference (send's tail) and the buffers
	// they interrupted.
	queued  [][]byte
	ids     []uint64 // the request ids whose frames are queued
	unsent  []uint64 // after a failed write: ids that never reached a write
	err     error    // the first write error; later sends fail with it
	stopped bool
	wake    chan struct{}
	done    chan struct{}
}

func newFrameWriter(conn net.Conn, timeout time.Duration) *frameWriter {
	w := &frameWriter{conn: conn, timeout: timeout, wake: make(chan struct{}, 1), done: make(chan struct{})}
	go w.run()
	return w
}

// send appends a frame with encode, under the writer's lock: frames leave
// in the order their encode calls ran. encode returns the request id the
// frame carries (0 for other frames), or ok=false to append nothing. tail,
// if not nil, is the end of the frame (encode counted it in the frame's
// length, endFrameWith): it is written from where it lies, never copied,
// and must not change until the frame is written (or the writer failed).
// A body of megabytes thus costs no second copy in the writer's buffer.
func (w *frameWriter) send(tail []byte, encode func([]byte) (b []byte, id uint64, ok bool)) error {
	w.mu.Lock()
	if w.err != nil {
		w.mu.Unlock()
		return w.err
	}
	b, id, ok := encode(w.buf)
	if !ok {
		w.mu.Unlock()
		return errRefused
	}
	w.buf = b
	if len(tail) > 0 {
		w.queued = append(w.queued, w.buf, tail)
		w.buf = nil
	}
	if id != 0 {
		w.ids = append(w.ids, id)
	}
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default: // a wake-up is pending; it will see this frame too
	}
	return nil
}

// errRefused: send's encode declined to queue the frame.
var errRefused = errors.New("peerhttp: frame not queued")

func (w *frameWriter) run() {
	defer close(w.done)
	var (
		out    []byte
		ids    []uint64
		queued [][]byte
	)
	for range w.wake {
		// Let the goroutines that are ready to queue a frame do so first:
		// woken by the first frame of a burst, the writer would otherwise
		// send it alone and pay a system call per frame. On an idle
		// connection this costs one pass of the scheduler.
		runtime.Gosched()
		w.mu.Lock()
		out, w.buf = w.buf, out[:0]
		ids, w.ids = w.ids, ids[:0]
		queued, w.queued = w.queued, queued[:0]
		stop := w.stopped && len(out) == 0 && len(queued) == 0
		w.mu.Unlock()
		if stop {
			return
		}
		if len(out) == 0 && len(queued) == 0 {
			continue
		}
		_ = w.conn.SetWriteDeadline(time.Now().Add(w.timeout))
		// One writev for the lot; WriteTo consumes its own copy of the
		// list, so out and queued keep their buffers for reuse.
		vec := append(net.Buffers(nil), queued...)
		vec = append(vec, out)
		_, err := vec.WriteTo(w.conn)
		clear(queued) // the bodies are written: let them go
		if err != nil {
			w.mu.Lock()
			w.err = err
			// Frames queued after this batch never reached the socket.
			w.unsent = w.ids
			w.buf, w.ids, w.queued = nil, nil, nil
			w.mu.Unlock()
			// The reader must not wait for answers that cannot come.
			_ = w.conn.Close()
			return
		}
		// A buffer grown by one huge frame is not kept for the life of
		// the connection.
		if cap(out) > 1<<20 {
			out = nil
		}
		if cap(queued) > 64 {
			queued = nil
		}
	}
}

// unsentIDs lists, after the writer stopped on a write error, the request
// ids whose frames never reached the socket.
func (w *frameWriter) unsentIDs() []uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.unsent
}

// flushAndStop sends what is queued and stops the writer; later sends
// fail. It returns once the last write is done (or failed).
func (w *frameWriter) flushAndStop() {
	w.mu.Lock()
	w.stopped = true
	if w.err == nil {
		w.err = net.ErrClosed
	}
	w.mu.Unlock()
	// Each pass of run writes what is left or, finding nothing, returns;
	// keep waking it until it has returned (or failed).
	for {
		select {
		case <-w.done:
			return
		case w.wake <- struct{}{}:
		}
	}
}
