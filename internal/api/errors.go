package api

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strconv"

	"github.com/statefulkv/store/internal/node"
	"github.com/statefulkv/store/internal/peerhttp"
	"github.com/statefulkv/store/internal/replication"
	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// Client errors raised by the HTTP layer itself. Each is wrapped with a
// precise message (fmt.Errorf("%w: ...")) and mapped to a status and a stable
// code in errorTable.
var (
	errInvalidKey          = errors.New("invalid key")
	errInvalidJSON         = errors.New("invalid JSON")
	errValueTooLarge       = errors.New("value too large")
	errUnsupportedMedia    = errors.New("unsupported content type")
	errInvalidParameter    = errors.New("invalid query parameter")
	errInvalidPrecondition = errors.New("invalid precondition header")
	errInvalidRequestID    = errors.New("invalid request id")
	// errIncompleteBody is a request body that ended before its
	// Content-Length or final chunk, or whose framing broke: the client
	// hung up or sent less than it announced.
	errIncompleteBody = errors.New("incomplete request body")
	// errRequestTimeout is a request body that did not arrive within the
	// http.Server's ReadTimeout.
	errRequestTimeout   = errors.New("request body timed out")
	errRouteNotFound    = errors.New("no such route")
	errMethodNotAllowed = errors.New("method not allowed")
	errNotReady         = errors.New("not ready")
	errPeerAuth         = errors.New("peer authentication failed")
)

// errorTable is the one place where errors become HTTP statuses and the
// stable machine-readable codes documented in the README. Order matters only
// in that the first match wins.
var errorTable = []struct {
	err    error
	status int
	code   string
}{
	{errInvalidKey, http.StatusBadRequest, "invalid_key"},
	{errInvalidJSON, http.StatusBadRequest, "invalid_json"},
	{errInvalidParameter, http.StatusBadRequest, "invalid_parameter"},
	{errInvalidPrecondition, http.StatusBadRequest, "invalid_precondition"},
	{errInvalidRequestID, http.StatusBadRequest, "invalid_request_id"},
	{errIncompleteBody, http.StatusBadRequest, "incomplete_body"},
	{errRequestTimeout, http.StatusRequestTimeout, "request_timeout"},
	{node.ErrInvalidRequest, http.StatusBadRequest, "invalid_request"},
	{replication.ErrInvalidCall, http.StatusBadRequest, "invalid_request"},
	{replication.ErrNotCaughtUp, http.StatusServiceUnavailable, "not_leader"},
	// A member refusing a replication call of an older term; the caller
	// (a deposed leader) learns the member's fence from the answer.
	{replication.ErrTermRefused, http.StatusConflict, "stale_epoch"},
	{errPeerAuth, http.StatusUnauthorized, "peer_unauthenticated"},
	{errRouteNotFound, http.StatusNotFound, "route_not_found"},
	{peerhttp.ErrNotUpgrade, http.StatusUpgradeRequired, "upgrade_required"},
	{peerhttp.ErrCannotTakeOver, http.StatusNotImplemented, "upgrade_unsupported"},
	{storage.ErrNotFound, http.StatusNotFound, "key_not_found"},
	{errMethodNotAllowed, http.StatusMethodNotAllowed, "method_not_allowed"},
	{storage.ErrConditionFailed, http.StatusPreconditionFailed, "condition_failed"},
	{errValueTooLarge, http.StatusRequestEntityTooLarge, "value_too_large"},
	{errUnsupportedMedia, http.StatusUnsupportedMediaType, "unsupported_media_type"},
	{errNotReady, http.StatusServiceUnavailable, "not_ready"},
	{errOverloaded, http.StatusServiceUnavailable, "overloaded"},
	{node.ErrNotReady, http.StatusServiceUnavailable, "not_ready"},
	{peerhttp.ErrServerClosed, http.StatusServiceUnavailable, "shutting_down"},
	{node.ErrTooStale, http.StatusServiceUnavailable, "too_stale"},
	{node.ErrReadUnconfirmed, http.StatusServiceUnavailable, "read_unconfirmed"},
	{node.ErrNotLeader, http.StatusServiceUnavailable, "not_leader"},
	{node.ErrNoLeader, http.StatusServiceUnavailable, "no_leader"},
	{storage.ErrStaleEpoch, http.StatusServiceUnavailable, "stale_epoch"},
	{node.ErrLeaderTimeout, http.StatusGatewayTimeout, "outcome_unknown"},
	{node.ErrReplicasTimeout, http.StatusGatewayTimeout, "outcome_unknown"},
	{node.ErrOutcomeUnknown, http.StatusBadGateway, "outcome_unknown"},
	{storage.ErrSyncFailed, http.StatusBadGateway, "outcome_unknown"},
	{storage.ErrRequestIDReused, http.StatusConflict, "request_id_reused"},
	{storage.ErrClosed, http.StatusServiceUnavailable, "shutting_down"},
	// The client went away or its deadline passed while the write was queued:
	// it may or may not have been committed.
	{context.Canceled, http.StatusGatewayTimeout, "outcome_unknown"},
	{context.DeadlineExceeded, http.StatusGatewayTimeout, "outcome_unknown"},
}

