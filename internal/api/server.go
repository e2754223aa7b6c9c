package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-retryablehttp"

	"github.com/go-chi/chi/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/statefulkv/store/internal/peerhttp"
	"github.com/statefulkv/store/internal/replication"
	"github.com/statefulkv/store/internal/storage"
)

// Store is what the HTTP layer needs from the local database. *storage.DB
// implements it.
type Store interface {
	// Get returns the live entry or an error wrapping storage.ErrNotFound.
	Get(key string) (storage.Entry, error)
	// Scan lists live entries in key order; see storage.DB.Scan.
	Scan(prefix, after string, limit int) ([]storage.Entry, bool, error)
	// Apply durably applies a mutation; it returns only after fsync.
	Apply(ctx context.Context, m storage.Mutation) (storage.Result, error)
	// Size is the data file size in bytes.
	Size() int64
	// LastSeq is the highest sequence number assigned.
	LastSeq() uint64
}

// Config configures a Server. Fields without a stated default are required.
type Config struct {
	// NodeID names this node in /v1/status and logs.
	NodeID string
	// BuildVersion is reported by /v1/status.
	BuildVersion string
	// Store holds the data.
	Store Store
	// MaxValueBytes bounds a value's size. Default 1 MiB.
	MaxValueBytes int64
	// Epoch stamps versions assigned by this node. Default 1, which is what a
	// single node without election uses.
	Epoch uint64
	// Logger receives one line per request (debug) and per failure.
	// Default: slog.Default().
	Logger *slog.Logger
	// Registerer and Gatherer back /metrics. Default: a private registry.
	Registerer prometheus.Registerer
	Gatherer   prometheus.Gatherer

	// Leadership switches the node to cluster mode: writes are served by
	// the leader and forwarded to it from other nodes; so are reads, unless
	// Replication serves them at the key's owners. Nil means a single node
	// that serves everything.
	Leadership Leadership
	// PeerAddr maps a node identity to host:port; required with Leadership.
	PeerAddr func(id string) (string, error)
	// ForwardTimeout bounds one forwarded request, retries included; it
	// should cover a leader change (lease duration + retry period). Default 30s.
	ForwardTimeout time.Duration
	// PeerToken is the shared cluster secret nodes present to each other;
	// required with Leadership, at least 16 bytes.
	PeerToken string
	// Replication, with Leadership, replicates writes to their owners and
	// serves reads from replicas (see replicated.go). Without it a cluster
	// node keeps every key on the leader alone.
	Replication Replication
	// ReplicationTimeout bounds the wait for a write's ack level; past it
	// the client gets 504 outcome_unknown. Default 5s.
	ReplicationTimeout time.Duration
}

// DefaultMaxValueBytes is the default --max-value-bytes.
const DefaultMaxValueBytes = 1 << 20

// Server is the HTTP API of one node.
type Server struct {
	cfg     Config
	log     *slog.Logger
	ready   atomic.Bool
	handler http.Handler
	metrics *httpMetrics
	// forwarder carries requests to the leader (cluster mode only).
	forwarder *retryablehttp.Client
	// readClient carries reads to replicas (cluster mode only).
	readClient *http.Client
	// peers serves, and peerTransport sends, the requests nodes forward
	// to each other, over one multiplexed connection per peer
	// (internal/peerhttp; cluster mode only).
	peers         *peerhttp.Server
	peerTransport *peerhttp.Transport
	// idSeq numbers the request ids this node generates.
	idSeq atomic.Uint64
}

