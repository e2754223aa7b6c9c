package api

import (
	"context"
	"encoding/json"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/statefulkv/store/internal/node"
	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// refusal is a request that must be refused with status and code, with
// a message containing msg, and change nothing.
type refusal struct {
	name    string
	method  string
	path    string
	body    string
	headers []string
	status  int
	code    string
	msg     string
}

// checkRefusals runs each refusal against a fresh node holding one key,
// "existing", and compares the store before and after.
func checkRefusals(t *testing.T, tests []refusal) {
	t.Helper()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newTestNode(t, 0)
			if r := n.do("PUT", "/v1/kv/existing", `{"keep":true}`); r.status != 201 {
				t.Fatalf("seed: %d %s", r.status, r.body)
			}
			before := n.snapshot()
			r := n.do(tt.method, tt.path, tt.body, tt.headers...)
			if r.status != tt.status {
				t.Fatalf("status = %d, want %d; body %s", r.status, tt.status, r.body)
			}
			if got := errorCode(t, r.body); got != tt.code {
				t.Fatalf("code = %q, want %q; body %s", got, tt.code, r.body)
			}
			var eb errorBody
			_ = json.Unmarshal([]byte(r.body), &eb)
			if !strings.Contains(eb.Error.Message, tt.msg) {
				t.Fatalf("message %q does not say %q", eb.Error.Message, tt.msg)
			}
			if diff := cmp.Diff(before, n.snapshot()); diff != "" {
				t.Fatalf("rejected request changed the store (-before +after):\n%s", diff)
			}
		})
	}
}

// Item 1: a query string is decoded strictly; nothing is silently dropped.
func TestServer_Query_UndecodableRepeatedOrUnknownIs400(t *testing.T) {
	checkRefusals(t, []refusal{
		{"bad escape in ack", "PUT", "/v1/kv/x?ack=%zz", `1`, nil, 400, "invalid_parameter", `invalid URL escape "%zz"`},
		{"bad escape in prefix", "GET", "/v1/kv?prefix=%zz", ``, nil, 400, "invalid_parameter", `invalid URL escape`},
		{"raw semicolon", "GET", "/v1/kv?prefix=users/;x=1", ``, nil, 400, "invalid_parameter", "semicolon"},
		{"bad escape on DELETE", "DELETE", "/v1/kv/existing?ack=%", ``, nil, 400, "invalid_parameter", "invalid URL escape"},
		{"repeated ack", "PUT", "/v1/kv/x?ack=leader&ack=all", `1`, nil, 400, "invalid_parameter", "ack is given 2 times"},
		{"repeated ack, second invalid", "PUT", "/v1/kv/x?ack=leader&ack=bogus", `1`, nil, 400, "invalid_parameter", "given 2 times"},
		{"repeated prefix", "GET", "/v1/kv?prefix=a&prefix=b", ``, nil, 400, "invalid_parameter", "prefix is given 2 times"},
		{"repeated consistency", "GET", "/v1/kv/existing?consistency=stale&consistency=strong", ``, nil, 400, "invalid_parameter", "given 2 times"},
		{"typo on GET", "GET", "/v1/kv/existing?consistancy=stale", ``, nil, 400, "invalid_parameter", `unknown parameter "consistancy"; GET /v1/kv/{key} takes only consistency, max_stale, redirect`},
		{"wrong case", "GET", "/v1/kv/existing?Consistency=stale", ``, nil, 400, "invalid_parameter", `unknown parameter "Consistency"`},
		{"read parameter on PUT", "PUT", "/v1/kv/x?consistency=stale", `1`, nil, 400, "invalid_parameter", "takes only ack, redirect"},
		{"unknown on list", "GET", "/v1/kv?perfix=a", ``, nil, 400, "invalid_parameter", "takes only prefix, after, limit, redirect"},
		{"unknown on status", "GET", "/v1/status?verbose=1", ``, nil, 400, "invalid_parameter", "takes no parameters"},
		{"redirect not a boolean", "PUT", "/v1/kv/x?redirect=maybe", `1`, nil, 400, "invalid_parameter", `redirect="maybe"`},
	})
}

