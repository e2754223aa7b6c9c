package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/statefulkv/store/internal/replication"
	"github.com/statefulkv/store/internal/storage"
)

// Replication is what the API needs from internal/replication in cluster
// mode. *replication.Cluster implements it.
type Replication interface {
	// Write runs apply (the leader's local commit) and replicates the
	// entry to the key's owners until ack is met; apply passes beforeSync
	// on as storage.Mutation.BeforeSync.
	Write(ctx context.Context, epoch uint64, ack replication.AckLevel, key string, apply func(beforeSync func(storage.Result)) (storage.Result, error)) (storage.Result, error)
	// Owners lists the key's owners, primary first.
	Owners(key string) []string
	// ReadStrong and ReadStale read this node's replica; see their docs.
	ReadStrong(ctx context.Context, key string) (storage.Entry, bool, error)
	ReadStale(key string) (storage.Entry, bool, time.Duration, error)
	// Status is replication's part of /v1/status.
	Status() replication.Status
	// LastContact is the time since this node last heard from a leader;
	// zero while it leads with its write gate open. /readyz uses it.
	LastContact() time.Duration
	// Handler serves the peer endpoints (behind the cluster token).
	Handler() http.Handler
}

// Read headers.
const (
	// HeaderServedBy names the node whose replica answered a read.
	HeaderServedBy = "X-Store-Served-By"
	// HeaderConsistency echoes the consistency a read was served at.
	HeaderConsistency = "X-Store-Consistency"
	// HeaderLastContact is, on a stale read, the milliseconds since the
	// answering replica last heard from the leader.
	HeaderLastContact = "X-Store-Last-Contact"
)

var (
	errTooStale        = errors.New("replica too stale")
	errReadUnconfirmed = errors.New("read not confirmed")
	errReplicasTimeout = errors.New("replicas did not confirm in time")
)

// readOptions is a GET's consistency=… and max_stale=….
type readOptions struct {
	stale    bool
	maxStale time.Duration // 0: no bound
}

func parseReadOptions(r *http.Request) (readOptions, error) {
	q := r.URL.Query()
	var o readOptions
	switch c := q.Get("consistency"); c {
	case "", "strong":
	case "stale":
		o.stale = true
	default:
		return o, fmt.Errorf("%w: consistency=%q: use strong (the default) or stale", errInvalidParameter, c)
	}
	if s := q.Get("max_stale"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 {
			return o, fmt.Errorf("%w: max_stale=%q: use a positive duration such as 2s or 500ms", errInvalidParameter, s)
		}
		if !o.stale {
			return o, fmt.Errorf("%w: max_stale applies only with consistency=stale", errInvalidParameter)
		}
		o.maxStale = d
	}
	return o, nil
}

func parseAck(r *http.Request) (replication.AckLevel, error) {
	ack, err := replication.ParseAck(r.URL.Query().Get("ack"))
	if err != nil {
		return ack, fmt.Errorf("%w: %w", errInvalidParameter, err)
	}
	return ack, nil
}

// replicatedWrite is the leader's write: commit here, then replicate until
// the ack level is met. ok is false when a response has been written.
func (s *Server) replicatedWrite(w http.ResponseWriter, r *http.Request, epoch uint64, m storage.Mutation) (storage.Result, bool) {
	ack, err := parseAck(r)
	if err != nil {
		s.writeError(w, r, err)
		return storage.Result{}, false
	}
	ctx, cancel := context.WithTimeout(r.Context(), s.cfg.ReplicationTimeout)
	defer cancel()
	res, err := s.cfg.Replication.Write(ctx, epoch, ack, m.Key, func(beforeSync func(storage.Result)) (storage.Result, error) {
		m.BeforeSync = beforeSync
		// Not the client's context: a client that leaves must not keep
		// Write from learning the commit (the mutation commits anyway),
		// or the key would stop counting as in flight too early.
		return s.cfg.Store.Apply(context.WithoutCancel(r.Context()), m)
	})
	switch {
	case err == nil:
		return res, true
	case res.Entry.Version.IsZero():
		// The local commit itself failed: nothing was written here. (If
		// the entry had already left for the owners the error is
		// storage.ErrSyncFailed, which the table answers as outcome_unknown.)
		s.writeError(w, r, notFoundKey(err, m.Key))
	case errors.Is(err, replication.ErrAckTimeout):
		s.writeError(w, r, fmt.Errorf("%w: %w: version %s is durable on the leader but ack=%s was not met within %s (%v); it will still be replicated, retry with the same %s to wait again",
			errOutcomeUnknown, errReplicasTimeout, res.Entry.Version, ack, s.cfg.ReplicationTimeout, err, HeaderRequestID))
	default:
		// The term ended or a follower knows a newer one: whether the next
		// leader keeps this write is not known here.
		s.writeError(w, r, fmt.Errorf("%w: version %s was committed on %s, whose leadership ended before ack=%s was met (%v); retry with the same %s",
			errOutcomeUnknown, res.Entry.Version, s.cfg.NodeID, ack, err, HeaderRequestID))
	}
	return res, false
}