// New validates cfg and builds the server. It starts not ready; call
// SetReady once the node can serve.
func New(cfg Config) (*Server, error) {
	if cfg.Store == nil {
		return nil, errors.New("api: Config.Store is required")
	}
	if cfg.MaxValueBytes == 0 {
		cfg.MaxValueBytes = DefaultMaxValueBytes
	}
	if cfg.MaxValueBytes < 0 {
		return nil, fmt.Errorf("api: MaxValueBytes must be positive, got %d", cfg.MaxValueBytes)
	}
	if cfg.Epoch == 0 {
		cfg.Epoch = 1
	}
	if cfg.Leadership != nil && cfg.PeerAddr == nil {
		return nil, errors.New("api: Config.PeerAddr is required with Leadership")
	}
	if cfg.Leadership != nil && len(cfg.PeerToken) < 16 {
		return nil, errors.New("api: Config.PeerToken of at least 16 bytes is required with Leadership")
	}
	if cfg.ForwardTimeout <= 0 {
		cfg.ForwardTimeout = 30 * time.Second
	}
	if cfg.Replication != nil && cfg.Leadership == nil {
		return nil, errors.New("api: Config.Replication needs Leadership")
	}
	if cfg.ReplicationTimeout <= 0 {
		cfg.ReplicationTimeout = 5 * time.Second
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
	}
	s.handler = s.routes()
	if cfg.Leadership != nil {
		s.peers = &peerhttp.Server{Handler: s.handler}
		s.forwarder = s.newForwarder()
		s.readClient = &http.Client{Transport: s.forwarder.HTTPClient.Transport}
	}
	return s, nil
}

// Shutdown ends the peer connections once the HTTP server has drained:
// requests other nodes forwarded here and this node has read are served
// and answered, the rest are handed back unread so the sender retries
// them elsewhere (see peerhttp). Then this node's own connections to its
// peers close. It returns ctx's error if that takes too long.
func (s *Server) Shutdown(ctx context.Context) error {
	if s.peers == nil {
		return nil
	}
	err := s.peers.Shutdown(ctx)
	_ = s.peerTransport.Close()
	return err
}

// peerStream turns a peer's request into the multiplexed connection it
// forwards requests over.
func (s *Server) peerStream(w http.ResponseWriter, r *http.Request) {
	if err := s.peers.Upgrade(w, r); err != nil {
		s.writeError(w, r, fmt.Errorf("%s: %w", PeerStreamPath, err))
	}
}

// SetReady flips /readyz. main sets it false first thing on shutdown so the
// Service stops routing new clients here while in-flight requests drain.
func (s *Server) SetReady(ready bool) { s.ready.Store(ready) }

// ServeHTTP makes Server an http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.handler.ServeHTTP(w, r) }

