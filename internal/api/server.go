package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/statefulkv/store/internal/node"
	"github.com/statefulkv/store/internal/peerhttp"
	"github.com/statefulkv/store/internal/replication"
	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// Node is what the API needs from the node layer, which decides where each
// request is served. *node.Node implements it.
type Node interface {
	Write(ctx context.Context, w node.Write, o node.Origin) (node.WriteResult, error)
	Get(ctx context.Context, key string, opts node.ReadOptions, o node.Origin) (node.ReadResult, error)
	List(ctx context.Context, opts node.ListOptions, o node.Origin) (node.ListResult, error)
	// Role is this node's part in the cluster, for /v1/status.
	Role() (role, leader string, epoch uint64)
	// Clustered reports cluster mode (peer routes and headers exist).
	Clustered() bool
	// Ready is nil when the node can serve what clients send it.
	Ready() error
}

// Stats is what /v1/status reports of the local database. *storage.DB
// implements it.
type Stats interface {
	// Size is the data file size in bytes.
	Size() int64
	// LastSeq is the highest sequence number assigned.
	LastSeq() uint64
}

// Replication is replication's part of the HTTP surface in cluster mode.
// *replication.Cluster implements it.
type Replication interface {
	// Status is replication's part of /v1/status.
	Status() replication.Status
	// Service serves the replication calls of other members.
	Service() transport.ReplicaService
}

// Config configures a Server. Fields without a stated default are required.
type Config struct {
	// NodeID names this node in /v1/status and logs.
	NodeID string
	// BuildVersion is reported by /v1/status.
	BuildVersion string
	// Node serves every request.
	Node Node
	// Stats feeds /v1/status.
	Stats Stats
	// MaxValueBytes bounds a value's size. Default 1 MiB.
	MaxValueBytes int64
	// MaxInflightBytes bounds the request bodies this node holds at once
	// (see byteBudget). Default 16 MiB, or MaxValueBytes if larger; at
	// least MaxValueBytes.
	MaxInflightBytes int64
	// InflightWait is how long a body that does not fit waits for others
	// to finish before 503 overloaded. Default 2s.
	InflightWait time.Duration
	// Logger receives one line per request (debug) and per failure.
	// Default: slog.Default().
	Logger *slog.Logger
	// Registerer and Gatherer back /metrics. Default: a private registry.
	Registerer prometheus.Registerer
	Gatherer   prometheus.Gatherer

	// The rest is for cluster mode (Node.Clustered).

	// PeerToken is the shared cluster secret nodes present to each other,
	// at least 16 bytes.
	PeerToken string
	// PeerAddr maps a node identity to host:port, for 307 redirects.
	PeerAddr func(id string) (string, error)
	// Peers is what this node serves to the typed calls of other nodes
	// (node.Node.Service).
	Peers transport.Service
	// Replication, if set, serves the replication endpoints and status.
	Replication Replication
}

// DefaultMaxValueBytes is the default --max-value-bytes.
const DefaultMaxValueBytes = 1 << 20

// DefaultMaxInflightBytes is MaxInflightBytes when it is not set.
const DefaultMaxInflightBytes = 16 << 20

// Server is the HTTP API of one node.
type Server struct {
	cfg     Config
	log     *slog.Logger
	ready   atomic.Bool
	handler http.Handler
	metrics *httpMetrics
	// bodies bounds the request bodies held at once.
	bodies *byteBudget
	// streams serves the multiplexed connections other nodes send their
	// calls over (internal/peerhttp; cluster mode only).
	streams *peerhttp.Server
}