// replicatedGet serves GET /v1/kv/{key} in cluster mode. Reads are served
// by an owner of the key that is not the leader when one answers (the
// leader hands reads off), else by the leader, which holds every key. A
// node that should not answer proxies the read (or redirects with
// ?redirect=true); a read forwarded here is answered here.
func (s *Server) replicatedGet(w http.ResponseWriter, r *http.Request, key string, opts readOptions) {
	if r.Header.Get(HeaderForwarded) == "" {
		cands := s.readCandidates(key)
		if len(cands) > 0 && cands[0] != s.cfg.NodeID {
			if s.proxyRead(w, r, cands) {
				return
			}
			// Nobody else answered: this node serves it if it holds the key.
			leader, _ := s.cfg.Leadership.Leader()
			if !slices.Contains(cands, s.cfg.NodeID) && leader != s.cfg.NodeID {
				s.writeError(w, r, fmt.Errorf("%w: no replica of %q answered (%v)", errReadUnconfirmed, key, cands))
				return
			}
		}
	}
	var (
		e     storage.Entry
		found bool
		err   error
	)
	h := w.Header()
	h.Set(HeaderServedBy, s.cfg.NodeID)
	if opts.stale {
		var age time.Duration
		e, found, age, err = s.cfg.Replication.ReadStale(key)
		h.Set(HeaderConsistency, "stale")
		h.Set(HeaderLastContact, strconv.FormatInt(min(age, 365*24*time.Hour).Milliseconds(), 10))
		if err == nil && opts.maxStale > 0 && age > opts.maxStale {
			err = fmt.Errorf("%w: %s last heard from the leader %s ago, more than max_stale=%s", errTooStale, s.cfg.NodeID, age.Round(time.Millisecond), opts.maxStale)
		}
	} else {
		h.Set(HeaderConsistency, "strong")
		e, found, err = s.cfg.Replication.ReadStrong(r.Context(), key)
		if err != nil {
			err = readError(err)
		}
	}
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	if !found || e.Deleted {
		s.writeError(w, r, fmt.Errorf("%w: %q", storage.ErrNotFound, key))
		return
	}
	h.Set("Content-Type", "application/json")
	h.Set("ETag", etag(e.Version))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(e.Value)
}

// readError keeps the codes of known strong-read failures and says "no
// leader" for the rest (the leader could not be asked). All are 503s: a
// read changes nothing and can be retried anywhere.
func readError(err error) error {
	switch {
	case errors.Is(err, storage.ErrStaleEpoch):
		return err
	case errors.Is(err, replication.ErrReadTimeout), errors.Is(err, replication.ErrDiverged):
		return fmt.Errorf("%w: %w", errReadUnconfirmed, err)
	}
	return fmt.Errorf("%w: the strong read could not be confirmed with the leader: %w", errNoLeader, err)
}

// readCandidates orders the nodes that may serve key: its owners other
// than the leader first, then the leader (which holds every key). A
// follower that owns the key serves it itself.
func (s *Server) readCandidates(key string) []string {
	leader, _ := s.cfg.Leadership.Leader()
	owners := s.cfg.Replication.Owners(key)
	if slices.Contains(owners, s.cfg.NodeID) && s.cfg.NodeID != leader {
		return []string{s.cfg.NodeID}
	}
	var out []string
	for _, o := range owners {
		if o != leader {
			out = append(out, o)
		}
	}
	if leader != "" {
		out = append(out, leader)
	}
	return out
}

// proxyRead sends the read to the first candidate that answers (a read is
// safe to try twice) and copies its answer; ?redirect=true answers 307 to
// the first candidate instead. If every replica that answered refused with
// a 503, the last refusal is passed on. It returns false if nobody answered
// and nothing was written.
func (s *Server) proxyRead(w http.ResponseWriter, r *http.Request, cands []string) (written bool) {
	if redirect, _ := strconv.ParseBool(r.URL.Query().Get("redirect")); redirect {
		for _, id := range cands {
			if id == s.cfg.NodeID {
				continue
			}
			if addr, err := s.cfg.PeerAddr(id); err == nil {
				w.Header().Set("Location", "http://"+addr+r.URL.RequestURI())
				w.WriteHeader(http.StatusTemporaryRedirect)
				return true
			}
		}
	}
	var refusal *bufferedResponse // the last 503, if every replica refused
	defer func() {
		if refusal != nil && !written {
			refusal.writeTo(w)
			written = true
		}
	}()
	for _, id := range cands {
		if id == s.cfg.NodeID {
			continue
		}
		addr, err := s.cfg.PeerAddr(id)
		if err != nil {
			continue
		}
		ctx, cancel := context.WithTimeout(r.Context(), s.cfg.ForwardTimeout)
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+r.URL.RequestURI(), nil)
		if err != nil {
			cancel()
			continue
		}
		for k, vs := range r.Header {
			if !hopHeaders[k] {
				req.Header[k] = vs
			}
		}
		req.Header.Set(HeaderForwarded, s.cfg.NodeID)
		req.Header.Set(HeaderPeerToken, s.cfg.PeerToken)
		resp, err := s.readClient.Do(req)
		if err != nil {
			cancel()
			continue
		}
		if resp.StatusCode == http.StatusServiceUnavailable {
			// That replica cannot confirm now (catching up, too stale): the
			// next one may.
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
			refusal = &bufferedResponse{status: resp.StatusCode, header: resp.Header.Clone(), body: body}
			resp.Body.Close()
			cancel()
			continue
		}
		for k, vs := range resp.Header {
			if !hopHeaders[k] {
				w.Header()[k] = vs
			}
		}
		w.WriteHeader(resp.StatusCode)
		_, _ = io.Copy(w, resp.Body)
		resp.Body.Close()
		cancel()
		refusal = nil
		return true
	}
	return false
}

type bufferedResponse struct {
	status int
	header http.Header
	body   []byte
}

func (b *bufferedResponse) writeTo(w http.ResponseWriter) {
	for k, vs := range b.header {
		if !hopHeaders[k] {
			w.Header()[k] = vs
		}
	}
	w.WriteHeader(b.status)
	_, _ = w.Write(b.body)
}
