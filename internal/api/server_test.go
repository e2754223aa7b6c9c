package api

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/statefulkv/store/internal/node"
	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

type testNode struct {
	t   testing.TB
	db  *storage.DB
	nd  *node.Node
	srv *Server
	url string
}

// nodeOpts configures startNode.
type nodeOpts struct {
	api  Config
	node node.Config
	// wrap, if set, sits in front of the server.
	wrap func(http.Handler) http.Handler
	// store, if set, wraps the bbolt file the node writes to.
	store func(*storage.DB) node.Store
	// server, if set, configures the http.Server before it starts.
	server func(*http.Server)
}

// startNode serves a Server and its node, configured by o, on a fresh
// bbolt file, over loopback HTTP. The store, the node's identity (the
// API's NodeID), Registerer and Gatherer are filled in.
func startNode(t testing.TB, o nodeOpts) *testNode {
	t.Helper()
	reg := prometheus.NewRegistry()
	db, err := storage.Open(t.TempDir(), storage.Options{Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	o.node.Store, o.node.Self = db, o.api.NodeID
	if o.store != nil {
		o.node.Store = o.store(db)
	}
	nd, err := node.New(o.node)
	if err != nil {
		t.Fatal(err)
	}
	cfg := o.api
	cfg.Node, cfg.Stats, cfg.Registerer, cfg.Gatherer = nd, db, reg, reg
	if nd.Clustered() {
		cfg.Peers = nd.Service()
	}
	srv, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv.SetReady(true)
	var h http.Handler = srv
	if o.wrap != nil {
		h = o.wrap(srv)
	}
	hs := httptest.NewUnstartedServer(h)
	if o.server != nil {
		o.server(hs.Config)
	}
	hs.Start()
	t.Cleanup(hs.Close)
	return &testNode{t: t, db: db, nd: nd, srv: srv, url: hs.URL}
}

func newTestNode(t *testing.T, maxValue int64) *testNode {
	t.Helper()
	return startNode(t, nodeOpts{api: Config{NodeID: "n1", BuildVersion: "test", MaxValueBytes: maxValue}})
}

type response struct {
	status int
	header http.Header
	body   string
}

func (n *testNode) do(method, path string, body string, headers ...string) response {
	n.t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, n.url+path, rd)
	if err != nil {
		n.t.Fatal(err)
	}
	// Add, not Set: a name given twice is sent as two header lines.
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Add(headers[i], headers[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		n.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return response{status: resp.StatusCode, header: resp.Header, body: string(b)}
}

// snapshot is everything a rejected request must leave unchanged.
type snapshot struct {
	Items   []storage.Entry
	LastSeq uint64
}

func (n *testNode) snapshot() snapshot {
	n.t.Helper()
	es, _, err := n.db.Scan("", "", 10000, 0)
	if err != nil {
		n.t.Fatal(err)
	}
	return snapshot{Items: es, LastSeq: n.db.LastSeq()}
}

func errorCode(t *testing.T, body string) string {
	t.Helper()
	var eb errorBody
	if err := json.Unmarshal([]byte(body), &eb); err != nil || eb.Error.Code == "" || eb.Error.Message == "" {
		t.Fatalf("error body %q is not {\"error\":{\"code\",\"message\"}}: %v", body, err)
	}
	return eb.Error.Code
}

func TestServer_Put_Get_AllJSONKinds(t *testing.T) {
	n := newTestNode(t, 0)
	for i, v := range []string{`{"a":[1,2,{"b":null}]}`, `[1, 2]`, `"text"`, `-12.5e3`, `true`, `null`, "  {\"spaced\" :  1 }\n"} {
		key := "kinds/" + string(rune('a'+i))
		r := n.do("PUT", "/v1/kv/"+key, v, "Content-Type", "application/json")
		if r.status != http.StatusCreated || r.header.Get("ETag") == "" {
			t.Fatalf("PUT %s = %d %s", v, r.status, r.body)
		}
		g := n.do("GET", "/v1/kv/"+key, "")
		if g.status != 200 || g.body != v || g.header.Get("ETag") != r.header.Get("ETag") {
			t.Fatalf("GET = %d %q etag %s; want %q etag %s", g.status, g.body, g.header.Get("ETag"), v, r.header.Get("ETag"))
		}
		if g.header.Get("Content-Type") != "application/json" {
			t.Fatalf("GET content type %q", g.header.Get("Content-Type"))
		}
	}
}

func TestServer_Put_OverwriteAndConditions(t *testing.T) {
	n := newTestNode(t, 0)
	first := n.do("PUT", "/v1/kv/k", `1`)
	if first.status != 201 {
		t.Fatalf("create = %d %s", first.status, first.body)
	}
	etag1 := first.header.Get("ETag")

	second := n.do("PUT", "/v1/kv/k", `2`, "If-Match", etag1)
	if second.status != 200 || second.header.Get("ETag") == etag1 {
		t.Fatalf("CAS with current etag = %d %s", second.status, second.body)
	}
	// Bare (unquoted) versions are accepted too.
	bare := strings.Trim(second.header.Get("ETag"), `"`)
	if r := n.do("PUT", "/v1/kv/k", `3`, "If-Match", bare); r.status != 200 {
		t.Fatalf("CAS with bare version = %d %s", r.status, r.body)
	}
	if r := n.do("PUT", "/v1/kv/k", `4`, "If-Match", "*"); r.status != 200 {
		t.Fatalf("If-Match * on existing = %d %s", r.status, r.body)
	}
	if r := n.do("PUT", "/v1/kv/new", `1`, "If-None-Match", "*"); r.status != 201 {
		t.Fatalf("create-only on missing = %d %s", r.status, r.body)
	}
	var wb writeBody
	r := n.do("PUT", "/v1/kv/k", `5`)
	if err := json.Unmarshal([]byte(r.body), &wb); err != nil || wb.Key != "k" || wb.Created || `"`+wb.Version+`"` != r.header.Get("ETag") {
		t.Fatalf("overwrite body %s, etag %s", r.body, r.header.Get("ETag"))
	}
}

func TestServer_Delete(t *testing.T) {
	n := newTestNode(t, 0)
	p := n.do("PUT", "/v1/kv/d", `{}`)
	if r := n.do("DELETE", "/v1/kv/d", "", "If-Match", `"1.999"`); r.status != 412 || errorCode(t, r.body) != "condition_failed" {
		t.Fatalf("stale conditional delete = %d %s", r.status, r.body)
	}
	r := n.do("DELETE", "/v1/kv/d", "", "If-Match", p.header.Get("ETag"))
	if r.status != 200 || !strings.Contains(r.body, `"deleted":true`) {
		t.Fatalf("DELETE = %d %s", r.status, r.body)
	}
	if r := n.do("GET", "/v1/kv/d", ""); r.status != 404 || errorCode(t, r.body) != "key_not_found" {
		t.Fatalf("GET after delete = %d %s", r.status, r.body)
	}
	if r := n.do("DELETE", "/v1/kv/d", ""); r.status != 404 || errorCode(t, r.body) != "key_not_found" {
		t.Fatalf("DELETE of missing key = %d %s", r.status, r.body)
	}
}

func TestServer_List_PagesInKeyOrder(t *testing.T) {
	n := newTestNode(t, 0)
	for _, k := range []string{"users/c", "users/a", "users/b", "other", "users/d"} {
		n.do("PUT", "/v1/kv/"+k, `{"k":"`+k+`"}`)
	}
	var keys []string
	after := ""
	for pages := 0; ; pages++ {
		if pages > 5 {
			t.Fatal("pagination does not end")
		}
		r := n.do("GET", "/v1/kv?prefix=users/&limit=3&after="+after, "")
		if r.status != 200 {
			t.Fatalf("list = %d %s", r.status, r.body)
		}
		var lb listBody
		if err := json.Unmarshal([]byte(r.body), &lb); err != nil {
			t.Fatal(err)
		}
		for _, it := range lb.Items {
			keys = append(keys, it.Key)
			if string(it.Value) != `{"k":"`+it.Key+`"}` {
				t.Fatalf("value of %s = %s", it.Key, it.Value)
			}
		}
		if lb.Next == "" {
			break
		}
		after = lb.Next
	}
	if diff := cmp.Diff([]string{"users/a", "users/b", "users/c", "users/d"}, keys); diff != "" {
		t.Fatalf("keys (-want +got):\n%s", diff)
	}
	if r := n.do("GET", "/v1/kv?prefix=none", ""); r.status != 200 || strings.TrimSpace(r.body) != `{"items":[]}` {
		t.Fatalf("empty list = %d %s", r.status, r.body)
	}
}

// Every client error: the right status and stable code, a JSON body, and
// nothing changed in the store.
func TestServer_Errors_RejectAndChangeNothing(t *testing.T) {
	const limit = 64
	tooLong := strings.Repeat("k", MaxKeyBytes+1)
	tests := []struct {
		name    string
		method  string
		path    string
		body    string
		headers []string
		status  int
		code    string
	}{
		{"invalid JSON", "PUT", "/v1/kv/x", `{"a":`, nil, 400, "invalid_json"},
		{"two JSON values", "PUT", "/v1/kv/x", `1 2`, nil, 400, "invalid_json"},
		{"empty body", "PUT", "/v1/kv/x", ``, nil, 400, "invalid_json"},
		{"bare word", "PUT", "/v1/kv/x", `hello`, nil, 400, "invalid_json"},
		{"empty key on PUT", "PUT", "/v1/kv/", `1`, nil, 400, "invalid_key"},
		{"empty key on GET", "GET", "/v1/kv/", ``, nil, 400, "invalid_key"},
		{"key too long", "PUT", "/v1/kv/" + tooLong, `1`, nil, 400, "invalid_key"},
		{"key with control char", "PUT", "/v1/kv/a%01b", `1`, nil, 400, "invalid_key"},
		{"key not UTF-8", "PUT", "/v1/kv/a%ffb", `1`, nil, 400, "invalid_key"},
		{"value over the limit", "PUT", "/v1/kv/x", `"` + strings.Repeat("v", limit) + `"`, nil, 413, "value_too_large"},
		{"text/plain", "PUT", "/v1/kv/x", `1`, []string{"Content-Type", "text/plain"}, 415, "unsupported_media_type"},
		{"garbage content type", "PUT", "/v1/kv/x", `1`, []string{"Content-Type", ";;"}, 415, "unsupported_media_type"},
		{"unknown route", "GET", "/v2/kv/x", ``, nil, 404, "route_not_found"},
		{"wrong method on key", "POST", "/v1/kv/x", `1`, nil, 405, "method_not_allowed"},
		{"wrong method on list", "DELETE", "/v1/kv", ``, nil, 405, "method_not_allowed"},
		{"stale If-Match", "PUT", "/v1/kv/existing", `1`, []string{"If-Match", `"1.99"`}, 412, "condition_failed"},
		{"If-None-Match on existing", "PUT", "/v1/kv/existing", `1`, []string{"If-None-Match", "*"}, 412, "condition_failed"},
		{"If-Match on missing key", "PUT", "/v1/kv/missing", `1`, []string{"If-Match", `"1.1"`}, 412, "condition_failed"},
		{"malformed If-Match", "PUT", "/v1/kv/existing", `1`, []string{"If-Match", `"v7`}, 400, "invalid_precondition"},
		{"If-Match with a tag never issued", "PUT", "/v1/kv/existing", `1`, []string{"If-Match", `"v7"`}, 412, "condition_failed"},
		{"weak If-Match", "PUT", "/v1/kv/existing", `1`, []string{"If-Match", `W/"1.1"`}, 412, "condition_failed"},
		{"both conditions", "PUT", "/v1/kv/existing", `1`, []string{"If-Match", `"1.1"`, "If-None-Match", "*"}, 400, "invalid_precondition"},
		{"If-None-Match with a version", "PUT", "/v1/kv/existing", `1`, []string{"If-None-Match", `"1.1"`}, 400, "invalid_precondition"},
		{"If-None-Match on DELETE", "DELETE", "/v1/kv/existing", ``, []string{"If-None-Match", "*"}, 400, "invalid_precondition"},
		{"stale conditional DELETE", "DELETE", "/v1/kv/existing", ``, []string{"If-Match", `"1.99"`}, 412, "condition_failed"},
		{"DELETE missing key", "DELETE", "/v1/kv/missing", ``, nil, 404, "key_not_found"},
		{"GET missing key", "GET", "/v1/kv/missing", ``, nil, 404, "key_not_found"},
		{"request id too long", "PUT", "/v1/kv/x", `1`, []string{"X-Request-Id", strings.Repeat("r", 257)}, 400, "invalid_request_id"},
		{"request id with a space", "PUT", "/v1/kv/x", `1`, []string{"X-Request-Id", "a b"}, 400, "invalid_request_id"},
		{"limit zero", "GET", "/v1/kv?limit=0", ``, nil, 400, "invalid_parameter"},
		{"limit too big", "GET", "/v1/kv?limit=1001", ``, nil, 400, "invalid_parameter"},
		{"limit not a number", "GET", "/v1/kv?limit=ten", ``, nil, 400, "invalid_parameter"},
		{"prefix too long", "GET", "/v1/kv?prefix=" + tooLong, ``, nil, 400, "invalid_parameter"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newTestNode(t, limit)
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
			if ct := r.header.Get("Content-Type"); ct != "application/json" {
				t.Fatalf("error Content-Type = %q", ct)
			}
			if diff := cmp.Diff(before, n.snapshot()); diff != "" {
				t.Fatalf("rejected request changed the store (-before +after):\n%s", diff)
			}
		})
	}
}

func TestServer_Errors_DetailsForTheClient(t *testing.T) {
	n := newTestNode(t, 0)
	p := n.do("PUT", "/v1/kv/k", `1`)
	r := n.do("PUT", "/v1/kv/k", `2`, "If-None-Match", "*")
	var eb errorBody
	_ = json.Unmarshal([]byte(r.body), &eb)
	if `"`+eb.Error.CurrentVersion+`"` != p.header.Get("ETag") || r.header.Get("ETag") != p.header.Get("ETag") {
		t.Fatalf("412 does not carry the current version: %s / %s", r.body, r.header.Get("ETag"))
	}
	r = n.do("PUT", "/v1/kv/k", `1`, "Content-Type", "text/plain")
	if !strings.Contains(r.body, "Content-Type: application/json") {
		t.Fatalf("415 does not name the header to send: %s", r.body)
	}
	r = n.do("POST", "/v1/kv/k", `1`)
	if got := r.header.Get("Allow"); got != "GET, HEAD, PUT, DELETE" {
		t.Fatalf("405 Allow = %q", got)
	}
}

func TestServer_ContentTypesAccepted(t *testing.T) {
	n := newTestNode(t, 0)
	for _, ct := range []string{"", "application/json", "application/json; charset=utf-8", "application/merge-patch+json", "application/x-www-form-urlencoded", "text/json"} {
		if r := n.do("PUT", "/v1/kv/ct", `{"ok":1}`, "Content-Type", ct); r.status/100 != 2 {
			t.Errorf("Content-Type %q: %d %s", ct, r.status, r.body)
		}
	}
}

func TestServer_KeyEncoding(t *testing.T) {
	n := newTestNode(t, 0)
	// An escaped slash and a literal one name the same key; UTF-8 is fine.
	n.do("PUT", "/v1/kv/a%2Fb", `1`)
	if r := n.do("GET", "/v1/kv/a/b", ""); r.status != 200 || r.body != "1" {
		t.Fatalf("GET a/b = %d %s", r.status, r.body)
	}
	n.do("PUT", "/v1/kv/%E2%98%83/x", `"snow"`)
	if r := n.do("GET", "/v1/kv/☃/x", ""); r.status != 200 || r.body != `"snow"` {
		t.Fatalf("GET ☃/x = %d %s", r.status, r.body)
	}
	exact := strings.Repeat("é", MaxKeyBytes/2) // 512 bytes exactly
	if r := n.do("PUT", "/v1/kv/"+exact, `1`); r.status != 201 {
		t.Fatalf("512-byte key = %d %s", r.status, r.body)
	}
}

func TestServer_Probes_Status_Metrics(t *testing.T) {
	n := newTestNode(t, 0)
	if r := n.do("GET", "/healthz", ""); r.status != 200 {
		t.Fatalf("healthz = %d", r.status)
	}
	if r := n.do("GET", "/readyz", ""); r.status != 200 {
		t.Fatalf("readyz = %d", r.status)
	}
	n.srv.SetReady(false)
	if r := n.do("GET", "/readyz", ""); r.status != 503 || errorCode(t, r.body) != "not_ready" || r.header.Get("Retry-After") == "" {
		t.Fatalf("readyz while not ready = %d %s", r.status, r.body)
	}
	n.srv.SetReady(true)

	n.do("PUT", "/v1/kv/m", `1`)
	var st statusBody
	r := n.do("GET", "/v1/status", "")
	if err := json.Unmarshal([]byte(r.body), &st); err != nil {
		t.Fatal(err)
	}
	if st.Node != "n1" || st.Role != "single" || st.Version != "test" || st.LastSeq != 1 || st.DataBytes <= 0 || !st.Ready {
		t.Fatalf("status = %+v", st)
	}

	m := n.do("GET", "/metrics", "").body
	for _, want := range []string{
		`store_http_requests_total{code="201",method="PUT",route="/v1/kv/*"} 1`,
		`store_http_request_duration_seconds_bucket{code="201",method="PUT",route="/v1/kv/*"`,
		`store_storage_commit_duration_seconds_count`,
		`store_storage_commit_batch_size_count`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
}

func TestNew_RejectsBadConfig(t *testing.T) {
	if _, err := New(Config{}); err == nil {
		t.Error("New without a node succeeded")
	}
	db, err := storage.Open(t.TempDir(), storage.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	single, err := node.New(node.Config{Self: "n1", Store: db})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := New(Config{Node: single, Stats: db, MaxValueBytes: -1}); err == nil {
		t.Error("New with a negative limit succeeded")
	}
	if _, err := New(Config{Node: single, Stats: db, MaxValueBytes: 2 << 20, MaxInflightBytes: 1 << 20}); err == nil {
		t.Error("New with MaxInflightBytes below MaxValueBytes succeeded")
	}
	clustered, err := node.New(node.Config{Self: "n1", Store: db, Leadership: &fakeLeadership{}, Peers: transport.NewInMem().Client("n1")})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := New(Config{Node: clustered, Stats: db, PeerToken: "short"}); err == nil {
		t.Error("New in cluster mode with a short token succeeded")
	}
}

// A write refused because storage is closing is a 503 the client may retry.
func TestServer_Put_AfterStorageClosedIs503(t *testing.T) {
	n := newTestNode(t, 0)
	_ = n.db.Close()
	r := n.do("PUT", "/v1/kv/x", `1`)
	if r.status != 503 || errorCode(t, r.body) != "shutting_down" {
		t.Fatalf("PUT after close = %d %s", r.status, r.body)
	}
}

// ack=, consistency= and max_stale= are validated before anything happens,
// on a single node too; a refused write changes nothing.
func TestServer_AckAndConsistencyParameters(t *testing.T) {
	n := newTestNode(t, 0)
	before := n.snapshot()
	for _, tc := range []struct{ method, path, body string }{
		{"PUT", "/v1/kv/p?ack=most", `1`},
		{"DELETE", "/v1/kv/p?ack=", ""}, // empty means the default: accepted below, 404 here
		{"GET", "/v1/kv/p?consistency=eventual", ""},
		{"GET", "/v1/kv/p?max_stale=2s", ""},
		{"GET", "/v1/kv/p?consistency=stale&max_stale=soon", ""},
	} {
		r := n.do(tc.method, tc.path, tc.body)
		want := "invalid_parameter"
		if tc.method == "DELETE" {
			want = "key_not_found"
		}
		if r.status/100 != 4 || errorCode(t, r.body) != want {
			t.Errorf("%s %s: %d %s, want %s", tc.method, tc.path, r.status, r.body, want)
		}
	}
	if diff := cmp.Diff(before, n.snapshot()); diff != "" {
		t.Fatalf("refused requests changed the store (-before +after):\n%s", diff)
	}
	for _, ack := range []string{"leader", "quorum", "all"} {
		if r := n.do("PUT", "/v1/kv/p?ack="+ack, `1`); r.status/100 != 2 {
			t.Fatalf("ack=%s on a single node: %d %s", ack, r.status, r.body)
		}
	}
	for _, q := range []string{"consistency=strong", "consistency=stale", "consistency=stale&max_stale=1s"} {
		if r := n.do("GET", "/v1/kv/p?"+q, ""); r.status != 200 || r.body != "1" {
			t.Fatalf("GET ?%s on a single node: %d %s", q, r.status, r.body)
		}
	}
}

// Item 5: HEAD is served wherever GET is, with GET's status and headers
// (Content-Length included) and no body, errors too.
func TestServer_Head_LikeGetWithoutBody(t *testing.T) {
	n := newTestNode(t, 0)
	n.do("PUT", "/v1/kv/k", `{"v":"head"}`)
	for _, path := range []string{
		"/v1/kv/k", "/v1/kv/k?consistency=stale", "/v1/kv/missing", "/v1/kv/k?ack=all",
		"/v1/kv", "/v1/kv?prefix=k&limit=1", "/v1/kv?limit=0",
		"/v1/status", "/healthz", "/readyz", "/metrics",
	} {
		get := n.do("GET", path, "")
		head := n.do("HEAD", path, "")
		if head.body != "" {
			t.Errorf("HEAD %s has a body: %q", path, head.body)
		}
		if head.status != get.status {
			t.Errorf("HEAD %s = %d, GET = %d", path, head.status, get.status)
		}
		names := []string{"Content-Type", "Content-Length", "ETag", "Retry-After", HeaderConsistency}
		if path == "/metrics" {
			names = names[:1] // its body changes with every request
		} else if got := head.header.Get("Content-Length"); got != strconv.Itoa(len(get.body)) {
			t.Errorf("HEAD %s Content-Length = %q, the GET body is %d bytes", path, got, len(get.body))
		}
		for _, h := range names {
			if head.header.Get(h) != get.header.Get(h) {
				t.Errorf("HEAD %s %s = %q, GET's = %q", path, h, head.header.Get(h), get.header.Get(h))
			}
		}
	}
	n.srv.SetReady(false)
	if r := n.do("HEAD", "/readyz", ""); r.status != 503 || r.header.Get("Retry-After") == "" || r.body != "" {
		t.Fatalf("HEAD /readyz while not ready = %d %v %q", r.status, r.header, r.body)
	}
	for path, allow := range map[string]string{"/v1/kv": "GET, HEAD", "/v1/kv/k": "GET, HEAD, PUT, DELETE", "/healthz": "GET, HEAD"} {
		if r := n.do("POST", path, "1"); r.status != 405 || r.header.Get("Allow") != allow {
			t.Errorf("POST %s = %d, Allow %q; want 405, Allow %q", path, r.status, r.header.Get("Allow"), allow)
		}
	}
}
