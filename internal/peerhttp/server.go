package peerhttp

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
)

// ErrNotUpgrade is returned by Server.Upgrade for a request that does not
// ask for Protocol; nothing has been written to the response.
var ErrNotUpgrade = errors.New("peerhttp: not an upgrade request for " + Protocol)

// ErrCannotTakeOver is returned by Server.Upgrade when the connection
// cannot be hijacked (the ResponseWriter does not allow it).
var ErrCannotTakeOver = errors.New("peerhttp: this connection cannot be taken over")

// ErrServerClosed is returned by Server.Upgrade once Shutdown has begun.
var ErrServerClosed = errors.New("peerhttp: server shutting down")

// Server serves the requests that arrive over upgraded connections with
// Handler, each in its own goroutine, as net/http would.
type Server struct {
	// Handler serves every request; the request's RemoteAddr is the peer's.
	Handler http.Handler
	// WriteTimeout bounds one write of answers to a peer; a peer that
	// reads nothing for that long loses the connection. Default 10s.
	WriteTimeout time.Duration
	// MaxFrameBytes bounds one frame either way: a larger request ends the
	// connection, a larger response is answered with an error. Default
	// MaxFrameBytes.
	MaxFrameBytes int

	mu      sync.Mutex
	conns   map[*serverConn]struct{}
	closing bool
}

// Upgrade takes over r's connection, which must ask for Protocol, and
// serves requests on it until the peer closes it or Shutdown. For a
// request that is not such an upgrade it returns ErrNotUpgrade (or
// ErrServerClosed) without writing anything, so the caller answers in its
// own error format.
func (s *Server) Upgrade(w http.ResponseWriter, r *http.Request) error {
	if !headerHasToken(r.Header, "Connection", "upgrade") || !strings.EqualFold(r.Header.Get("Upgrade"), Protocol) {
		return ErrNotUpgrade
	}
	s.mu.Lock()
	closing := s.closing
	s.mu.Unlock()
	if closing {
		return ErrServerClosed
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return fmt.Errorf("%w: %w", ErrCannotTakeOver, err)
	}
	// net/http's read and write deadlines were for one request; this
	// connection lives until one side closes it.
	_ = conn.SetDeadline(time.Time{})
	if _, err := io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "+Protocol+"\r\n\r\n"); err != nil {
		_ = conn.Close()
		return nil // the response is gone with the connection
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &serverConn{srv: s, conn: conn, r: brw.Reader, w: newFrameWriter(conn, orDefault(s.WriteTimeout, 10*time.Second)), ctx: ctx, cancel: cancel, done: make(chan struct{})}
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		c.w.flushAndStop()
		_ = conn.Close()
		cancel()
		return nil
	}
	if s.conns == nil {
		s.conns = make(map[*serverConn]struct{})
	}
	s.conns[c] = struct{}{}
	s.mu.Unlock()
	go c.serve()
	return nil
}

// Shutdown stops reading new requests on every connection, tells each peer
// the last request it read (so the peer knows which of its requests were
// never seen and may go elsewhere), serves those already read, sends their
// responses and closes. When ctx ends first it closes the connections at
// once, cancels the requests still being served, and returns ctx's error.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	conns := make([]*serverConn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		// Unblocks the reader, which then says goodbye (serve).
		_ = c.conn.SetReadDeadline(time.Now())
	}
	for _, c := range conns {
		select {
		case <-c.done:
		case <-ctx.Done():
			for _, c := range conns {
				c.cancel() // the requests still running are abandoned
				_ = c.conn.Close()
			}
			// Cancelled handlers still finish what they started (a write
			// commits or not); the caller's next steps assume none is
			// running, so wait for them, within reason.
			deadline := time.After(abandonWait)
			for _, c := range conns {
				select {
				case <-c.done:
				case <-deadline:
				}
			}
			return ctx.Err()
		}
	}
	return nil
}

func (s *Server) shuttingDown() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing
}

type serverConn struct {
	srv  *Server
	conn net.Conn
	r    *bufio.Reader
	w    *frameWriter
	// ctx is every request's context; it ends when the peer goes away
	// (as net/http cancels a request whose client disconnected), not on
	// Shutdown, which lets the requests it has read finish.
	ctx      context.Context
	cancel   context.CancelFunc
	inflight sync.WaitGroup
	done     chan struct{}
}

func (c *serverConn) serve() {
	defer close(c.done)
	defer func() {
		c.srv.mu.Lock()
		delete(c.srv.conns, c)
		c.srv.mu.Unlock()
	}()
	var last uint64 // the last request read in full
	for {
		f, err := readFrame(c.r, frameLimit(c.srv.MaxFrameBytes))
		if err != nil {
			break
		}
		if f.kind != kindRequest {
			break // a peer that breaks the protocol gets no more service
		}
		last = f.id
		req, err := c.decodeRequest(f.payload)
		c.inflight.Add(1)
		if err != nil {
			go c.answer(f.id, http.StatusBadRequest, jsonError("bad_request", err.Error()))
			continue
		}
		go c.handle(f.id, req)
	}
	if c.srv.shuttingDown() {
		// Requests after last were never read: the peer may send them
		// elsewhere. Those up to last are answered below.
		_ = c.w.send(nil, func(b []byte) ([]byte, uint64, bool) {
			b, start := beginFrame(b, kindGoAway, last)
			return endFrame(b, start), 0, true
		})
	} else {
		c.cancel() // the peer is gone; so is anyone waiting for answers
	}
	c.inflight.Wait()
	c.w.flushAndStop()
	c.lingerClose()
	c.cancel()
}

