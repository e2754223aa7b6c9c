package api

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/textproto"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/statefulkv/store/internal/node"
	"github.com/statefulkv/store/internal/storage"
)

// fuzzSeed is one starting input of FuzzServer_Handler: headers are
// "Name: value" lines separated by "\n".
type fuzzSeed struct {
	method, path, query, headers, body string
}

// fuzzSeeds are the cases of issue #15 and a few ordinary requests. The
// node holds "existing" at version 1.1.
func fuzzSeeds() []fuzzSeed {
	return []fuzzSeed{
		{"PUT", "/v1/kv/x", "", "Content-Type: application/json", `{"a":1}`},
		{"GET", "/v1/kv/existing", "consistency=stale&max_stale=1s", "", ""},
		{"DELETE", "/v1/kv/existing", "ack=all", `If-Match: "1.1"`, ""},
		{"GET", "/v1/kv", "prefix=e&limit=1", "", ""},
		// Query strings.
		{"PUT", "/v1/kv/x", "ack=%zz", "", `1`},
		{"GET", "/v1/kv", "prefix=%zz", "", ""},
		{"GET", "/v1/kv", "prefix=e;x=1", "", ""},
		{"PUT", "/v1/kv/x", "ack=leader&ack=all", "", `1`},
		{"GET", "/v1/kv", "prefix=a&prefix=b", "", ""},
		{"GET", "/v1/kv/existing", "consistancy=stale", "", ""},
		{"PUT", "/v1/kv/x", "redirect=maybe", "", `1`},
		// Bodies and their headers.
		{"PUT", "/v1/kv/x", "", "", "\"\xff\""},
		{"PUT", "/v1/kv/x", "", "Content-Type: application/json; charset=latin1", "\"Ren\xe9\""},
		{"PUT", "/v1/kv/x", "", "Content-Type: application/json\nContent-Type: text/plain", `1`},
		{"PUT", "/v1/kv/x", "", "Content-Encoding: gzip", "\x1f\x8b\x08\x00"},
		{"PUT", "/v1/kv/x", "", "Content-Length: 20", `{"a":1`},
		{"PUT", "/v1/kv/x", "", "Transfer-Encoding: chunked", "6\r\n{\"a\":1\r\n"},
		{"PUT", "/v1/kv/x", "", "Transfer-Encoding: chunked", "zz\r\n"},
		// Preconditions.
		{"PUT", "/v1/kv/existing", "", "If-Match:", `1`},
		{"PUT", "/v1/kv/existing", "", "If-None-Match:  ", `1`},
		{"PUT", "/v1/kv/existing", "", "If-Match: \"1.9\"\nIf-Match: \"1.1\"", `2`},
		{"PUT", "/v1/kv/existing", "", `If-Match: "1.9", "1.1"`, `2`},
		{"PUT", "/v1/kv/existing", "", `If-Match: "nope-1"`, `2`},
		{"PUT", "/v1/kv/existing", "", `If-Match: W/"1.2"`, `2`},
		{"PUT", "/v1/kv/existing", "", `If-Match: *, "1.1"`, `2`},
		{"PUT", "/v1/kv/existing", "", `If-Match: "1.1`, `2`},
		// HEAD wherever GET is, made-up methods, request ids.
		{"HEAD", "/v1/kv/existing", "", "", ""},
		{"HEAD", "/v1/kv", "", "", ""},
		{"HEAD", "/v1/status", "", "", ""},
		{"HEAD", "/healthz", "", "", ""},
		{"HEAD", "/readyz", "", "", ""},
		{"HEAD", "/metrics", "", "", ""},
		{"BREW", "/v1/kv/x", "", "", ""},
		{"PUT", "/v1/kv/x", "", "X-Request-Id: a b", `1`},
		{"PUT", "/v1/kv/x", "", "X-Request-Id: a\nX-Request-Id: b", `1`},
		{"GET", "/internal/v1/peer-stream", "", "X-Store-Peer-Token: guess", ""},
	}
}