// The parameters each route takes, empty values (the defaults), empty
// pairs, and probes with whatever query a monitor adds, are all served.
func TestServer_Query_KnownParametersAccepted(t *testing.T) {
	n := newTestNode(t, 0)
	for _, tc := range []struct {
		method, path, body string
		status             int
	}{
		{"PUT", "/v1/kv/q?ack=leader&redirect=false", `1`, 201},
		{"PUT", "/v1/kv/q?ack=&redirect=", `2`, 200},
		{"PUT", "/v1/kv/q?&&ack=all&", `3`, 200},
		{"GET", "/v1/kv/q?consistency=stale&max_stale=1s&redirect=true", ``, 200},
		{"GET", "/v1/kv/q?consistency=", ``, 200},
		{"GET", "/v1/kv?prefix=q&after=&limit=5&redirect=0", ``, 200},
		{"GET", "/v1/kv?prefix=%71", ``, 200}, // %71 is q
		{"GET", "/v1/status", ``, 200},
		{"GET", "/healthz?probe=kubelet;x", ``, 200},
		{"GET", "/readyz?%zz", ``, 200},
		{"GET", "/metrics?name[]=x", ``, 200},
		{"DELETE", "/v1/kv/q?ack=quorum", ``, 200},
	} {
		if r := n.do(tc.method, tc.path, tc.body); r.status != tc.status {
			t.Errorf("%s %s = %d %s, want %d", tc.method, tc.path, r.status, r.body, tc.status)
		}
	}
}

// Item 2: a body that is not UTF-8 is not JSON (RFC 8259 §8.1), whatever
// Content-Type says; a charset other than UTF-8, two Content-Types and a
// content coding are refused as media-type problems.
func TestServer_Body_InvalidUTF8AndContentHeadersRefused(t *testing.T) {
	checkRefusals(t, []refusal{
		{"lone continuation byte", "PUT", "/v1/kv/x", "\"\x80\"", nil, 400, "invalid_json", "not valid UTF-8 at byte 1"},
		{"latin1 e-acute in a string", "PUT", "/v1/kv/x", "{\"name\":\"Ren\xe9\"}", []string{"Content-Type", "application/json"}, 400, "invalid_json", "not valid UTF-8 at byte 12"},
		{"truncated sequence", "PUT", "/v1/kv/x", "[\"\xe2\x98\"]", []string{"Content-Type", "application/json; charset=utf-8"}, 400, "invalid_json", "UTF-8"},
		{"encoded surrogate", "PUT", "/v1/kv/x", "\"\xed\xa0\x80\"", nil, 400, "invalid_json", "UTF-8"},
		{"overlong encoding", "PUT", "/v1/kv/x", "\"\xc0\xaf\"", nil, 400, "invalid_json", "UTF-8"},
		{"invalid UTF-8 under form type", "PUT", "/v1/kv/x", "\"\xff\"", []string{"Content-Type", "application/x-www-form-urlencoded"}, 400, "invalid_json", "UTF-8"},
		{"latin1 charset", "PUT", "/v1/kv/x", "\"Ren\xe9\"", []string{"Content-Type", "application/json; charset=latin1"}, 415, "unsupported_media_type", `charset "latin1"`},
		{"latin1 charset, ASCII body", "PUT", "/v1/kv/x", `"abc"`, []string{"Content-Type", "application/json; charset=ISO-8859-1"}, 415, "unsupported_media_type", "charset"},
		{"utf-16 charset", "PUT", "/v1/kv/x", `1`, []string{"Content-Type", "application/json; charset=utf-16"}, 415, "unsupported_media_type", "charset"},
		{"two Content-Type lines", "PUT", "/v1/kv/x", `1`, []string{"Content-Type", "application/json", "Content-Type", "text/plain"}, 415, "unsupported_media_type", "2 Content-Type headers"},
		{"two identical Content-Type lines", "PUT", "/v1/kv/x", `1`, []string{"Content-Type", "application/json", "Content-Type", "application/json"}, 415, "unsupported_media_type", "send exactly one"},
		{"gzip", "PUT", "/v1/kv/x", "\x1f\x8b\x08\x00", []string{"Content-Encoding", "gzip"}, 415, "unsupported_media_type", `Content-Encoding "gzip"`},
		{"identity then br", "PUT", "/v1/kv/x", `1`, []string{"Content-Encoding", "identity", "Content-Encoding", "br"}, 415, "unsupported_media_type", "Content-Encoding"},
		{"deflate in a list", "PUT", "/v1/kv/x", `1`, []string{"Content-Encoding", "identity, deflate"}, 415, "unsupported_media_type", "Content-Encoding"},
	})
}

