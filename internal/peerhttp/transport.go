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
	"strconv"
	"sync"
	"time"
)

// Transport is an http.RoundTripper that sends each request over the one
// upgraded connection it keeps per peer address (URL host). Requests with
// a body larger than MaxFrameBytes, and requests to peers that refuse the
// upgrade, go through Fallback.
type Transport struct {
	// Path is the upgrade endpoint on every peer.
	Path string
	// Header is sent with each upgrade request (the cluster token).
	Header http.Header
	// Fallback carries what this transport cannot: required.
	Fallback http.RoundTripper
	// DialTimeout bounds the connect and the upgrade. Default 2s.
	DialTimeout time.Duration
	// RetryUpgradeAfter is how long a peer that refused the upgrade is
	// reached through Fallback before asking again. Default 1m.
	RetryUpgradeAfter time.Duration
	// WriteTimeout bounds one write to a peer; a peer that reads nothing
	// for that long (dead, or paused with full socket buffers) loses the
	// connection, and the next request dials again. Default 5s.
	WriteTimeout time.Duration
	// MaxFrameBytes bounds one frame either way: a larger request goes
	// through Fallback, a larger response fails the connection. Default
	// MaxFrameBytes.
	MaxFrameBytes int

	mu     sync.Mutex
	peers  map[string]*peer
	closed bool
}

// peer is the state kept for one address.
type peer struct {
	mu        sync.Mutex // held while connecting, so one dial per peer
	conn      *clientConn
	plainTill time.Time // refused the upgrade; use Fallback until then
}

// errNotOffered: the peer answered the upgrade with something else.
var errNotOffered = errors.New("peerhttp: peer does not offer " + Protocol)

// RoundTrip implements http.RoundTripper.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	var body []byte
	if req.Body != nil && req.Body != http.NoBody {
		var err error
		body, err = io.ReadAll(io.LimitReader(req.Body, int64(frameLimit(t.MaxFrameBytes)/2+1)))
		if err != nil {
			req.Body.Close()
			return nil, fmt.Errorf("peerhttp: read request body: %w", err)
		}
		if len(body) > frameLimit(t.MaxFrameBytes)/2 {
			// Too big for a frame: the fallback gets what was read and
			// the rest of the body.
			return t.fallback(req, io.MultiReader(bytes.NewReader(body), req.Body), -1)
		}
		req.Body.Close()
	}
	if !headersFit(req.Header) || len(req.Method) > 0xff || len(req.URL.RequestURI()) > 0xffff || len(req.Host) > 0xffff {
		return t.fallback(req, bytes.NewReader(body), int64(len(body)))
	}
	c, err := t.conn(req.Context(), req.URL.Host)
	if errors.Is(err, errNotOffered) {
		return t.fallback(req, bytes.NewReader(body), int64(len(body)))
	}
	if err != nil {
		return nil, err
	}
	return c.roundTrip(req, body)
}

// fallback sends req through Fallback with body (length n, -1 if unknown).
func (t *Transport) fallback(req *http.Request, body io.Reader, n int64) (*http.Response, error) {
	orig := req.Body
	req = req.Clone(req.Context())
	req.Body = struct {
		io.Reader
		io.Closer
	}{body, closerOrNop(orig)}
	req.ContentLength = n
	if n == 0 {
		// No body rather than an empty one net/http would have to probe.
		req.Body = http.NoBody
	}
	return t.Fallback.RoundTrip(req)
}

func closerOrNop(c io.Closer) io.Closer {
	if c == nil {
		return io.NopCloser(nil)
	}
	return c
}

// conn returns the live connection to addr, connecting if there is none.
func (t *Transport) conn(ctx context.Context, addr string) (*clientConn, error) {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil, dialError(addr, net.ErrClosed)
	}
	if t.peers == nil {
		t.peers = make(map[string]*peer)
	}
	p := t.peers[addr]
	if p == nil {
		p = &peer{}
		t.peers[addr] = p
	}
	t.mu.Unlock()

	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conn != nil && p.conn.usable() {
		return p.conn, nil
	}
	if time.Now().Before(p.plainTill) {
		return nil, errNotOffered
	}
	c, err := t.dial(ctx, addr)
	if errors.Is(err, errNotOffered) {
		p.plainTill = time.Now().Add(orDefault(t.RetryUpgradeAfter, time.Minute))
	}
	if err != nil {
		return nil, err
	}
	p.conn = c
	return c, nil
}

