package transport

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// InMem connects Services within one process, for tests: a call is a
// function call, but its request, reply and error go through the same
// codec as on the wire, so a test sees what a peer would. A test injects
// faults per call (a partition, a lost reply, a delay); under
// testing/synctest the delays take no real time.
//
// Safe for concurrent use.
type InMem struct {
	mu    sync.Mutex
	nodes map[string]Services
	fault func(Call) Fault
	// limit, when positive, is the receivers' size limit (SetLimit);
	// largest is the largest call or reply carried.
	limit   int64
	largest atomic.Int64
}

// Call names one call for a fault function.
type Call struct {
	From, To string
	// Path is the call's path (WritePath, ReadPath, ...).
	Path string
}

// Fault says what happens to one call. The zero Fault delivers it.
type Fault struct {
	// Delay holds the call this long before it reaches the peer (or until
	// the caller's context ends).
	Delay time.Duration
	// Unreachable fails the call before it reaches the peer (ErrNotSent),
	// as a partition or a dead peer would.
	Unreachable bool
	// LoseReply lets the peer serve the call and then loses its answer:
	// the caller gets an error that does not say whether it was served.
	LoseReply bool
	// DelayReply lets the peer serve the call and holds its answer this
	// long (a peer that stalls after applying); if the caller's context
	// ends first, it gets that context's error.
	DelayReply time.Duration
}

// ErrReplyLost is the caller's error for a call whose reply was lost.
var ErrReplyLost = errors.New("transport: connection lost before the reply")

// NewInMem returns an empty network.
func NewInMem() *InMem { return &InMem{nodes: map[string]Services{}} }

// Register makes s reachable as id (a later Register replaces it).
func (m *InMem) Register(id string, s Services) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.nodes[id] = s
}

// Unregister makes id unreachable, as if its process had died.
func (m *InMem) Unregister(id string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.nodes, id)
}

// SetFault sets the function consulted for every call (nil: deliver all).
func (m *InMem) SetFault(f func(Call) Fault) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.fault = f
}

// SetLimit makes every receiver refuse a call, and every caller a reply,
// larger than n encoded bytes (0: no limit), as the real handler and
// client do with MaxMessageBytes: a sender that builds a message past
// what a peer accepts fails in tests as it would on the wire.
func (m *InMem) SetLimit(n int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.limit = n
}

// Largest is the size of the largest encoded call or reply carried so far.
func (m *InMem) Largest() int64 { return m.largest.Load() }

// Client returns the client that node from calls its peers with. It has
// the same methods as HTTP.
func (m *InMem) Client(from string) *InMemClient { return &InMemClient{net: m, from: from} }

// InMemClient is one node's end of an InMem network.
type InMemClient struct {
	net  *InMem
	from string
}

// Write is HTTP.Write over the in-memory network.
func (c *InMemClient) Write(ctx context.Context, to string, w Write) (WriteReply, error) {
	var r WriteReply
	err := c.call(ctx, to, WritePath, &w, &r, func(s Services, req message) (message, error) {
		rep, err := s.Node.Write(ctx, *req.(*Write))
		return &rep, err
	})
	return r, err
}

// Read is HTTP.Read over the in-memory network.
func (c *InMemClient) Read(ctx context.Context, to string, rd Read) (ReadReply, error) {
	var r ReadReply
	err := c.call(ctx, to, ReadPath, &rd, &r, func(s Services, req message) (message, error) {
		rep, err := s.Node.Read(ctx, *req.(*Read))
		return &rep, err
	})
	return r, err
}

// List is HTTP.List over the in-memory network.
func (c *InMemClient) List(ctx context.Context, to string, l List) (ListReply, error) {
	var r ListReply
	err := c.call(ctx, to, ListPath, &l, &r, func(s Services, req message) (message, error) {
		rep, err := s.Node.List(ctx, *req.(*List))
		return &rep, err
	})
	return r, err
}

// NotifyLeader is HTTP.NotifyLeader over the in-memory network.
func (c *InMemClient) NotifyLeader(ctx context.Context, to string, n LeaderNotice) error {
	return c.call(ctx, to, LeaderPath, &n, &empty{}, func(s Services, req message) (message, error) {
		return &empty{}, s.Node.Leader(ctx, *req.(*LeaderNotice))
	})
}

// NotifyLeaseReleased is HTTP.NotifyLeaseReleased over the in-memory network.
func (c *InMemClient) NotifyLeaseReleased(ctx context.Context, to string, n LeaseReleased) error {
	return c.call(ctx, to, LeaseReleasedPath, &n, &empty{}, func(s Services, req message) (message, error) {
		return &empty{}, s.Node.LeaseReleased(ctx, *req.(*LeaseReleased))
	})
}