// lingerClose closes gracefully: closing a socket with unread frames in it
// makes the kernel send a reset, which can destroy answers the peer has
// not read yet. So it half-closes, discards what the peer still sends
// until the peer closes too (it does on reading EOF), and then closes.
func (c *serverConn) lingerClose() {
	defer c.conn.Close()
	cw, ok := c.conn.(interface{ CloseWrite() error })
	if !ok || cw.CloseWrite() != nil {
		return
	}
	_ = c.conn.SetReadDeadline(time.Now().Add(lingerTimeout))
	_, _ = io.Copy(io.Discard, c.conn)
}

// abandonWait bounds how long Shutdown waits for cancelled handlers.
const abandonWait = 5 * time.Second

// lingerTimeout bounds the wait for the peer to close after this side has.
const lingerTimeout = 2 * time.Second

func (c *serverConn) decodeRequest(payload []byte) (*http.Request, error) {
	d := decoder{b: payload}
	method, host, uri := d.str8(), d.str16(), d.str16()
	header := d.headers()
	body := d.rest()
	if d.err != nil {
		return nil, d.err
	}
	u, err := url.ParseRequestURI(uri)
	if err != nil {
		return nil, fmt.Errorf("request URI %q: %w", uri, err)
	}
	req := (&http.Request{
		Method:        method,
		URL:           u,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        header,
		Body:          http.NoBody,
		ContentLength: int64(len(body)),
		Host:          host,
		RemoteAddr:    c.conn.RemoteAddr().String(),
		RequestURI:    uri,
	}).WithContext(c.ctx)
	if len(body) > 0 {
		req.Body = newFrameBody(body)
	}
	return req, nil
}

// handle serves one request and queues its response.
func (c *serverConn) handle(id uint64, req *http.Request) {
	rec := &recorder{header: make(http.Header)}
	defer func() {
		if p := recover(); p != nil {
			// net/http survives a panicking handler; so does this
			// connection, and the peer gets a 500 instead of silence.
			rec = &recorder{status: http.StatusInternalServerError, header: make(http.Header)}
			rec.header.Set("Content-Type", "application/json")
			rec.body.Write(jsonError("internal", fmt.Sprintf("the handler failed: %v", p)))
		}
		c.answerRecorded(id, rec)
	}()
	c.srv.Handler.ServeHTTP(rec, req)
}

func (c *serverConn) answerRecorded(id uint64, rec *recorder) {
	defer c.inflight.Done()
	status := rec.status
	if status == 0 {
		status = http.StatusOK
	}
	body := rec.body.Bytes()
	if len(body) > frameLimit(c.srv.MaxFrameBytes)-64<<10 || !headersFit(rec.header) {
		status, body = http.StatusBadGateway, jsonError("response_too_large", "the response does not fit a peer connection frame")
		rec.header = http.Header{"Content-Type": {"application/json"}}
	}
	// A large body (a read's value) is written from the recorder, not
	// copied into the writer's buffer first: the response is held once.
	var tail []byte
	if len(body) >= tailBytes {
		body, tail = nil, body
	}
	_ = c.w.send(tail, func(b []byte) ([]byte, uint64, bool) {
		return appendResponse(b, id, status, rec.header, body, len(tail)), 0, true
	})
}

func (c *serverConn) answer(id uint64, status int, body []byte) {
	rec := &recorder{status: status, header: http.Header{"Content-Type": {"application/json"}}}
	rec.body.Write(body)
	c.answerRecorded(id, rec)
}

// appendResponse appends a response frame whose body is body followed by
// tail more bytes that the writer sends after it (frameWriter.send).
func appendResponse(b []byte, id uint64, status int, h http.Header, body []byte, tail int) []byte {
	b, start := beginFrame(b, kindResponse, id)
	b = append(b, byte(status>>8), byte(status))
	b = appendHeaders(b, h)
	b = append(b, body...)
	return endFrameWith(b, start, tail)
}

func jsonError(code, msg string) []byte {
	// The shape of the store's own error bodies.
	return fmt.Appendf(nil, `{"error":{"code":%q,"message":%q}}`, code, msg)
}

// recorder is the http.ResponseWriter of a request that arrived in a frame.
type recorder struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (r *recorder) Header() http.Header { return r.header }

func (r *recorder) WriteHeader(code int) {
	if r.status == 0 && code >= 200 {
		r.status = code
	}
}

func (r *recorder) Write(p []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	if r.body.Cap() == 0 {
		// A body of announced length (a read's value, a peer call's
		// reply) is held in one buffer of its size, not grown by
		// doubling through twice its size. The frame bound caps what a
		// header may make it reserve.
		if n, err := strconv.Atoi(r.header.Get("Content-Length")); err == nil && n > len(p) && n <= MaxFrameBytes {
			r.body.Grow(n)
		}
	}
	return r.body.Write(p)
}

// headerHasToken reports whether the comma-separated header name contains
// token, case-insensitively (Connection: keep-alive, Upgrade).
func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for part := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(part), token) {
				return true
			}
		}
	}
	return false
}