func orDefault(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// dial connects and upgrades. Every failure is reported as a dial error:
// no request has been sent yet.
func (t *Transport) dial(ctx context.Context, addr string) (*clientConn, error) {
	timeout := orDefault(t.DialTimeout, 2*time.Second)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	conn, err := (&net.Dialer{KeepAlive: 30 * time.Second}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err // already a *net.OpError with Op "dial"
	}
	fail := func(err error) (*clientConn, error) {
		_ = conn.Close()
		return nil, dialError(addr, err)
	}
	deadline, _ := ctx.Deadline()
	_ = conn.SetDeadline(deadline)
	var hs bytes.Buffer
	fmt.Fprintf(&hs, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: %s\r\n", t.Path, addr, Protocol)
	for k, vs := range t.Header {
		for _, v := range vs {
			fmt.Fprintf(&hs, "%s: %s\r\n", k, v)
		}
	}
	hs.WriteString("\r\n")
	if _, err := conn.Write(hs.Bytes()); err != nil {
		return fail(err)
	}
	r := bufio.NewReaderSize(conn, 64<<10)
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		return fail(fmt.Errorf("peerhttp: upgrade answer: %w", err))
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusSwitchingProtocols:
		if resp.Header.Get("Upgrade") != Protocol {
			_ = conn.Close()
			return nil, fmt.Errorf("%w (switched to %q)", errNotOffered, resp.Header.Get("Upgrade"))
		}
	case http.StatusRequestTimeout, http.StatusTooManyRequests, http.StatusInternalServerError,
		http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		// The peer refused for now (shutting down, say): no request has
		// gone out, so the caller may try again, here or elsewhere.
		return fail(fmt.Errorf("peerhttp: upgrade refused: %s", resp.Status))
	default:
		// No such endpoint (an older version answers 404) or not this
		// protocol: plain HTTP, which also surfaces a refusal such as a
		// 401 to the caller as it is.
		_ = conn.Close()
		return nil, fmt.Errorf("%w (answered %s)", errNotOffered, resp.Status)
	}
	_ = conn.SetDeadline(time.Time{})
	c := &clientConn{conn: conn, w: newFrameWriter(conn, orDefault(t.WriteTimeout, 5*time.Second)), waiting: make(map[uint64]chan result), goneAbove: ^uint64(0)}
	go c.readLoop(r, addr, frameLimit(t.MaxFrameBytes))
	return c, nil
}

// dialError marks err as happening before any request was sent.
func dialError(addr string, err error) error {
	return &net.OpError{Op: "dial", Net: "tcp", Addr: stringAddr(addr), Err: err}
}

type stringAddr string

func (a stringAddr) Network() string { return "tcp" }
func (a stringAddr) String() string  { return string(a) }

// Close closes every connection; requests in flight fail. Later requests
// fail with a dial error.
func (t *Transport) Close() error {
	t.mu.Lock()
	t.closed = true
	peers := t.peers
	t.peers = nil
	t.mu.Unlock()
	for _, p := range peers {
		p.mu.Lock()
		if p.conn != nil {
			_ = p.conn.conn.Close()
		}
		p.mu.Unlock()
	}
	return nil
}

type result struct {
	resp *http.Response
	err  error
}

// clientConn is one upgraded connection to a peer.
type clientConn struct {
	conn net.Conn
	w    *frameWriter

	mu      sync.Mutex
	nextID  uint64
	waiting map[uint64]chan result
	// goneAbove is, after a GOAWAY, the last id the peer read: requests
	// above it were never seen. ^0 until then.
	goneAbove uint64
	broken    error // set once the connection can take no more requests
}

func (c *clientConn) usable() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.broken == nil && c.goneAbove == ^uint64(0)
}

