package api

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-retryablehttp"

	"github.com/statefulkv/store/internal/peerhttp"
)

// Headers of the write-routing protocol.
const (
	// HeaderForwarded marks a request a node forwarded to the leader; such a
	// request is never forwarded again (no loops).
	HeaderForwarded = "X-Store-Forwarded-By"
	// HeaderRequestID makes a write idempotent: a retry with the same id is
	// applied at most once. Clients may set it; otherwise the first node
	// that sees the write generates one.
	HeaderRequestID = "X-Request-Id"
	// HeaderLeader and HeaderEpoch name the node that applied a write.
	HeaderLeader = "X-Store-Leader"
	HeaderEpoch  = "X-Store-Epoch"
	// HeaderSeenEpoch carries, on a forwarded request, the newest epoch the
	// forwarding node has seen. A leader of an older term learns from it
	// that it has been superseded and steps down before applying anything.
	HeaderSeenEpoch = "X-Store-Seen-Epoch"
	// HeaderPeerToken authenticates a request as coming from another node of
	// the cluster; the peer headers above are honoured only with it.
	HeaderPeerToken = "X-Store-Peer-Token"
)

// Leadership is what the API needs from leader election.
type Leadership interface {
	// WriteGate returns the epoch to stamp writes with and whether this
	// node may accept a write at this instant.
	WriteGate() (epoch uint64, open bool)
	// Leader returns the last observed leader and its epoch ("" if none).
	Leader() (id string, epoch uint64)
	// ObserveEpoch reports an epoch seen elsewhere; if it is newer than
	// this node's term, the node stops writing at once.
	ObserveEpoch(epoch uint64)
	// Nudge asks a node that is not leading to try for the Lease now.
	Nudge()
	// HintLeader reports a peer's claim that id leads term epoch.
	HintLeader(id string, epoch uint64)
}

var (
	errPeerAuth       = errors.New("peer authentication failed")
	errNotLeader      = errors.New("not the leader")
	errNoLeader       = errors.New("no leader")
	errOutcomeUnknown = errors.New("outcome unknown")
	errLeaderTimeout  = errors.New("leader did not answer in time")
)

// forwardState follows one forwarded request across retries: whether any
// attempt may have reached the leader decides between "not applied" (503)
// and "outcome unknown" (502/504) when every attempt fails.
type forwardState struct {
	maybeSent  bool
	lastErr    error
	lastStatus int
}

type forwardStateKey struct{}