func (s *Server) routes() http.Handler {
	r := chi.NewRouter()
	r.Use(s.instrument)
	if s.cfg.Leadership != nil {
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

	r.Get("/healthz", s.healthz)
	r.Get("/readyz", s.readyz)
	r.Method(http.MethodGet, "/metrics", promhttp.HandlerFor(s.cfg.Gatherer, promhttp.HandlerOpts{}))
	r.Get("/v1/status", s.status)

	if s.cfg.Leadership != nil {
		r.Post(LeaseReleasedPath, s.leaseReleased)
		r.Post(LeaderPath, s.leaderHint)
		r.Get(PeerStreamPath, s.peerStream)
	}
	if s.cfg.Replication != nil {
		peer := s.cfg.Replication.Handler()
		r.Post(replication.ReplicatePath, peer.ServeHTTP)
		r.Post(replication.DigestsPath, peer.ServeHTTP)
		r.Post(replication.EntriesPath, peer.ServeHTTP)
		r.Post(replication.ReadIndexPath, peer.ServeHTTP)
	}

	r.Get("/v1/kv", s.list)
	r.Get("/v1/kv/*", s.get)
	r.Put("/v1/kv/*", s.put)
	r.Delete("/v1/kv/*", s.delete)
	return r
}

// allowedMethods lists the methods routed for path, for the Allow header.
func allowedMethods(routes chi.Routes, path string) []string {
	var out []string
	for _, m := range []string{http.MethodGet, http.MethodPut, http.MethodDelete} {
		if routes.Match(chi.NewRouteContext(), m, path) {
			out = append(out, m)
		}
	}
	return out
}

func (s *Server) healthz(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

// readyContact is how long a follower may go without a message from the
// leader and still call itself ready: four 500 ms heartbeats, so a lost
// heartbeat or a pause is not an outage, and a cut-off pod is one.
const readyContact = 2 * time.Second

func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	if !s.ready.Load() {
		s.writeError(w, r, fmt.Errorf("%w: node is starting or shutting down", errNotReady))
		return
	}
	if err := s.reachable(); err != nil {
		s.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
}

// reachable is nil when this node can serve what clients send it: it leads
// with its write gate open, or it heard from a leader within readyContact.
// A node that can do neither would hold every write until the forward
// deadline and fail strong reads, so it leaves the Service instead; it keeps
// answering stale reads to whoever still asks it. Without replication there
// are no heartbeats to judge by, and the node stays ready as before.
func (s *Server) reachable() error {
	if s.cfg.Leadership == nil || s.cfg.Replication == nil {
		return nil
	}
	if _, open := s.cfg.Leadership.WriteGate(); open {
		return nil
	}
	since := s.cfg.Replication.LastContact()
	if since <= readyContact {
		return nil
	}
	leader, _ := s.cfg.Leadership.Leader()
	if leader == "" {
		leader = "none known"
	}
	if since > 365*24*time.Hour {
		return fmt.Errorf("%w: no message from a leader yet (leader: %s)", errNotReady, leader)
	}
	return fmt.Errorf("%w: no message from the leader (%s) for %s; cut off from it?", errNotReady, leader, since.Round(time.Millisecond))
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

func (s *Server) status(w http.ResponseWriter, _ *http.Request) {
	role, leader, epoch := "single", "", s.cfg.Epoch
	if s.cfg.Leadership != nil {
		leader, epoch = s.cfg.Leadership.Leader()
		role = "follower"
		if _, open := s.cfg.Leadership.WriteGate(); open {
			role = "leader"
		}
	}
	body := statusBody{
		Node:      s.cfg.NodeID,
		Role:      role,
		Leader:    leader,
		Version:   s.cfg.BuildVersion,
		Epoch:     epoch,
		LastSeq:   s.cfg.Store.LastSeq(),
		DataBytes: s.cfg.Store.Size(),
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
	opts, err := parseReadOptions(r)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	if s.cfg.Replication != nil {
		s.replicatedGet(w, r, key, opts)
		return
	}
	// A single node (and a cluster node without replication) answers both
	// consistencies from the one copy, which is always current.
	if !s.servesReads(w, r) {
		return
	}
	e, err := s.cfg.Store.Get(key)
	if err != nil {
		s.writeError(w, r, notFoundKey(err, key))
		return
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("ETag", etag(e.Version))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(e.Value)
}

// writeBody is the response to a successful PUT or DELETE.
type writeBody struct {
	Key     string `json:"key"`
	Version string `json:"version"`
	Created bool   `json:"created,omitempty"`
	Deleted bool   `json:"deleted,omitempty"`
}

func (s *Server) put(w http.ResponseWriter, r *http.Request) {
	key, err := keyFromPath(r)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	m := storage.Mutation{Key: key, Epoch: s.cfg.Epoch}
	if err := conditions(r, &m); err != nil {
		s.writeError(w, r, err)
		return
	}
	if m.Value, err = readValue(w, r, s.cfg.MaxValueBytes); err != nil {
		s.writeError(w, r, err)
		return
	}
	res, ok := s.applyOrForward(w, r, m, m.Value)
	if !ok {
		return
	}
	w.Header().Set("ETag", etag(res.Entry.Version))
	status := http.StatusOK
	if res.Created {
		status = http.StatusCreated
	}
	writeJSON(w, status, writeBody{Key: key, Version: res.Entry.Version.String(), Created: res.Created})
}

func (s *Server) delete(w http.ResponseWriter, r *http.Request) {
	key, err := keyFromPath(r)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	m := storage.Mutation{Key: key, Epoch: s.cfg.Epoch, Delete: true}
	if err := conditions(r, &m); err != nil {
		s.writeError(w, r, err)
		return
	}
	if m.IfAbsent {
		s.writeError(w, r, fmt.Errorf("%w: If-None-Match: * cannot apply to DELETE", errInvalidPrecondition))
		return
	}
	res, ok := s.applyOrForward(w, r, m, nil)
	if !ok {
		return
	}
	writeJSON(w, http.StatusOK, writeBody{Key: key, Version: res.Entry.Version.String(), Deleted: true})
}

// listBody is GET /v1/kv.
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
	prefix, after, limit, err := listParams(r)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	if !s.servesReads(w, r) {
		return
	}
	entries, more, err := s.cfg.Store.Scan(prefix, after, limit)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	body := listBody{Items: make([]listItem, 0, len(entries))}
	for _, e := range entries {
		body.Items = append(body.Items, listItem{Key: e.Key, Version: e.Version.String(), Value: e.Value})
	}
	if more {
		body.Next = entries[len(entries)-1].Key
	}
	writeJSON(w, http.StatusOK, body)
}

// notFoundKey names the key in a not-found error; other errors pass through.
func notFoundKey(err error, key string) error {
	if errors.Is(err, storage.ErrNotFound) {
		return fmt.Errorf("%w: %q", storage.ErrNotFound, key)
	}
	return err
}

// servesReads reports whether this node answers a read from its own data:
// always as a single node; in cluster mode without Replication (and for
// listings, which the leader answers from its complete copy) only the
// leader does, and other nodes hand the read to it (having then written the
// response).
func (s *Server) servesReads(w http.ResponseWriter, r *http.Request) bool {
	if s.cfg.Leadership == nil {
		return true
	}
	_, local := s.leadHere(w, r, nil)
	return local
}

// applyOrForward applies a validated write here if this node may write, or
// hands it to the leader. ok is false when a response has been written.
func (s *Server) applyOrForward(w http.ResponseWriter, r *http.Request, m storage.Mutation, body []byte) (storage.Result, bool) {
	// A client's own id makes its retries idempotent. A request without one
	// gets an id only if it is forwarded (in proxy), where this node's
	// retries need it; one served here directly has nobody to retry it, so
	// it costs no id record.
	m.RequestID = r.Header.Get(HeaderRequestID)
	if err := validateRequestID(m.RequestID); err != nil {
		s.writeError(w, r, err)
		return storage.Result{}, false
	}
	// Checked here too so a follower refuses a bad ack= before forwarding.
	if _, err := parseAck(r); err != nil {
		s.writeError(w, r, err)
		return storage.Result{}, false
	}
	if s.cfg.Leadership == nil {
		res, err := s.cfg.Store.Apply(r.Context(), m)
		if err != nil {
			s.writeError(w, r, notFoundKey(err, m.Key))
			return res, false
		}
		return res, true
	}
	epoch, local := s.leadHere(w, r, body)
	if !local {
		return storage.Result{}, false
	}
	m.Epoch = epoch
	var res storage.Result
	if s.cfg.Replication != nil {
		var ok bool
		if res, ok = s.replicatedWrite(w, r, epoch, m); !ok {
			return res, false
		}
	} else {
		var err error
		if res, err = s.cfg.Store.Apply(r.Context(), m); err != nil {
			s.writeError(w, r, notFoundKey(err, m.Key))
			return res, false
		}
	}
	// The gate may have closed while the write was syncing. Acknowledging
	// now could confirm a write a newer leader never sees, so the client is
	// told the truth: it is durable here, but whether it counts is unknown.
	if e2, still := s.cfg.Leadership.WriteGate(); !still || e2 != epoch {
		s.writeError(w, r, fmt.Errorf("%w: leadership (epoch %d) ended while the write was being committed; retry with the same %s", errOutcomeUnknown, epoch, HeaderRequestID))
		return res, false
	}
	w.Header().Set(HeaderLeader, s.cfg.NodeID)
	w.Header().Set(HeaderEpoch, strconv.FormatUint(epoch, 10))
	return res, true
}
