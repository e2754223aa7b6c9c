package transport

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// Every message survives the codec byte for byte, values included: no
// escaping, no UTF-8 repair.
func TestCodec_RoundTrip(t *testing.T) {
	raw := []byte("{\"a\":\"<&>\x00\xff\xfe\"}")
	for _, m := range []message{
		&Write{From: "n2", SeenEpoch: 7, RequestID: "id-1", Key: "k/ü", Value: raw, IfMatch: Version{3, 9}, IfExists: true, Ack: "all"},
		&Write{Key: "k", Delete: true, IfAbsent: true},
		&WriteReply{Version: Version{4, 1}, Created: true, Leader: "n1", Epoch: 4},
		&Read{From: "n1", Key: "k", Stale: true, MaxStale: 1500 * time.Millisecond, SeenEpoch: 2},
		&ReadReply{Value: raw, Version: Version{1, 2}, ServedBy: "n3", Consistency: "stale", HasLastContact: true, LastContact: time.Second},
		&List{From: "n2", Prefix: "a", After: "ab", Limit: 1000, SeenEpoch: 5},
		&ListReply{Items: []Item{{Key: "a", Version: Version{1, 1}, Value: raw}, {Key: "b", Version: Version{1, 2}, Value: []byte("1")}}, More: true},
		&ListReply{Items: []Item{}},
		&LeaderNotice{Leader: "n1", Epoch: 9},
		&LeaseReleased{From: "n1"},
		&Error{Status: 412, Code: "condition_failed", Message: "no", Current: Version{2, 3}},
		&Error{Status: 503, Code: "stale_epoch", Message: "old", Fence: 8},
		&Batch{Envelope: Envelope{Epoch: 3, Leader: "n1", Repair: true}, Entries: []Entry{{Key: "a", Value: raw, Version: Version{3, 1}}, {Key: "b", Version: Version{3, 2}, Deleted: true}}},
		&Batch{Envelope: Envelope{Epoch: 3, Leader: "n1"}, Entries: []Entry{}},
		&BatchReply{Applied: 2, Fence: 3},
		&Sync{HasEnvelope: true, Envelope: Envelope{Epoch: 2, Leader: "n2"}, Partitions: []int{0, 7, 270}, VersionsOnly: true, Keys: []string{}},
		&Sync{Partitions: []int{}, Keys: []string{"a", "b"}},
		&DigestsReply{Envelope: Envelope{Epoch: 1, Leader: "n1"}, Digests: []uint64{0, 1 << 63, 42}},
		&EntriesReply{Envelope: Envelope{Epoch: 1, Leader: "n1"}, Entries: []Entry{{Key: "a", Value: raw, Version: Version{1, 1}}}, Covered: 3},
		&ReadIndex{Keys: []string{"a", "ü"}},
		&ReadIndexReply{Envelope: Envelope{Epoch: 4, Leader: "n1"}, Versions: []Version{{4, 1}, {}}},
	} {
		b := marshal(m)
		got := fresh2(m)
		if err := unmarshal(b, got); err != nil {
			t.Fatalf("%T: %v", m, err)
		}
		if diff := cmp.Diff(m, got); diff != "" {
			t.Fatalf("%T changed on the way (-sent +received):\n%s", m, diff)
		}
		// Every proper prefix is refused, never misread.
		for i := range len(b) {
			if err := unmarshal(b[:i], fresh2(m)); err == nil {
				t.Fatalf("%T: a body cut at %d of %d bytes was accepted", m, i, len(b))
			}
		}
	}
}

func fresh2(m message) message {
	switch m.(type) {
	case *WriteReply:
		return &WriteReply{}
	case *ReadReply:
		return &ReadReply{}
	case *ListReply:
		return &ListReply{}
	case *Error:
		return &Error{}
	case *BatchReply:
		return &BatchReply{}
	case *DigestsReply:
		return &DigestsReply{}
	case *EntriesReply:
		return &EntriesReply{}
	case *ReadIndexReply:
		return &ReadIndexReply{}
	}
	return fresh(m)
}