func TestServer_Body_UTF8AndIdentityAccepted(t *testing.T) {
	n := newTestNode(t, 0)
	for _, tc := range []struct {
		body    string
		headers []string
	}{
		{`"é ☃ 𝄞"`, nil},
		{`{"k":"\ud83d\ude00"}`, []string{"Content-Type", "application/json; charset=UTF-8"}},
		{`1`, []string{"Content-Encoding", "identity"}},
		{`2`, []string{"Content-Type", "application/json; charset=\"utf-8\""}},
	} {
		r := n.do("PUT", "/v1/kv/u", tc.body, tc.headers...)
		if r.status/100 != 2 {
			t.Fatalf("PUT %q %v = %d %s", tc.body, tc.headers, r.status, r.body)
		}
		if g := n.do("GET", "/v1/kv/u", ""); g.body != tc.body {
			t.Fatalf("GET = %q, want %q", g.body, tc.body)
		}
	}
}

// Item 3: only a broken or empty precondition header is a 400; a tag this
// server never issued is a failed precondition; a list is one list over
// all header lines, and matches if any listed tag is current.
func TestServer_Preconditions_EmptyBrokenAndUnissued(t *testing.T) {
	const cur = `"1.1"` // the seeded key's version
	checkRefusals(t, []refusal{
		{"empty If-Match", "PUT", "/v1/kv/existing", `1`, []string{"If-Match", ""}, 400, "invalid_precondition", "If-Match: the header is empty"},
		{"blank If-Match", "PUT", "/v1/kv/existing", `1`, []string{"If-Match", "   "}, 400, "invalid_precondition", "empty"},
		{"empty If-Match on a missing key", "PUT", "/v1/kv/new", `1`, []string{"If-Match", ""}, 400, "invalid_precondition", "empty"},
		{"empty If-Match on DELETE", "DELETE", "/v1/kv/existing", ``, []string{"If-Match", ""}, 400, "invalid_precondition", "empty"},
		{"empty If-None-Match", "PUT", "/v1/kv/new", `1`, []string{"If-None-Match", ""}, 400, "invalid_precondition", "If-None-Match: the header is empty"},
		{"a list of nothing", "PUT", "/v1/kv/existing", `1`, []string{"If-Match", " , ,"}, 400, "invalid_precondition", "the list is empty"},
		{"one line empty of two", "PUT", "/v1/kv/existing", `1`, []string{"If-Match", cur, "If-Match", ""}, 400, "invalid_precondition", "empty"},
		{"unterminated tag", "PUT", "/v1/kv/existing", `1`, []string{"If-Match", `"1.1`}, 400, "invalid_precondition", "no closing quote"},
		{"tags without a comma", "PUT", "/v1/kv/existing", `1`, []string{"If-Match", `"1.1" "1.2"`}, 400, "invalid_precondition", "separate entity-tags with commas"},
		{"bare word", "PUT", "/v1/kv/existing", `1`, []string{"If-Match", `nope`}, 400, "invalid_precondition", "not an entity-tag"},
		{"star with tags", "PUT", "/v1/kv/existing", `1`, []string{"If-Match", `*, ` + cur}, 400, "invalid_precondition", "* must stand alone"},
		{"star over two lines", "PUT", "/v1/kv/existing", `1`, []string{"If-Match", `*`, "If-Match", cur}, 400, "invalid_precondition", "* must stand alone"},
		{"space inside a tag", "PUT", "/v1/kv/existing", `1`, []string{"If-Match", `"1 1"`}, 400, "invalid_precondition", "byte 0x20"},
		{"If-None-Match with a list", "PUT", "/v1/kv/existing", `1`, []string{"If-None-Match", `*, "1.1"`}, 400, "invalid_precondition", "* must stand alone"},
		{"If-None-Match star twice", "PUT", "/v1/kv/new", `1`, []string{"If-None-Match", `*`, "If-None-Match", `*`}, 400, "invalid_precondition", "* must stand alone"},
		{"If-None-Match with a tag", "PUT", "/v1/kv/new", `1`, []string{"If-None-Match", `"1.1"`}, 400, "invalid_precondition", "supports only *"},
		{"tag never issued", "PUT", "/v1/kv/existing", `1`, []string{"If-Match", `"nope-1"`}, 412, "condition_failed", `"nope-1"`},
		{"weak tag", "PUT", "/v1/kv/existing", `1`, []string{"If-Match", `W/"1.1"`}, 412, "condition_failed", `W/"1.1"`},
		{"non-canonical form of the current version", "PUT", "/v1/kv/existing", `1`, []string{"If-Match", `"01.1"`}, 412, "condition_failed", `"01.1"`},
		{"tag never issued, missing key", "DELETE", "/v1/kv/missing", ``, []string{"If-Match", `"nope-1"`}, 412, "condition_failed", "no such tag can match"},
		{"list with none current", "PUT", "/v1/kv/existing", `1`, []string{"If-Match", `"1.7", "nope", "1.9"`}, 412, "condition_failed", "is at version 1.1"},
		{"two lines, none current", "DELETE", "/v1/kv/existing", ``, []string{"If-Match", `"1.7"`, "If-Match", `"1.9"`}, 412, "condition_failed", "is at version 1.1"},
	})
}