// fuzzRequest builds the request that net/http's server would hand the
// handler for these parts, as bytes on the wire read back by
// http.ReadRequest. Content-Length is added unless the headers frame the
// body themselves. It reports false for bytes that do not parse as a
// request: the server answers those itself, before any handler
// (TestServer_PreHandlerErrors_PlainTextAsDocumented).
func fuzzRequest(method, path, rawQuery, headers string, body []byte) (*http.Request, bool) {
	var b strings.Builder
	target := path
	if rawQuery != "" {
		target += "?" + rawQuery
	}
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: fuzz\r\n", method, target)
	framed := false
	lines := strings.Split(headers, "\n")
	for _, l := range lines[:min(len(lines), 8)] {
		if l = strings.TrimRight(l, "\r"); l == "" {
			continue
		}
		name, _, _ := strings.Cut(l, ":")
		switch textproto.CanonicalMIMEHeaderKey(strings.TrimSpace(name)) {
		case "Content-Length", "Transfer-Encoding":
			framed = true
		}
		b.WriteString(l + "\r\n")
	}
	if !framed {
		fmt.Fprintf(&b, "Content-Length: %d\r\n", len(body))
	}
	b.WriteString("\r\n")
	b.Write(body)
	req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(b.String())))
	return req, err == nil
}

// newHandlerNode is a single healthy node without a listener (the fuzzer
// calls the handler directly), holding "existing" at version 1.1. fsync is
// off: the properties do not depend on it and the fuzzer runs faster.
func newHandlerNode(t *testing.T) *testNode {
	t.Helper()
	reg := prometheus.NewRegistry()
	db, err := storage.Open(t.TempDir(), storage.Options{NoSync: true, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	nd, err := node.New(node.Config{Self: "n1", Store: db})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := New(Config{NodeID: "n1", BuildVersion: "fuzz", Node: nd, Stats: db, MaxValueBytes: 1 << 10, Registerer: reg, Gatherer: reg})
	if err != nil {
		t.Fatal(err)
	}
	srv.SetReady(true)
	rec := httptest.NewRecorder()
	srv.ServeHTTP(rec, httptest.NewRequest("PUT", "/v1/kv/existing", strings.NewReader(`{"keep":true}`)))
	if rec.Code != http.StatusCreated || rec.Header().Get("ETag") != `"1.1"` {
		t.Fatalf("seed: %d %s", rec.Code, rec.Body)
	}
	return &testNode{t: t, db: db, nd: nd, srv: srv}
}

// Item 9: the whole handler under requests the fuzzer draws (method, path,
// query, a few headers, body). On a single healthy node: never a panic,
// never a 5xx (none is documented for it: 503s need a closing store or a
// cluster, 502/504 a peer), every error body the JSON shape with a code of
// the table, a refused request leaves the store byte-identical (every
// entry and the last sequence number), and Content-Length, where set, is
// the body's length. A fresh node per input keeps each input's outcome
// its own, so a failure found replays alone.
func FuzzServer_Handler(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s.method, s.path, s.query, s.headers, []byte(s.body))
	}
	codes := map[string]bool{}
	for _, row := range errorTable {
		codes[row.code] = true
	}
	f.Fuzz(func(t *testing.T, method, path, rawQuery, headers string, body []byte) {
		req, ok := fuzzRequest(method, path, rawQuery, headers, body)
		if !ok {
			t.Skip("net/http answers these bytes before any handler")
		}
		n := newHandlerNode(t)
		before := n.snapshot()
		rec := httptest.NewRecorder()
		n.srv.ServeHTTP(rec, req)
		status, got := rec.Code, rec.Body.Bytes()
		desc := fmt.Sprintf("%q %q (headers %q, body %q) = %d %q", req.Method, req.RequestURI, req.Header, body, status, got)
		if status >= 500 {
			t.Fatalf("5xx on a single healthy node: %s", desc)
		}
		if cl := rec.Header().Get("Content-Length"); cl != "" && cl != strconv.Itoa(len(got)) {
			t.Fatalf("Content-Length %s for %d bytes: %s", cl, len(got), desc)
		}
		if status < 400 {
			return
		}
		var eb errorBody
		if err := json.Unmarshal(got, &eb); err != nil || !codes[eb.Error.Code] || eb.Error.Message == "" ||
			rec.Header().Get("Content-Type") != "application/json" {
			t.Fatalf("error body is not the JSON shape with a code of the table (%v): %s", err, desc)
		}
		if diff := cmp.Diff(before, n.snapshot()); diff != "" {
			t.Fatalf("refused request changed the store: %s\n(-before +after):\n%s", desc, diff)
		}
	})
}