// A value travels as its own bytes: a 1 MiB value full of characters JSON
// escapes costs 1 MiB and a few bytes on the wire.
func TestCodec_ValuesAreNotEscaped(t *testing.T) {
	v := bytes.Repeat([]byte(`"<>&\u0001`), 1<<20/10)
	if n := len(marshal(&Write{Key: "k", Value: v})); n > len(v)+32 {
		t.Fatalf("a %d-byte value took %d bytes", len(v), n)
	}
}

// A peer cannot make this node allocate what it declares: a list of four
// billion items in a few bytes is refused at once.
func TestCodec_DeclaredLengthsAreBounded(t *testing.T) {
	e := &encoder{}
	e.uvarint(codecVersion)
	e.uvarint(1 << 32) // items
	if err := unmarshal(e.b, &ListReply{}); !errors.Is(err, errDecode) {
		t.Fatalf("huge declared list: %v", err)
	}
	e = &encoder{}
	e.uvarint(codecVersion)
	e.uvarint(1 << 40) // From's length
	if err := unmarshal(e.b, &Write{}); !errors.Is(err, errDecode) {
		t.Fatalf("huge declared string: %v", err)
	}
	if err := unmarshal([]byte{9}, &Write{}); !errors.Is(err, errDecode) {
		t.Fatalf("unknown codec version: %v", err)
	}
}

func FuzzUnmarshal_NeverPanics(f *testing.F) {
	f.Add(marshal(&Write{Key: "k", Value: []byte("1")}))
	f.Add(marshal(&ListReply{Items: []Item{{Key: "a"}}}))
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, m := range []message{&Write{}, &WriteReply{}, &Read{}, &ReadReply{}, &List{}, &ListReply{}, &LeaderNotice{}, &Error{},
			&Batch{}, &BatchReply{}, &Sync{}, &DigestsReply{}, &EntriesReply{}, &ReadIndex{}, &ReadIndexReply{}} {
			_ = unmarshal(b, m)
		}
	})
}

// service is a Service with settable behaviour.
type service struct {
	write func(Write) (WriteReply, error)
}

func (s service) Write(_ context.Context, w Write) (WriteReply, error) { return s.write(w) }
func (service) Read(context.Context, Read) (ReadReply, error)          { return ReadReply{}, nil }
func (service) List(context.Context, List) (ListReply, error)          { return ListReply{}, nil }
func (service) Leader(context.Context, LeaderNotice) error             { return nil }
func (service) LeaseReleased(context.Context, LeaseReleased) error     { return nil }

var errRefused = errors.New("refused for the test")

func testErrors(err error) *Error {
	if errors.Is(err, errRefused) {
		return &Error{Status: 412, Code: "condition_failed", Message: err.Error(), Current: Version{1, 2}}
	}
	return &Error{Status: 500, Code: "internal", Message: err.Error()}
}

func newPeer(t *testing.T, svc Service) (*HTTP, string) {
	t.Helper()
	hs := httptest.NewServer(NewHandler(Services{Node: svc, ErrorOf: testErrors}, 1<<20))
	t.Cleanup(hs.Close)
	c, err := NewHTTP(HTTPConfig{Addr: func(string) (string, error) { return strings.TrimPrefix(hs.URL, "http://"), nil }, Token: "t"})
	if err != nil {
		t.Fatal(err)
	}
	return c, hs.URL
}

func TestHTTP_CallAnswerAndRefusal(t *testing.T) {
	c, _ := newPeer(t, service{write: func(w Write) (WriteReply, error) {
		if w.IfExists {
			return WriteReply{}, errRefused
		}
		return WriteReply{Version: Version{1, uint64(len(w.Value))}, Leader: "n1"}, nil
	}})
	rep, err := c.Write(context.Background(), "n1", Write{Key: "k", Value: []byte("12345")})
	if err != nil || rep.Version != (Version{1, 5}) || rep.Leader != "n1" {
		t.Fatalf("answer %+v, %v", rep, err)
	}
	_, err = c.Write(context.Background(), "n1", Write{Key: "k", IfExists: true})
	te, ok := errors.AsType[*Error](err)
	if !ok || te.Status != 412 || te.Code != "condition_failed" || te.Current != (Version{1, 2}) || te.NotApplied() {
		t.Fatalf("refusal %#v", err)
	}
}