func TestServer_Preconditions_ListMatchesAnyTag(t *testing.T) {
	n := newTestNode(t, 0)
	cur := n.do("PUT", "/v1/kv/k", `1`).header.Get("ETag")
	for i, headers := range []func(cur string) []string{
		func(cur string) []string { return []string{"If-Match", `"1.99", ` + cur} },                 // the current tag second on one line
		func(cur string) []string { return []string{"If-Match", `W/"x", "nope", ` + cur + `, , `} }, // unmatchable tags and empty elements around it
		func(cur string) []string { return []string{"If-Match", `"1.98"`, "If-Match", cur} },        // on a second header line
	} {
		r := n.do("PUT", "/v1/kv/k", `2`, headers(cur)...)
		if r.status != 200 {
			t.Fatalf("%d: If-Match %q = %d %s", i, headers(cur), r.status, r.body)
		}
		cur = r.header.Get("ETag")
	}
	r := n.do("DELETE", "/v1/kv/k", ``, "If-Match", `"1.1", `+cur)
	if r.status != 200 || !strings.Contains(r.body, `"deleted":true`) {
		t.Fatalf("DELETE with a list = %d %s", r.status, r.body)
	}
	// A 412 to a list reports the current version, like one to a single tag.
	n.do("PUT", "/v1/kv/k", `3`)
	r = n.do("PUT", "/v1/kv/k", `4`, "If-Match", `"1.1", "1.2"`)
	if r.status != 412 || r.header.Get("ETag") != `"1.6"` {
		t.Fatalf("list of old tags = %d %s, ETag %s", r.status, r.body, r.header.Get("ETag"))
	}
}

// fakeNode is a hand-written Node whose writes answer from a function.
type fakeNode struct {
	write  func(node.Write) (node.WriteResult, error)
	writes []node.Write
}

func (f *fakeNode) Write(_ context.Context, w node.Write, _ node.Origin) (node.WriteResult, error) {
	f.writes = append(f.writes, w)
	return f.write(w)
}

func (f *fakeNode) Get(context.Context, string, node.ReadOptions, node.Origin) (node.ReadResult, error) {
	return node.ReadResult{}, storage.ErrNotFound
}

func (f *fakeNode) List(context.Context, node.ListOptions, node.Origin) (node.ListResult, error) {
	return node.ListResult{}, nil
}

func (f *fakeNode) Role() (string, string, uint64) { return "single", "", 1 }
func (f *fakeNode) Clustered() bool                { return false }
func (f *fakeNode) Ready() error                   { return nil }

type fakeStats struct{}

func (fakeStats) Size() int64     { return 0 }
func (fakeStats) LastSeq() uint64 { return 0 }