// New validates cfg and builds the server. It starts not ready; call
// SetReady once the node can serve.
func New(cfg Config) (*Server, error) {
	if cfg.Node == nil || cfg.Stats == nil {
		return nil, errors.New("api: Config.Node and Config.Stats are required")
	}
	if cfg.MaxValueBytes == 0 {
		cfg.MaxValueBytes = DefaultMaxValueBytes
	}
	if cfg.MaxValueBytes < 0 {
		return nil, fmt.Errorf("api: MaxValueBytes must be positive, got %d", cfg.MaxValueBytes)
	}
	if cfg.MaxInflightBytes == 0 {
		cfg.MaxInflightBytes = max(DefaultMaxInflightBytes, cfg.MaxValueBytes)
	}
	if cfg.MaxInflightBytes < cfg.MaxValueBytes {
		return nil, fmt.Errorf("api: MaxInflightBytes (%d) must be at least MaxValueBytes (%d)", cfg.MaxInflightBytes, cfg.MaxValueBytes)
	}
	if cfg.InflightWait <= 0 {
		cfg.InflightWait = 2 * time.Second
	}
	if cfg.Node.Clustered() {
		switch {
		case len(cfg.PeerToken) < 16:
			return nil, errors.New("api: Config.PeerToken of at least 16 bytes is required in cluster mode")
		case cfg.PeerAddr == nil || cfg.Peers == nil:
			return nil, errors.New("api: Config.PeerAddr and Config.Peers are required in cluster mode")
		}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Registerer == nil || cfg.Gatherer == nil {
		reg := prometheus.NewRegistry()
		cfg.Registerer, cfg.Gatherer = reg, reg
	}
	s := &Server{
		cfg:     cfg,
		log:     cfg.Logger.With("component", "api"),
		metrics: newHTTPMetrics(cfg.Registerer),
		bodies:  newByteBudget(cfg.MaxInflightBytes, cfg.InflightWait),
	}
	s.metrics.watchBudget(cfg.Registerer, s.bodies)
	routes := s.routes()
	if err := s.metrics.setRoutes(routes); err != nil {
		return nil, fmt.Errorf("api: list routes: %w", err)
	}
	s.handler = routes
	if cfg.Node.Clustered() {
		// A frame holds a forwarded call or its answer: at most one
		// message (a page plus a value). The same bound as main's
		// peerhttp.Transport, which sends bodies of up to half of it.
		s.streams = &peerhttp.Server{Handler: s.handler, MaxFrameBytes: int(4 * transport.MaxMessageBytes(cfg.MaxValueBytes))}
	}
	return s, nil
}

// Shutdown ends the peer connections once the HTTP server has drained:
// calls other nodes sent here and this node has read are served and
// answered, the rest are handed back unread so the sender retries them
// elsewhere (see peerhttp). It returns ctx's error if that takes too long.
func (s *Server) Shutdown(ctx context.Context) error {
	if s.streams == nil {
		return nil
	}
	return s.streams.Shutdown(ctx)
}

// SetReady flips /readyz. main sets it false first thing on shutdown so the
// Service stops routing new clients here while in-flight requests drain.
func (s *Server) SetReady(ready bool) { s.ready.Store(ready) }

// ServeHTTP makes Server an http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.handler.ServeHTTP(w, r) }

func (s *Server) routes() chi.Router {
	r := chi.NewRouter()
	r.Use(s.instrument)
	if s.cfg.Node.Clustered() {
		r.Use(s.peerAuth)
	}
	r.NotFound(func(w http.ResponseWriter, r *http.Request) {
		s.writeError(w, r, fmt.Errorf("%w: %s %s; the API lives under /v1/kv", errRouteNotFound, r.Method, r.URL.Path))
	})
	r.MethodNotAllowed(func(w http.ResponseWriter, req *http.Request) {
		allowed := allowedMethods(r, req.URL.Path)
		w.Header().Set("Allow", strings.Join(allowed, ", "))
		s.writeError(w, req, fmt.Errorf("%w: %s on %s (allowed: %s)", errMethodNotAllowed, req.Method, req.URL.Path, strings.Join(allowed, ", ")))
	})

	// HEAD is served wherever GET is, by the same handler, so its status
	// and headers are GET's (a key's HEAD goes through the node exactly
	// like its GET); net/http drops the body of a HEAD response.
	get := func(pattern string, h http.Handler) {
		r.Method(http.MethodGet, pattern, h)
		r.Method(http.MethodHead, pattern, h)
	}
	get("/healthz", http.HandlerFunc(s.healthz))
	get("/readyz", http.HandlerFunc(s.readyz))
	get("/metrics", promhttp.HandlerFor(s.cfg.Gatherer, promhttp.HandlerOpts{}))
	get("/v1/status", http.HandlerFunc(s.status))

	if s.cfg.Node.Clustered() {
		r.Get(PeerStreamPath, s.peerStream)
		services := transport.Services{Node: s.cfg.Peers, ErrorOf: s.wireError}
		paths := transport.Paths
		if s.cfg.Replication != nil {
			services.Replica = s.cfg.Replication.Service()
			paths = append(slices.Clone(paths), transport.ReplicaPaths...)
		}
		// The largest call is a replication batch, which holds at least
		// one value of any allowed size.
		calls := transport.NewHandler(services, transport.MaxMessageBytes(s.cfg.MaxValueBytes))
		for _, p := range paths {
			r.Post(p, calls.ServeHTTP)
		}
	}

	get("/v1/kv", http.HandlerFunc(s.list))
	get("/v1/kv/*", http.HandlerFunc(s.get))
	r.Put("/v1/kv/*", s.put)
	r.Delete("/v1/kv/*", s.delete)
	return r
}

// allowedMethods lists the methods routed for path, for the Allow header.
func allowedMethods(routes chi.Routes, path string) []string {
	var out []string
	for _, m := range []string{http.MethodGet, http.MethodHead, http.MethodPut, http.MethodDelete} {
		if routes.Match(chi.NewRouteContext(), m, path) {
			out = append(out, m)
		}
	}
	return out
}

func (s *Server) healthz(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	if !s.ready.Load() {
		s.writeError(w, r, fmt.Errorf("%w: node is starting or shutting down", errNotReady))
		return
	}
	// The node decides whether it can serve what the Service sends it
	// (cut off from a live leader: no; see node.Ready).
	if err := s.cfg.Node.Ready(); err != nil {
		s.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
}

// statusBody is GET /v1/status.
type statusBody struct {
	Node string `json:"node"`
	// Role is "single" (no Kubernetes), "leader" or "follower".
	Role string `json:"role"`
	// Leader is the leader this node last observed (cluster mode).
	Leader    string `json:"leader,omitempty"`
	Version   string `json:"version"`
	Epoch     uint64 `json:"epoch"`
	LastSeq   uint64 `json:"last_seq"`
	DataBytes int64  `json:"data_bytes"`
	Ready     bool   `json:"ready"`
	// Replication is present in cluster mode.
	Replication *replication.Status `json:"replication,omitempty"`
}

func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	if _, err := parseQuery(r); err != nil {
		s.writeError(w, r, err)
		return
	}
	role, leader, epoch := s.cfg.Node.Role()
	body := statusBody{
		Node:      s.cfg.NodeID,
		Role:      role,
		Leader:    leader,
		Version:   s.cfg.BuildVersion,
		Epoch:     epoch,
		LastSeq:   s.cfg.Stats.LastSeq(),
		DataBytes: s.cfg.Stats.Size(),
		Ready:     s.ready.Load(),
	}
	if s.cfg.Replication != nil {
		st := s.cfg.Replication.Status()
		body.Replication = &st
	}
	writeJSON(w, http.StatusOK, body)
}

func (s *Server) get(w http.ResponseWriter, r *http.Request) {
	key, err := keyFromPath(r)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	q, err := parseQuery(r, "consistency", "max_stale", "redirect")
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	opts, err := parseReadOptions(q)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	o, err := origin(r, q)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	res, err := s.cfg.Node.Get(r.Context(), key, opts, o)
	h := w.Header()
	if res.ServedBy != "" {
		h.Set(HeaderServedBy, res.ServedBy)
	}
	if res.Consistency != "" {
		h.Set(HeaderConsistency, res.Consistency)
	}
	if res.HasLastContact {
		h.Set(HeaderLastContact, strconv.FormatInt(min(res.LastContact, maxReportedAge).Milliseconds(), 10))
	}
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(res.Entry.Value)))
	h.Set("ETag", etag(res.Entry.Version))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(res.Entry.Value)
}