// A peer that cannot be reached never saw the call; one that took it and
// broke the connection may have served it.
func TestHTTP_NotSentOnlyWhenNeverSent(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	c, err := NewHTTP(HTTPConfig{Addr: func(string) (string, error) { return dead, nil }, Token: "t"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(context.Background(), "n1", Write{Key: "k"}); !errors.Is(err, ErrNotSent) {
		t.Fatalf("refused connection: %v", err)
	}
	hang := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		conn, _, _ := w.(http.Hijacker).Hijack()
		conn.Close()
	}))
	defer hang.Close()
	c, _ = NewHTTP(HTTPConfig{Addr: func(string) (string, error) { return strings.TrimPrefix(hang.URL, "http://"), nil }, Token: "t"})
	if _, err := c.Write(context.Background(), "n1", Write{Key: "k"}); err == nil || errors.Is(err, ErrNotSent) {
		t.Fatalf("connection cut after the request: %v, want an error that is not ErrNotSent", err)
	}
}

// A body that is not ours is refused with 400, one too big with 413
// rpc_too_large (its sender must split it, not resend it), and the service
// never sees either; a JSON error from a peer's HTTP layer keeps its
// status and code.
func TestHandler_RefusesBadBodies(t *testing.T) {
	called := false
	_, url := newPeer(t, service{write: func(Write) (WriteReply, error) { called = true; return WriteReply{}, nil }})
	for _, tt := range []struct {
		body   string
		status int
	}{{`{"key":"k"}`, 400}, {"", 400}, {strings.Repeat("x", 2<<20), 413}} {
		resp, err := http.Post(url+WritePath, contentType, strings.NewReader(tt.body))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tt.status {
			t.Errorf("body of %d bytes: %d, want %d", len(tt.body), resp.StatusCode, tt.status)
		}
		if te, _ := errors.AsType[*Error](decodeError("n1", resp.StatusCode, resp.Header.Get("Content-Type"), b)); tt.status == 413 && (te == nil || te.Code != CodeTooLarge) {
			t.Errorf("body of %d bytes answered %+v, want code %s", len(tt.body), te, CodeTooLarge)
		}
	}
	if called {
		t.Fatal("the service saw a malformed call")
	}
	err := decodeError("n1", 503, "application/json", []byte(`{"error":{"code":"shutting_down","message":"bye"}}`))
	if te, ok := errors.AsType[*Error](err); !ok || te.Status != 503 || te.Code != "shutting_down" || !te.NotApplied() {
		t.Fatalf("JSON refusal read as %#v", err)
	}
}

func TestInMem_Faults(t *testing.T) {
	net := NewInMem()
	applied := 0
	net.Register("n1", Services{Node: service{write: func(Write) (WriteReply, error) { applied++; return WriteReply{Leader: "n1"}, nil }}})
	c := net.Client("n2")
	ctx := context.Background()
	if _, err := c.Write(ctx, "n9", Write{}); !errors.Is(err, ErrNotSent) {
		t.Fatalf("unknown peer: %v", err)
	}
	net.SetFault(func(Call) Fault { return Fault{Unreachable: true} })
	if _, err := c.Write(ctx, "n1", Write{}); !errors.Is(err, ErrNotSent) || applied != 0 {
		t.Fatalf("partitioned: %v, applied %d", err, applied)
	}
	net.SetFault(func(Call) Fault { return Fault{LoseReply: true} })
	if _, err := c.Write(ctx, "n1", Write{}); !errors.Is(err, ErrReplyLost) || errors.Is(err, ErrNotSent) || applied != 1 {
		t.Fatalf("lost reply: %v, applied %d", err, applied)
	}
	net.SetFault(nil)
	if rep, err := c.Write(ctx, "n1", Write{}); err != nil || rep.Leader != "n1" || applied != 2 {
		t.Fatalf("healed: %+v %v, applied %d", rep, err, applied)
	}
}