// The store compares one version at a time; a list is tried newest first,
// and then only at the version the refusal reports, if the list holds it.
// The refusal may come from this node's store or be relayed from the
// leader (cluster mode); both carry the current version.
func TestServer_IfMatchList_TriesOnlyTheReportedCurrentVersion(t *testing.T) {
	v := func(seq uint64) storage.Version { return storage.Version{Epoch: 1, Seq: seq} }
	local := func(cur storage.Version) error { return &storage.ConditionError{Key: "k", Current: cur} }
	relayed := func(cur storage.Version) error {
		return &transport.Error{Status: 412, Code: "condition_failed", Message: "condition failed", Current: transport.Version(cur)}
	}
	tests := []struct {
		name    string
		ifMatch string
		// current answers the write at version tried: nil applies it.
		current func(tried storage.Version) error
		tries   []storage.Version
		status  int
	}{
		{"newest listed is current", `"1.3", "1.5"`, func(tried storage.Version) error { return nil }, []storage.Version{v(5)}, 200},
		{"older listed is current", `"1.5", "1.3"`, func(tried storage.Version) error {
			if tried != v(3) {
				return local(v(3))
			}
			return nil
		}, []storage.Version{v(5), v(3)}, 200},
		{"relayed refusal names a listed version", `"1.3", "1.5"`, func(tried storage.Version) error {
			if tried != v(3) {
				return relayed(v(3))
			}
			return nil
		}, []storage.Version{v(5), v(3)}, 200},
		{"current not listed", `"1.3", "1.5"`, func(storage.Version) error { return local(v(7)) }, []storage.Version{v(5)}, 412},
		{"key missing", `"1.3", "1.5"`, func(storage.Version) error { return local(storage.Version{}) }, []storage.Version{v(5)}, 412},
		// Versions only grow, so this cannot happen; the loop still ends.
		{"current flips between listed versions", `"1.3", "1.5"`, func(tried storage.Version) error {
			if tried == v(5) {
				return local(v(3))
			}
			return local(v(5))
		}, []storage.Version{v(5), v(3)}, 412},
		{"other refusal ends it", `"1.3", "1.5"`, func(storage.Version) error { return storage.ErrClosed }, []storage.Version{v(5)}, 503},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fn := &fakeNode{write: func(w node.Write) (node.WriteResult, error) {
				if err := tt.current(w.IfMatch); err != nil {
					return node.WriteResult{}, err
				}
				return node.WriteResult{Version: v(9)}, nil
			}}
			srv, err := New(Config{NodeID: "n1", Node: fn, Stats: fakeStats{}})
			if err != nil {
				t.Fatal(err)
			}
			req := httptest.NewRequest("PUT", "/v1/kv/k", strings.NewReader("1"))
			req.Header.Set("If-Match", tt.ifMatch)
			rec := httptest.NewRecorder()
			srv.ServeHTTP(rec, req)
			if rec.Code != tt.status {
				t.Fatalf("status = %d, want %d: %s", rec.Code, tt.status, rec.Body)
			}
			var tries []storage.Version
			for _, w := range fn.writes {
				tries = append(tries, w.IfMatch)
			}
			if diff := cmp.Diff(tt.tries, tries); diff != "" {
				t.Fatalf("versions tried (-want +got):\n%s", diff)
			}
		})
	}
}

// Item 8: X-Request-Id is printable ASCII without spaces (0x21-0x7e), up to
// 256 bytes, on one header line, as the README says.
func TestServer_RequestID_PrintableASCIIWithoutSpaces(t *testing.T) {
	checkRefusals(t, []refusal{
		{"space", "PUT", "/v1/kv/x", `1`, []string{"X-Request-Id", "a b"}, 400, "invalid_request_id", "byte 0x20 at 1"},
		{"tab", "PUT", "/v1/kv/x", `1`, []string{"X-Request-Id", "a\tb"}, 400, "invalid_request_id", "byte 0x09"},
		{"non-ASCII", "PUT", "/v1/kv/x", `1`, []string{"X-Request-Id", "caf\u00e9"}, 400, "invalid_request_id", "byte 0xc3"},
		{"257 bytes", "PUT", "/v1/kv/x", `1`, []string{"X-Request-Id", strings.Repeat("r", 257)}, 400, "invalid_request_id", "257 bytes, the limit is 256"},
		{"two lines", "DELETE", "/v1/kv/existing", ``, []string{"X-Request-Id", "a", "X-Request-Id", "b"}, 400, "invalid_request_id", "2 X-Request-Id headers"},
	})
	n := newTestNode(t, 0)
	for i, id := range []string{"!", "~", "0x21-to-0x7e:!\"#$%&'()*+,-./09:;<=>?@AZ[\\]^_`az{|}~", strings.Repeat("r", 256)} {
		key := "/v1/kv/id" + string(rune('a'+i))
		first := n.do("PUT", key, `1`, "X-Request-Id", id)
		again := n.do("PUT", key, `2`, "X-Request-Id", id)
		if first.status != 201 || again.status != 201 || again.header.Get("ETag") != first.header.Get("ETag") {
			t.Fatalf("id %q: %d %s then %d %s; want the retry to replay the first", id, first.status, first.body, again.status, again.body)
		}
	}
}