// writeBody is the response to a successful PUT or DELETE.
type writeBody struct {
	Key     string `json:"key"`
	Version string `json:"version"`
	Created bool   `json:"created,omitempty"`
	Deleted bool   `json:"deleted,omitempty"`
}

func (s *Server) put(w http.ResponseWriter, r *http.Request) {
	wr, pre, o, err := s.parseWrite(r, false)
	if err == nil {
		var release func()
		release, err = s.reserveBody(r)
		defer release()
	}
	if err == nil {
		wr.Value, err = readValue(w, r, s.cfg.MaxValueBytes)
	}
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	res, err := s.write(r.Context(), wr, pre, o)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.writeHeaders(w, res)
	w.Header().Set("ETag", etag(res.Version))
	status := http.StatusOK
	if res.Created {
		status = http.StatusCreated
	}
	writeJSON(w, status, writeBody{Key: wr.Key, Version: res.Version.String(), Created: res.Created})
}

// reserveBody takes the body's bytes from the node's budget before the body
// is read, and holds them until the request is answered (the value travels
// to the leader and the replicas meanwhile). A body without a length
// (chunked) reserves the largest legal value; one announcing more than that
// is refused by readValue, so it reserves nothing.
func (s *Server) reserveBody(r *http.Request) (release func(), err error) {
	n := r.ContentLength
	switch {
	case n < 0:
		n = s.cfg.MaxValueBytes
	case n == 0, n > s.cfg.MaxValueBytes:
		return func() {}, nil
	}
	release, err = s.bodies.acquire(r.Context(), n)
	if err != nil {
		if r.Context().Err() == nil { // refused, not a client that left
			s.metrics.overloaded.Inc()
		}
		return func() {}, err
	}
	return release, nil
}