// Replicate is HTTP.Replicate over the in-memory network.
func (c *InMemClient) Replicate(ctx context.Context, to string, b Batch) (BatchReply, error) {
	var r BatchReply
	err := c.call(ctx, to, ReplicatePath, &b, &r, func(s Services, req message) (message, error) {
		rep, err := s.Replica.Replicate(ctx, *req.(*Batch))
		return &rep, err
	})
	return r, err
}

// Digests is HTTP.Digests over the in-memory network.
func (c *InMemClient) Digests(ctx context.Context, to string, sy Sync) (DigestsReply, error) {
	var r DigestsReply
	err := c.call(ctx, to, DigestsPath, &sy, &r, func(s Services, req message) (message, error) {
		rep, err := s.Replica.Digests(ctx, *req.(*Sync))
		return &rep, err
	})
	return r, err
}

// Entries is HTTP.Entries over the in-memory network.
func (c *InMemClient) Entries(ctx context.Context, to string, sy Sync) (EntriesReply, error) {
	var r EntriesReply
	err := c.call(ctx, to, EntriesPath, &sy, &r, func(s Services, req message) (message, error) {
		rep, err := s.Replica.Entries(ctx, *req.(*Sync))
		return &rep, err
	})
	return r, err
}

// ReadIndex is HTTP.ReadIndex over the in-memory network.
func (c *InMemClient) ReadIndex(ctx context.Context, to string, ri ReadIndex) (ReadIndexReply, error) {
	var r ReadIndexReply
	err := c.call(ctx, to, ReadIndexPath, &ri, &r, func(s Services, req message) (message, error) {
		rep, err := s.Replica.ReadIndex(ctx, *req.(*ReadIndex))
		return &rep, err
	})
	return r, err
}

// Forget is HTTP.Forget over the in-memory network.
func (c *InMemClient) Forget(ctx context.Context, to string, b Batch) (BatchReply, error) {
	var r BatchReply
	err := c.call(ctx, to, ForgetPath, &b, &r, func(s Services, req message) (message, error) {
		rep, err := s.Replica.Forget(ctx, *req.(*Batch))
		return &rep, err
	})
	return r, err
}

// call encodes req, applies the fault, decodes it into a fresh message of
// the same type for the peer (so neither side shares memory with the
// other), serves it and brings the reply back the same way.
func (c *InMemClient) call(ctx context.Context, to, path string, req, reply message, serve func(Services, message) (message, error)) error {
	c.net.mu.Lock()
	node, ok := c.net.nodes[to]
	fault, limit := c.net.fault, c.net.limit
	c.net.mu.Unlock()
	var f Fault
	if fault != nil {
		f = fault(Call{From: c.from, To: to, Path: path})
	}
	if replica := slices.Contains(ReplicaPaths, path); !ok || f.Unreachable || (replica && node.Replica == nil) || (!replica && node.Node == nil) {
		return notSent(fmt.Errorf("%s: unreachable", to))
	}
	if !hold(ctx, f.Delay) {
		return notSent(fmt.Errorf("%s: %w", to, ctx.Err()))
	}
	body := marshal(req)
	c.net.noteSize(len(body))
	if limit > 0 && int64(len(body)) > limit {
		return &Error{Status: http.StatusRequestEntityTooLarge, Code: CodeTooLarge, Message: fmt.Sprintf("a call of %d bytes, the limit is %d", len(body), limit)}
	}
	in := fresh(req)
	if err := unmarshal(body, in); err != nil {
		return err
	}
	out, err := serve(node, in)
	if f.LoseReply {
		return fmt.Errorf("%s: %w", to, ErrReplyLost)
	}
	if !hold(ctx, f.DelayReply) {
		return fmt.Errorf("%s: no reply: %w", to, ctx.Err())
	}
	if err != nil {
		if node.ErrorOf == nil {
			return err
		}
		e := node.ErrorOf(err)
		var back Error
		if derr := unmarshal(marshal(e), &back); derr != nil {
			return derr
		}
		return &back
	}
	body = marshal(out)
	c.net.noteSize(len(body))
	if limit > 0 && int64(len(body)) > limit {
		return fmt.Errorf("%s: reply of %d bytes exceeds %d bytes", to, len(body), limit)
	}
	return unmarshal(body, reply)
}

func (m *InMem) noteSize(n int) {
	for {
		cur := m.largest.Load()
		if int64(n) <= cur || m.largest.CompareAndSwap(cur, int64(n)) {
			return
		}
	}
}

// hold waits d (if positive) and reports whether ctx is still live.
func hold(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// fresh returns a new zero message of m's type.
func fresh(m message) message {
	switch m.(type) {
	case *Write:
		return &Write{}
	case *Read:
		return &Read{}
	case *List:
		return &List{}
	case *LeaderNotice:
		return &LeaderNotice{}
	case *LeaseReleased:
		return &LeaseReleased{}
	case *Batch:
		return &Batch{}
	case *Sync:
		return &Sync{}
	case *ReadIndex:
		return &ReadIndex{}
	}
	panic(fmt.Sprintf("transport: no message type %T", m))
}