func (c *clientConn) roundTrip(req *http.Request, body []byte) (*http.Response, error) {
	ch := make(chan result, 1)
	var id uint64
	// A large body goes out from where it lies (frameWriter.send's tail).
	var tail []byte
	if len(body) >= tailBytes {
		body, tail = nil, body
	}
	err := c.w.send(tail, func(b []byte) ([]byte, uint64, bool) {
		// Under the writer's lock: ids rise in the order frames are sent,
		// which is what lets a GOAWAY's last id divide seen from unseen.
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.goneAbove != ^uint64(0) {
			return b, 0, false // the peer said goodbye: it would not read this
		}
		c.nextID++
		id = c.nextID
		c.waiting[id] = ch
		return appendRequest(b, id, req, body, len(tail)), id, true
	})
	if err != nil {
		c.forget(id)
		return nil, dialError(req.URL.Host, err) // never queued, never sent
	}
	select {
	case res := <-ch:
		if res.resp != nil {
			res.resp.Request = req
		}
		return res.resp, res.err
	case <-req.Context().Done():
		c.forget(id)
		return nil, req.Context().Err()
	}
}

func (c *clientConn) forget(id uint64) {
	c.mu.Lock()
	delete(c.waiting, id)
	c.mu.Unlock()
}

// appendRequest appends a request frame whose body is body followed by
// tail more bytes that the writer sends after it (frameWriter.send).
func appendRequest(b []byte, id uint64, req *http.Request, body []byte, tail int) []byte {
	b, start := beginFrame(b, kindRequest, id)
	b = append(b, byte(len(req.Method)))
	b = append(b, req.Method...)
	host := req.Host
	if host == "" {
		host = req.URL.Host
	}
	b = appendStr16(b, host)
	b = appendStr16(b, req.URL.RequestURI())
	b = appendHeaders(b, req.Header)
	b = append(b, body...)
	return endFrameWith(b, start, tail)
}

// readLoop delivers responses until the connection ends, then fails every
// request still waiting: as "never sent" if the peer's GOAWAY said it did
// not read it, otherwise as a connection error (it may have been served).
func (c *clientConn) readLoop(r *bufio.Reader, addr string, maxFrame int) {
	var err error
	for {
		var f frame
		f, err = readFrame(r, maxFrame)
		if err != nil {
			break
		}
		switch f.kind {
		case kindResponse:
			resp, derr := decodeResponse(f.payload)
			if derr != nil {
				err = derr
			}
			c.mu.Lock()
			ch := c.waiting[f.id]
			delete(c.waiting, f.id)
			c.mu.Unlock()
			if ch != nil {
				ch <- result{resp: resp, err: derr}
			}
		case kindGoAway:
			c.mu.Lock()
			c.goneAbove = f.id
			unseen := c.takeAbove(f.id)
			c.mu.Unlock()
			for _, ch := range unseen {
				ch <- result{err: dialError(addr, errors.New("peerhttp: the peer is shutting down and did not read this request"))}
			}
		default:
			err = fmt.Errorf("%w: kind %d", errBadFrame, f.kind)
		}
		if err != nil {
			break
		}
	}
	_ = c.conn.Close()
	c.w.flushAndStop()
	unsent := c.w.unsentIDs()
	c.mu.Lock()
	c.broken = fmt.Errorf("peerhttp: connection to %s lost: %w", addr, err)
	unseen := c.takeAbove(c.goneAbove)
	for _, id := range unsent {
		// Queued behind a write that failed: never reached the socket.
		if ch := c.waiting[id]; ch != nil {
			unseen = append(unseen, ch)
			delete(c.waiting, id)
		}
	}
	rest := c.waiting
	c.waiting = map[uint64]chan result{}
	broken := c.broken
	c.mu.Unlock()
	for _, ch := range unseen {
		ch <- result{err: dialError(addr, errors.New("peerhttp: the peer is shutting down and did not read this request"))}
	}
	for _, ch := range rest {
		ch <- result{err: broken}
	}
}

// takeAbove removes and returns the waiters with ids above last; c.mu held.
func (c *clientConn) takeAbove(last uint64) []chan result {
	var out []chan result
	for id, ch := range c.waiting {
		if id > last {
			out = append(out, ch)
			delete(c.waiting, id)
		}
	}
	return out
}

func decodeResponse(payload []byte) (*http.Response, error) {
	d := decoder{b: payload}
	status := d.u16()
	header := d.headers()
	body := d.rest()
	if d.err != nil {
		return nil, fmt.Errorf("%w: response", d.err)
	}
	header.Del("Content-Length")
	return &http.Response{
		Status:        strconv.Itoa(status) + " " + http.StatusText(status),
		StatusCode:    status,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        header,
		Body:          newFrameBody(body),
		ContentLength: int64(len(body)),
	}, nil
}