func (s *Server) delete(w http.ResponseWriter, r *http.Request) {
	wr, pre, o, err := s.parseWrite(r, true)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	res, err := s.write(r.Context(), wr, pre, o)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.writeHeaders(w, res)
	writeJSON(w, http.StatusOK, writeBody{Key: wr.Key, Version: res.Version.String(), Deleted: true})
}

// write applies wr under pre. The store compares one version atomically
// (storage.Mutation.IfMatch), and If-Match may list several: the write must
// apply if the key is at any of them (RFC 9110 §13.1.1). So it tries the
// newest listed version, and when that compare-and-set fails because the
// key is at another listed version (the refusal reports the version it
// compared against, in the same atomic step), tries that one. A success
// therefore happened while the key was at a listed version, and the 412
// that ends the loop reports a current version the list does not hold:
// each attempt is one atomic compare-and-set, and together they answer as
// one any-of comparison would. A key's version only grows, so each listed
// version is tried at most once. A failed attempt changes nothing and
// records no request id, so the next one may carry the same id.
func (s *Server) write(ctx context.Context, wr node.Write, pre precondition, o node.Origin) (node.WriteResult, error) {
	wr.IfExists, wr.IfAbsent = pre.ifExists, pre.ifAbsent
	if !pre.tagged {
		return s.cfg.Node.Write(ctx, wr, o)
	}
	if len(pre.versions) == 0 {
		return node.WriteResult{}, fmt.Errorf("%w: If-Match lists only %s, and no such tag can match: this server issues strong ETags such as \"1.42\" (a weak W/ tag never matches a compare-and-set)",
			storage.ErrConditionFailed, strings.Join(pre.unmatchable, ", "))
	}
	tried := make(map[storage.Version]bool, len(pre.versions))
	wr.IfMatch = pre.versions[0]
	for {
		tried[wr.IfMatch] = true
		res, err := s.cfg.Node.Write(ctx, wr, o)
		if _, code := classify(err); err == nil || code != "condition_failed" {
			return res, err
		}
		cur := currentVersion(err)
		if cur.IsZero() || tried[cur] || !slices.Contains(pre.versions, cur) {
			return res, err
		}
		wr.IfMatch = cur
	}
}

