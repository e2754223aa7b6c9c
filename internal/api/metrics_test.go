package api

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/go-chi/chi/v5"
	"github.com/prometheus/client_golang/prometheus"
)

// seriesCount is how many series each HTTP metric has.
func seriesCount(t *testing.T, g prometheus.Gatherer) map[string]int {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int{}
	for _, mf := range mfs {
		switch mf.GetName() {
		case "store_http_requests_total", "store_http_request_duration_seconds":
			out[mf.GetName()] = len(mf.GetMetric())
		}
	}
	return out
}

// Item 6: no client input adds series. 100 made-up methods on made-up
// paths make at most one new series per metric.
func TestServer_Metrics_MadeUpMethodsAddAtMostOneSeries(t *testing.T) {
	n := newTestNode(t, 0)
	n.do("GET", "/v1/kv/warm", "")
	n.do("FOO", "/v1/kv/warm", "")
	before := seriesCount(t, n.srv.cfg.Gatherer)
	for i := range 100 {
		if r := n.do(fmt.Sprintf("M%03d", i), fmt.Sprintf("/v1/kv/k%d", i), ""); r.status != 405 {
			t.Fatalf("made-up method: %d %s", r.status, r.body)
		}
	}
	after := seriesCount(t, n.srv.cfg.Gatherer)
	for name, c := range after {
		if c > before[name]+1 || c == 0 {
			t.Errorf("%s: %d series before, %d after 100 made-up methods", name, before[name], c)
		}
	}
	for i := range 100 {
		n.do(fmt.Sprintf("N%03d", i), fmt.Sprintf("/nowhere/%d", i), "")
	}
	if got := seriesCount(t, n.srv.cfg.Gatherer); got["store_http_requests_total"] > after["store_http_requests_total"]+1 {
		t.Errorf("made-up methods on unknown paths: %d series, was %d", got["store_http_requests_total"], after["store_http_requests_total"])
	}
}

// Each label folds into its fixed set: registered route patterns, the
// standard methods, the codes this server answers.
func TestHTTPMetrics_Labels_FoldUnknownValues(t *testing.T) {
	srv, err := New(Config{NodeID: "n1", Node: &fakeNode{}, Stats: fakeStats{}})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		method, pattern string
		status          int
		want            [3]string
	}{
		{"PUT", "/v1/kv/*", 201, [3]string{"/v1/kv/*", "PUT", "201"}},
		{"HEAD", "/v1/kv", 200, [3]string{"/v1/kv", "HEAD", "200"}},
		{"PATCH", "/v1/kv/*", 405, [3]string{"/v1/kv/*", "PATCH", "405"}},
		{"BREW", "/v1/kv/*", 405, [3]string{"/v1/kv/*", "other", "405"}},
		{"get", "/v1/kv/*", 405, [3]string{"/v1/kv/*", "other", "405"}},
		{"GET", "", 404, [3]string{"unmatched", "GET", "404"}},
		{"GET", "/v1/kv/{made-up}", 404, [3]string{"unmatched", "GET", "404"}},
		{"GET", "/v1/kv/*", 299, [3]string{"/v1/kv/*", "GET", "other"}},
		{"GET", "/v1/kv/*", 418, [3]string{"/v1/kv/*", "GET", "other"}},
		{"PUT", "/v1/kv/*", 408, [3]string{"/v1/kv/*", "PUT", "408"}},
		{"GET", "/healthz", 0, [3]string{"/healthz", "GET", "101"}},
	}
	for _, tt := range tests {
		req := httptest.NewRequest(http.MethodGet, "/", nil)
		req.Method = tt.method
		rc := chi.NewRouteContext()
		if tt.pattern != "" {
			rc.RoutePatterns = []string{tt.pattern}
		}
		req = req.WithContext(context.WithValue(req.Context(), chi.RouteCtxKey, rc))
		var got [3]string
		got[0], got[1], got[2] = srv.metrics.labels(req, tt.status)
		if got != tt.want {
			t.Errorf("%s %q %d: labels %q, want %q", tt.method, tt.pattern, tt.status, got, tt.want)
		}
	}
}