// newForwarder builds the retrying client that carries writes to the
// leader. Retries are safe because every forwarded write has a request id
// the leader deduplicates on; they stop when the request's context ends.
func (s *Server) newForwarder() *retryablehttp.Client {
	c := retryablehttp.NewClient()
	// Requests travel over one multiplexed connection per peer: the
	// follower→leader hop was where a write through a follower spent its
	// extra CPU (system calls and net/http's per-request machinery).
	// Peers of an older version, without the endpoint, get plain HTTP.
	s.peerTransport = &peerhttp.Transport{
		Path:   PeerStreamPath,
		Header: http.Header{HeaderPeerToken: {s.cfg.PeerToken}},
		Fallback: &http.Transport{
			Proxy:               nil, // peers are never reached through a proxy
			DialContext:         (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConns:        256,
			MaxIdleConnsPerHost: 256,
			IdleConnTimeout:     90 * time.Second,
		},
		DialTimeout: 2 * time.Second,
	}
	c.HTTPClient = &http.Client{
		// No per-attempt Timeout: every request carries the ForwardTimeout
		// deadline in its context, which bounds all attempts together (a
		// Client.Timeout of the same length only added a timer per try).
		Transport: s.peerTransport,
	}
	c.Logger = nil
	c.RetryMax = 1 << 20 // bounded by the context, not a count
	c.RetryWaitMin = 25 * time.Millisecond
	c.RetryWaitMax = 500 * time.Millisecond
	// Exponential and capped; unlike the default it ignores our own
	// Retry-After: 1, which would make a leader change slower than needed.
	c.Backoff = func(lo, hi time.Duration, attempt int, _ *http.Response) time.Duration {
		d := lo << min(attempt, 20)
		if d <= 0 || d > hi {
			d = hi
		}
		return d
	}
	c.CheckRetry = func(ctx context.Context, resp *http.Response, err error) (bool, error) {
		// Record first: an attempt cut short by the deadline may still have
		// reached the leader.
		if st, _ := ctx.Value(forwardStateKey{}).(*forwardState); st != nil {
			if err != nil {
				st.lastErr = err
				st.maybeSent = st.maybeSent || !isDialError(err)
			} else {
				st.lastStatus = resp.StatusCode
			}
		}
		// Any answer but 503 is the leader's final word, even if the
		// deadline passed while it arrived: it must reach the client.
		if err == nil && resp.StatusCode != http.StatusServiceUnavailable {
			return false, nil
		}
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		// A transport error (safe to retry: request ids), or 503, which
		// promises the write was not applied: the leader moved or its gate
		// is closed.
		return true, nil
	}
	// Each retry goes to whoever leads now, not to the leader of the first
	// try; that may be this very node, which then serves it locally.
	c.PrepareRetry = func(req *http.Request) error {
		if id, _ := s.cfg.Leadership.Leader(); id != "" {
			if addr, err := s.cfg.PeerAddr(id); err == nil {
				req.URL.Host = addr
				req.Host = addr
			}
		}
		return nil
	}
	c.ErrorHandler = retryablehttp.PassthroughErrorHandler
	return c
}

// peerAuth refuses requests that carry the peer headers (which can depose a
// leader or bypass forwarding) without the cluster token, so a client that
// can reach the port cannot pose as a node. The comparison takes constant
// time and the token is never logged.
func (s *Server) peerAuth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/internal/") ||
			r.Header.Get(HeaderForwarded) != "" || r.Header.Get(HeaderSeenEpoch) != "" || r.Header.Get(HeaderPeerToken) != "" {
			got := []byte(r.Header.Get(HeaderPeerToken))
			if subtle.ConstantTimeCompare(got, []byte(s.cfg.PeerToken)) != 1 {
				s.writeError(w, r, fmt.Errorf("%w: /internal/ and the %s and %s headers are for nodes of this cluster and need a valid %s",
					errPeerAuth, HeaderForwarded, HeaderSeenEpoch, HeaderPeerToken))
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// isDialError reports whether err happened before the request could be
// sent (connection refused, no route): then the leader never saw it.
func isDialError(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// ensureRequestID gives a request about to be forwarded an id, if the
// client sent none, so the retries of the forward are applied once.
//
// The id starts with the time in fixed-width hex, so the ids the leader
// records sort in arrival order and land at the end of its request-id
// B-tree: random ids dirtied a page per write there, which made the
// leader's commits several times larger (seen in CPU profiles as bbolt
// write time). The node id and a counter keep ids unique across nodes and
// within one nanosecond; the random part keeps them unique across
// restarts with a skewed clock.
func (s *Server) ensureRequestID(r *http.Request) {
	if r.Header.Get(HeaderRequestID) != "" {
		return
	}
	var b [4]byte
	_, _ = rand.Read(b[:])
	id := fmt.Sprintf("%016x-%s-%x-%s", time.Now().UnixNano(), s.cfg.NodeID, s.idSeq.Add(1), hex.EncodeToString(b[:]))
	r.Header.Set(HeaderRequestID, id)
}

// leadHere decides where a request that needs the leader is served. It
// returns local=true with the epoch when this node may serve it itself;
// otherwise it has already answered: proxied to the leader, a 307 for
// ?redirect=true, or a 503 that promises nothing was applied. body is the
// validated request body (nil for reads).
//
// While no other leader is known (an election is under way, or this node
// still believes it leads after a pause) it waits up to ForwardTimeout for
// the Lease to settle rather than failing at once, so clients ride out a
// leader change.
func (s *Server) leadHere(w http.ResponseWriter, r *http.Request, body []byte) (epoch uint64, local bool) {
	if seen, err := strconv.ParseUint(r.Header.Get(HeaderSeenEpoch), 10, 64); err == nil {
		s.cfg.Leadership.ObserveEpoch(seen)
	}
	if epoch, open := s.cfg.Leadership.WriteGate(); open {
		return epoch, true
	}
	if by := r.Header.Get(HeaderForwarded); by != "" {
		// The forwarding node retries with fresh leadership information;
		// answering at once keeps one request from waiting twice.
		s.writeError(w, r, fmt.Errorf("%w: %s forwarded this request here, but this node does not lead; it is never forwarded twice", errNotLeader, by))
		return 0, false
	}
	// One deadline covers the wait for a leader and the forward after it.
	ctx, cancel := context.WithTimeout(r.Context(), s.cfg.ForwardTimeout)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if epoch, open := s.cfg.Leadership.WriteGate(); open {
			return epoch, true
		}
		if leader, _ := s.cfg.Leadership.Leader(); leader != "" && leader != s.cfg.NodeID {
			s.toLeader(w, r.WithContext(ctx), leader, body)
			return 0, false
		}
		select {
		case <-ctx.Done():
			s.writeError(w, r, fmt.Errorf("%w: no node held the leader lease for %s; nothing was applied, retry shortly", errNoLeader, s.cfg.ForwardTimeout))
			return 0, false
		case <-tick.C:
		}
	}
}

// toLeader answers with a 307 to the leader for ?redirect=true, and
// otherwise proxies the request there.
func (s *Server) toLeader(w http.ResponseWriter, r *http.Request, leader string, body []byte) {
	addr, err := s.cfg.PeerAddr(leader)
	if err != nil {
		s.writeError(w, r, fmt.Errorf("%w: cannot address leader %s: %w", errNoLeader, leader, err))
		return
	}
	if redirect, _ := strconv.ParseBool(r.URL.Query().Get("redirect")); redirect {
		w.Header().Set("Location", "http://"+addr+r.URL.RequestURI())
		w.Header().Set(HeaderLeader, leader)
		w.WriteHeader(http.StatusTemporaryRedirect)
		return
	}
	s.proxy(w, r, addr, body)
}

// hopHeaders are not forwarded (RFC 9110 §7.6.1) or are set by the client.
var hopHeaders = map[string]bool{
	"Connection": true, "Keep-Alive": true, "Proxy-Connection": true, "Te": true,
	"Trailer": true, "Transfer-Encoding": true, "Upgrade": true, "Content-Length": true,
}

func (s *Server) proxy(w http.ResponseWriter, r *http.Request, addr string, body []byte) {
	if r.Method != http.MethodGet {
		s.ensureRequestID(r)
	}
	st := &forwardState{}
	ctx, cancel := context.WithTimeout(context.WithValue(r.Context(), forwardStateKey{}, st), s.cfg.ForwardTimeout)
	defer cancel()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := retryablehttp.NewRequestWithContext(ctx, r.Method, "http://"+addr+r.URL.RequestURI(), rd)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	for k, vs := range r.Header {
		if !hopHeaders[k] {
			req.Header[k] = vs
		}
	}
	req.Header.Set(HeaderForwarded, s.cfg.NodeID)
	req.Header.Set(HeaderPeerToken, s.cfg.PeerToken)
	if _, seen := s.cfg.Leadership.Leader(); seen != 0 {
		req.Header.Set(HeaderSeenEpoch, strconv.FormatUint(seen, 10))
	}
	resp, err := s.forwarder.Do(req)
	if err != nil {
		if resp != nil {
			resp.Body.Close()
		}
		switch {
		case r.Method == http.MethodGet:
			s.writeError(w, r, fmt.Errorf("%w: the read could not be served by the leader within %s (%v); retry", errNoLeader, s.cfg.ForwardTimeout, errors.Join(st.lastErr, err)))
		case errors.Is(err, context.DeadlineExceeded) && st.maybeSent:
			s.writeError(w, r, fmt.Errorf("%w: %w within %s; the write may or may not have been applied: retry with the same %s to be safe", errOutcomeUnknown, errLeaderTimeout, s.cfg.ForwardTimeout, HeaderRequestID))
		case st.maybeSent:
			s.writeError(w, r, fmt.Errorf("%w: the connection to the leader failed mid-request (%v); retry with the same %s to be safe", errOutcomeUnknown, st.lastErr, HeaderRequestID))
		case st.lastErr == nil:
			s.writeError(w, r, fmt.Errorf("%w: the leader kept answering %d (leadership moving) for %s; nothing was applied, retry shortly", errNoLeader, st.lastStatus, s.cfg.ForwardTimeout))
		default:
			s.writeError(w, r, fmt.Errorf("%w: the leader could not be reached (%v); nothing was applied", errNoLeader, st.lastErr))
		}
		return
	}
	defer resp.Body.Close()
	for k, vs := range resp.Header {
		if !hopHeaders[k] {
			w.Header()[k] = vs
		}
	}
	w.WriteHeader(resp.StatusCode)
	_, _ = io.Copy(w, resp.Body)
}

// PeerAddrFromTemplate turns a template such as
// "{id}.store-peers.{namespace}.svc:8080" into a function from node identity
// to host:port. {ordinal} is the number at the end of the identity (the
// StatefulSet ordinal), which lets a local cluster map store-1 to 127.0.0.1.
func PeerAddrFromTemplate(tmpl, namespace string) (func(id string) (string, error), error) {
	if !strings.Contains(tmpl, "{id}") && !strings.Contains(tmpl, "{ordinal}") {
		return nil, fmt.Errorf("peer address template %q uses neither {id} nor {ordinal}", tmpl)
	}
	return func(id string) (string, error) {
		out := strings.ReplaceAll(tmpl, "{id}", id)
		out = strings.ReplaceAll(out, "{namespace}", namespace)
		if strings.Contains(out, "{ordinal}") {
			i := strings.LastIndexFunc(id, func(c rune) bool { return c < '0' || c > '9' })
			if i == len(id)-1 {
				return "", fmt.Errorf("identity %q has no trailing ordinal for {ordinal}", id)
			}
			out = strings.ReplaceAll(out, "{ordinal}", id[i+1:])
		}
		if _, _, err := net.SplitHostPort(out); err != nil {
			return "", fmt.Errorf("peer address %q for %s: %w", out, id, err)
		}
		return out, nil
	}, nil
}

// Peer notification endpoints (behind the peer token).
const (
	// LeaseReleasedPath: a leader that has just released the Lease on
	// shutdown tells its peers to campaign at once.
	LeaseReleasedPath = "/internal/v1/lease-released"
	// LeaderPath: a node that has just become leader tells its peers, so
	// they forward to it at once instead of after their next Lease poll.
	LeaderPath = "/internal/v1/leader"
	// PeerStreamPath upgrades to the connection over which a node sends
	// the requests it forwards to this one (internal/peerhttp).
	PeerStreamPath = "/internal/v1/peer-stream"
)

func (s *Server) leaseReleased(w http.ResponseWriter, _ *http.Request) {
	s.cfg.Leadership.Nudge()
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) leaderHint(w http.ResponseWriter, r *http.Request) {
	var hint struct {
		Leader string `json:"leader"`
		Epoch  uint64 `json:"epoch"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 4096)).Decode(&hint); err != nil || hint.Leader == "" || hint.Epoch == 0 {
		s.writeError(w, r, fmt.Errorf("%w: body must be {\"leader\":\"<id>\",\"epoch\":<n>}", errInvalidJSON))
		return
	}
	s.cfg.Leadership.HintLeader(hint.Leader, hint.Epoch)
	w.WriteHeader(http.StatusNoContent)
}

// NotifyLeaseReleased tells every peer that self has released the Lease.
// Best effort: a peer that misses it still polls the Lease.
func NotifyLeaseReleased(ctx context.Context, self string, peers []string, peerAddr func(string) (string, error), token string) {
	notifyPeers(ctx, self, peers, peerAddr, token, LeaseReleasedPath, nil)
}

// NotifyLeader tells every peer that self now leads term epoch. Best
// effort, like NotifyLeaseReleased.
func NotifyLeader(ctx context.Context, self string, epoch uint64, peers []string, peerAddr func(string) (string, error), token string) {
	body := []byte(fmt.Sprintf(`{"leader":%q,"epoch":%d}`, self, epoch))
	notifyPeers(ctx, self, peers, peerAddr, token, LeaderPath, body)
}

func notifyPeers(ctx context.Context, self string, peers []string, peerAddr func(string) (string, error), token, path string, body []byte) {
	client := &http.Client{Timeout: time.Second}
	var wg sync.WaitGroup
	for _, id := range peers {
		if id == self {
			continue
		}
		addr, err := peerAddr(id)
		if err != nil {
			continue
		}
		wg.Go(func() {
			req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr+path, bytes.NewReader(body))
			if err != nil {
				return
			}
			req.Header.Set(HeaderPeerToken, token)
			req.Header.Set("Content-Type", "application/json")
			if resp, err := client.Do(req); err == nil {
				resp.Body.Close()
			}
		})
	}
	wg.Wait()
}