// writeHeaders names the leader that applied a write (cluster mode).
func (s *Server) writeHeaders(w http.ResponseWriter, res node.WriteResult) {
	if res.Leader != "" {
		w.Header().Set(HeaderLeader, res.Leader)
		w.Header().Set(HeaderEpoch, strconv.FormatUint(res.Epoch, 10))
	}
}

// listBody is GET /v1/kv, as writeList writes it.
type listBody struct {
	Items []listItem `json:"items"`
	// Next is the cursor for the following page (pass it as after=); absent
	// on the last page.
	Next string `json:"next,omitempty"`
}

type listItem struct {
	Key     string          `json:"key"`
	Version string          `json:"version"`
	Value   json.RawMessage `json:"value"`
}

func (s *Server) list(w http.ResponseWriter, r *http.Request) {
	q, err := parseQuery(r, "prefix", "after", "limit", "redirect")
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	opts, err := listParams(q)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	o, err := origin(r, q)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	res, err := s.cfg.Node.List(r.Context(), opts, o)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	next := ""
	if res.More && len(res.Entries) > 0 {
		next = res.Entries[len(res.Entries)-1].Key
	}
	writeList(w, res.Entries, next)
}

// writeList writes a page as json.Marshal would write its listBody (the
// same bytes: values compacted and HTML-escaped), one entry at a time. A
// page holds up to transport.PageBytes of values, and marshalling it whole
// held it about three times more (the encoder's doubling buffer and the
// result) on top of the entries. Here only one entry's encoding is held at
// a time, in one reused buffer; the price is encoding each entry twice,
// once to count the Content-Length (which a HEAD must carry too) and once
// to write it.
func writeList(w http.ResponseWriter, entries []storage.Entry, next string) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf) // escapes HTML, as json.Marshal does
	encode := func(e storage.Entry) ([]byte, error) {
		buf.Reset()
		if err := enc.Encode(listItem{Key: e.Key, Version: e.Version.String(), Value: e.Value}); err != nil {
			return nil, err
		}
		return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
	}
	tail := []byte("]}\n")
	if next != "" {
		n, _ := json.Marshal(next) // a string always marshals
		tail = slices.Concat([]byte(`],"next":`), n, []byte("}\n"))
	}
	head := []byte(`{"items":[`)
	size := len(head) + len(tail) + max(len(entries)-1, 0) // the commas
	for _, e := range entries {
		b, err := encode(e)
		if err != nil {
			// Only values validated as JSON are stored; this cannot happen.
			http.Error(w, `{"error":{"code":"internal","message":"encode response"}}`, http.StatusInternalServerError)
			return
		}
		size += len(b)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(size))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(head) // net/http drops a HEAD's body
	for i, e := range entries {
		if i > 0 {
			_, _ = w.Write([]byte(","))
		}
		b, _ := encode(e) // it encoded above
		if _, err := w.Write(b); err != nil {
			return // the client is gone
		}
	}
	_, _ = w.Write(tail)
}

// redirect answers a node.Redirect with 307 to the node it names, keeping
// the request's path and query.
func (s *Server) redirect(w http.ResponseWriter, r *http.Request, rd *node.Redirect) {
	addr, err := s.cfg.PeerAddr(rd.To)
	if err != nil {
		s.writeError(w, r, fmt.Errorf("%w: cannot address %s: %w", node.ErrNoLeader, rd.To, err))
		return
	}
	w.Header().Set("Location", "http://"+addr+r.URL.RequestURI())
	if rd.Leader {
		w.Header().Set(HeaderLeader, rd.To)
	}
	w.WriteHeader(http.StatusTemporaryRedirect)
}