// errorBody is the JSON shape of every 4xx/5xx response.
type errorBody struct {
	Error errorDetail `json:"error"`
}

type errorDetail struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	// CurrentVersion accompanies condition_failed when the key exists.
	CurrentVersion string `json:"current_version,omitempty"`
}

// classify maps err to its status and code; unknown errors are 500s. A
// peer's refusal that a node relays keeps the status and code the peer's
// own table gave it.
func classify(err error) (int, string) {
	// Only a relayed answer itself: a peer's refusal wrapped into an error
	// of this node (a read index that failed) is this node's error.
	if te, ok := err.(*transport.Error); ok {
		return te.Status, te.Code
	}
	for _, row := range errorTable {
		if errors.Is(err, row.err) {
			return row.status, row.code
		}
	}
	return http.StatusInternalServerError, "internal"
}

// writeError writes err as the JSON error body. 500s hide their message from
// the client (it may name files or internals) and are logged instead.
func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	if rd, ok := errors.AsType[*node.Redirect](err); ok {
		s.redirect(w, r, rd)
		return
	}
	status, code := classify(err)
	d := errorDetail{Code: code, Message: err.Error()}
	if cur := currentVersion(err); !cur.IsZero() {
		d.CurrentVersion = cur.String()
		w.Header().Set("ETag", etag(cur))
	}
	if ce, ok := errors.AsType[*storage.ConditionError](err); ok {
		d.Message = ce.Error() // without the storage-internal prefixes
	}
	if status == http.StatusInternalServerError {
		d.Message = "internal error; see the server log"
	}
	s.logFailure(r.Context(), "request failed", status, err, "method", r.Method, "path", r.URL.Path)
	if status == http.StatusServiceUnavailable {
		w.Header().Set("Retry-After", "1")
	}
	if errors.Is(err, errIncompleteBody) || errors.Is(err, errRequestTimeout) {
		// The rest of the body, if any, cannot be told from a next request.
		w.Header().Set("Connection", "close")
	}
	writeJSON(w, status, errorBody{Error: d})
}

// currentVersion is the key's version a failed precondition reports, here
// or at the peer that refused it.
func currentVersion(err error) storage.Version {
	if te, ok := errors.AsType[*transport.Error](err); ok {
		return storage.Version(te.Current)
	}
	if ce, ok := errors.AsType[*storage.ConditionError](err); ok {
		return ce.Current
	}
	return storage.Version{}
}

// fenced is a refusal of a sender's term that names the newer term this
// node has admitted (replication.StaleError).
type fenced interface {
	error
	FenceEpoch() uint64
}

// wireError is how this node's errors travel to the peer that sent the
// call (transport.ErrorFunc): the status and code of the one table, so the
// peer answers its client exactly as this node would have. It logs like
// writeError.
func (s *Server) wireError(err error) *transport.Error {
	status, code := classify(err)
	s.logFailure(context.Background(), "peer call failed", status, err)
	msg := err.Error()
	if ce, ok := errors.AsType[*storage.ConditionError](err); ok {
		msg = ce.Error()
	}
	if status == http.StatusInternalServerError {
		msg = "internal error on the peer; see its log"
	}
	te := &transport.Error{Status: status, Code: code, Message: msg, Current: transport.Version(currentVersion(err))}
	if fe, ok := errors.AsType[fenced](err); ok {
		te.Fence = fe.FenceEpoch()
	}
	return te
}

// logFailure logs a failed request. 503s are expected while leadership
// moves and clients retry them, so they are debug noise; unknown outcomes
// deserve a look; 500s are bugs.
func (s *Server) logFailure(ctx context.Context, msg string, status int, err error, attrs ...any) {
	level := slog.LevelDebug
	switch {
	case status == http.StatusInternalServerError:
		level = slog.LevelError
	case status >= 500 && status != http.StatusServiceUnavailable:
		level = slog.LevelWarn
	}
	s.log.Log(ctx, level, msg, append(attrs, "status", status, "err", err)...)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		// Only our own fixed types are marshalled; this cannot happen.
		http.Error(w, `{"error":{"code":"internal","message":"encode response"}}`, http.StatusInternalServerError)
		return
	}
	b = append(b, '\n')
	w.Header().Set("Content-Type", "application/json")
	// Set here so a HEAD, whose body net/http drops, says how long the
	// GET's body is.
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
}
