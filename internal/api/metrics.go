package api

import (
	"net/http"
	"strconv"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/go-chi/chi/v5/middleware"
	"github.com/prometheus/client_golang/prometheus"
)

type httpMetrics struct {
	requests *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	// routes and codes are the label values a series may have (labels
	// folds the rest), so no client input can create series: every label
	// comes from a fixed set.
	routes map[string]bool
	codes  map[int]bool
	// overloaded counts requests refused for the in-flight byte budget.
	overloaded prometheus.Counter
}

// Label values that stand for everything outside the fixed sets.
const (
	otherLabel     = "other"
	unmatchedRoute = "unmatched"
)

func newHTTPMetrics(reg prometheus.Registerer) *httpMetrics {
	m := &httpMetrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "store",
			Subsystem: "http",
			Name:      "requests_total",
			Help:      "HTTP requests by route pattern, method and status code.",
		}, []string{"route", "method", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "store",
			Subsystem: "http",
			Name:      "request_duration_seconds",
			Help:      "HTTP request latency by route pattern, method and status code.",
			Buckets:   prometheus.ExponentialBuckets(0.0001, 2, 16), // 100µs .. ~3.3s
		}, []string{"route", "method", "code"}),
	}
	m.overloaded = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "store", Subsystem: "http", Name: "overloaded_total",
		Help: "Requests refused (503 overloaded) because the bodies in flight filled --max-inflight-bytes.",
	})
	reg.MustRegister(m.requests, m.latency, m.overloaded)
	// The codes this server answers: its error table, the successes, a
	// peer-stream upgrade, and 500 for what the table does not know.
	// Relayed peer answers carry the peer's table, the same set unless a
	// node of another version adds codes; those fold.
	m.codes = map[int]bool{
		http.StatusSwitchingProtocols: true, http.StatusOK: true, http.StatusCreated: true,
		http.StatusTemporaryRedirect: true, http.StatusInternalServerError: true,
	}
	for _, row := range errorTable {
		m.codes[row.status] = true
	}
	return m
}

// watchBudget exports the bytes of request bodies held now.
func (m *httpMetrics) watchBudget(reg prometheus.Registerer, b *byteBudget) {
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "store", Subsystem: "http", Name: "inflight_body_bytes",
		Help: "Bytes of request bodies this node holds now (bounded by --max-inflight-bytes).",
	}, func() float64 { return float64(b.inUse()) }))
}

// setRoutes fixes the route label values to the patterns routes serves.
func (m *httpMetrics) setRoutes(routes chi.Routes) error {
	m.routes = map[string]bool{}
	return chi.Walk(routes, func(_, route string, _ http.Handler, _ ...func(http.Handler) http.Handler) error {
		m.routes[route] = true
		return nil
	})
}

// labels folds a request's route, method and status into the fixed sets:
// registered route patterns (never the raw path, which would make one
// series per key), the methods of RFC 9110 and PATCH, and the codes this
// server answers. A made-up method or an odd status is "other". A hijacked
// connection wrote no status through the wrapper; the only hijack here is
// the peer-stream upgrade, which answers 101.
func (m *httpMetrics) labels(r *http.Request, status int) (route, method, code string) {
	route = unmatchedRoute
	if rc := chi.RouteContext(r.Context()); rc != nil && m.routes[rc.RoutePattern()] {
		route = rc.RoutePattern()
	}
	switch method = r.Method; method {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch,
		http.MethodDelete, http.MethodConnect, http.MethodOptions, http.MethodTrace:
	default:
		method = otherLabel
	}
	if status == 0 {
		status = http.StatusSwitchingProtocols
	}
	code = otherLabel
	if m.codes[status] {
		code = strconv.Itoa(status)
	}
	return route, method, code
}

// instrument counts and times every request under bounded labels (labels)
// and logs it at debug.
func (s *Server) instrument(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		ww := middleware.NewWrapResponseWriter(w, r.ProtoMajor)
		next.ServeHTTP(ww, r)
		route, method, code := s.metrics.labels(r, ww.Status())
		d := time.Since(start)
		s.metrics.requests.WithLabelValues(route, method, code).Inc()
		s.metrics.latency.WithLabelValues(route, method, code).Observe(d.Seconds())
		s.log.DebugContext(r.Context(), "request", "method", r.Method, "path", r.URL.Path,
			"status", ww.Status(), "bytes", ww.BytesWritten(), "duration", d)
	})
}
