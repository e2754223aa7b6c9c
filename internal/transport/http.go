package transport

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/hashicorp/go-retryablehttp"
	"k8s.io/apimachinery/pkg/util/wait"
)

// TokenHeader carries the cluster token on every peer request. It is
// defined here once; CheckToken is the one check of it.
const TokenHeader = "X-Store-Peer-Token"

// Paths of the typed calls. They sit under /internal/, which the API
// refuses without the cluster token.
const (
	WritePath         = "/internal/v1/forward/write"
	ReadPath          = "/internal/v1/forward/read"
	ListPath          = "/internal/v1/forward/list"
	LeaderPath        = "/internal/v1/leader"
	LeaseReleasedPath = "/internal/v1/lease-released"
)

// Paths lists every path NewHandler serves (all POST).
var Paths = []string{WritePath, ReadPath, ListPath, LeaderPath, LeaseReleasedPath}

const contentType = "application/x-statefulkv-rpc"

// CheckToken reports, in constant time, whether r carries token.
func CheckToken(r *http.Request, token string) bool {
	return subtle.ConstantTimeCompare([]byte(r.Header.Get(TokenHeader)), []byte(token)) == 1
}

// HTTPConfig configures an HTTP client.
type HTTPConfig struct {
	// Addr maps a node identity to host:port. Required.
	Addr func(id string) (string, error)
	// Token is the cluster token. Required.
	Token string
	// RoundTripper carries the requests; main passes peerhttp's
	// multiplexed connections. Default: a plain keep-alive transport that
	// never uses a proxy.
	RoundTripper http.RoundTripper
	// MaxReplyBytes bounds one reply body. Default 1 GiB.
	MaxReplyBytes int64
}

// HTTP is the real transport's client: each call is one POST of a binary
// body to the peer's NewHandler.
//
// A call that fails before it was sent (the dial failed, or the peer's
// connection was announced closed) is tried again at once, twice at most,
// with a short jittered pause: the next dial usually succeeds when a
// multiplexed connection had just been dropped. Everything else is left to
// the caller, which knows whether a retry is safe and where it should go.
type HTTP struct {
	cfg    HTTPConfig
	client *retryablehttp.Client
}

// NewHTTP validates cfg and returns the client.
func NewHTTP(cfg HTTPConfig) (*HTTP, error) {
	if cfg.Addr == nil || cfg.Token == "" {
		return nil, errors.New("transport: HTTPConfig needs Addr and Token")
	}
	if cfg.RoundTripper == nil {
		cfg.RoundTripper = &http.Transport{
			Proxy:               nil, // peers are never reached through a proxy
			DialContext:         (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConnsPerHost: 64,
			IdleConnTimeout:     90 * time.Second,
		}
	}
	if cfg.MaxReplyBytes <= 0 {
		cfg.MaxReplyBytes = 1 << 30
	}
	c := retryablehttp.NewClient()
	c.HTTPClient = &http.Client{Transport: cfg.RoundTripper}
	c.Logger = nil
	c.RetryMax = 2
	c.CheckRetry = func(ctx context.Context, _ *http.Response, err error) (bool, error) {
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		return err != nil && isDialError(err), nil
	}
	c.Backoff = func(lo, _ time.Duration, _ int, _ *http.Response) time.Duration {
		return wait.Jitter(lo, 1)
	}
	c.RetryWaitMin = 10 * time.Millisecond
	c.ErrorHandler = retryablehttp.PassthroughErrorHandler
	return &HTTP{cfg: cfg, client: c}, nil
}

// RoundTripper is what the calls travel over.
func (c *HTTP) RoundTripper() http.RoundTripper { return c.cfg.RoundTripper }

// Write forwards a write to the leader to.
func (c *HTTP) Write(ctx context.Context, to string, w Write) (WriteReply, error) {
	var r WriteReply
	return r, c.call(ctx, to, WritePath, &w, &r)
}

// Read asks to to serve a read.
func (c *HTTP) Read(ctx context.Context, to string, rd Read) (ReadReply, error) {
	var r ReadReply
	return r, c.call(ctx, to, ReadPath, &rd, &r)
}

// List asks the leader to for a page.
func (c *HTTP) List(ctx context.Context, to string, l List) (ListReply, error) {
	var r ListReply
	return r, c.call(ctx, to, ListPath, &l, &r)
}

// NotifyLeader tells to who leads now.
func (c *HTTP) NotifyLeader(ctx context.Context, to string, n LeaderNotice) error {
	return c.call(ctx, to, LeaderPath, &n, &empty{})
}

// NotifyLeaseReleased tells to that the Lease was released.
func (c *HTTP) NotifyLeaseReleased(ctx context.Context, to string, n LeaseReleased) error {
	return c.call(ctx, to, LeaseReleasedPath, &n, &empty{})
}

// call POSTs req to the peer and decodes a 200 into reply. A refusal comes
// back as *Error; a failure before sending wraps ErrNotSent; any other
// error means the peer may have served the call.
func (c *HTTP) call(ctx context.Context, to, path string, req, reply message) error {
	addr, err := c.cfg.Addr(to)
	if err != nil {
		return notSent(fmt.Errorf("address of %s: %w", to, err))
	}
	hreq, err := retryablehttp.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr+path, marshal(req))
	if err != nil {
		return notSent(err)
	}
	hreq.Header.Set("Content-Type", contentType)
	hreq.Header.Set(TokenHeader, c.cfg.Token)
	resp, err := c.client.Do(hreq)
	if err != nil {
		if isDialError(err) {
			return notSent(fmt.Errorf("%s: %w", to, err))
		}
		return fmt.Errorf("%s: %w", to, err)
	}
	defer resp.Body.Close()
	body, err := readBody(resp.Body, resp.ContentLength, c.cfg.MaxReplyBytes)
	if err != nil {
		return fmt.Errorf("%s: read reply: %w", to, err)
	}
	if resp.StatusCode != http.StatusOK {
		return decodeError(to, resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}
	if err := unmarshal(body, reply); err != nil {
		return fmt.Errorf("%s: %w", to, err)
	}
	return nil
}

// wholeBody is implemented by a body that is already whole in memory
// (internal/peerhttp's, which holds the frame it arrived in). Bytes returns
// it without copying; the caller owns it from then on.
type wholeBody interface {
	Bytes() []byte
}

// errBodyTooLarge: a body passed readBody's limit.
var errBodyTooLarge = errors.New("body too large")

// readBody reads a body of n bytes (-1: unknown) and at most limit into one
// buffer of its size: a body the carrier already holds whole is taken as it
// is, and one of a known length ends in a buffer of exactly that length. A
// call or reply may carry a value of up to --max-value-bytes; the decoded
// message keeps the buffer (decoder.bytes), so slack left by growing it by
// doubling would stay with the value (in the leader's replication queues,
// say). The buffer grows with the bytes that arrive, never ahead of them by
// more than what has arrived, so a peer that declares a huge body and sends
// little costs what it sent (as peerhttp's frames).
func readBody(body io.Reader, n, limit int64) ([]byte, error) {
	if b, ok := body.(wholeBody); ok {
		p := b.Bytes()
		if int64(len(p)) > limit {
			return nil, fmt.Errorf("%w: %d bytes, the limit is %d", errBodyTooLarge, len(p), limit)
		}
		return p, nil
	}
	if n > limit {
		return nil, fmt.Errorf("%w: %d bytes, the limit is %d", errBodyTooLarge, n, limit)
	}
	if n < 0 {
		p, err := io.ReadAll(io.LimitReader(body, limit+1))
		if err != nil {
			return nil, err
		}
		if int64(len(p)) > limit {
			return nil, fmt.Errorf("%w: more than %d bytes", errBodyTooLarge, limit)
		}
		return p, nil
	}
	// Each step doubles what has arrived, and the steps are chosen back
	// from n (n/2^k, ..., n/2, n), so the last is exactly n and together
	// they allocate at most 2n (peerhttp's frames grow the same way).
	shift := 0
	for n>>shift > 64<<10 {
		shift++
	}
	p := make([]byte, 0, ceilShift(n, shift))
	for int64(len(p)) < n {
		if len(p) == cap(p) {
			shift--
			q := make([]byte, len(p), ceilShift(n, shift))
			p = q[:copy(q, p)]
		}
		m, err := io.ReadFull(body, p[len(p):cap(p)])
		p = p[:len(p)+m]
		if err != nil {
			return nil, err
		}
	}
	return p, nil
}

// ceilShift is n / 2^shift, rounded up.
func ceilShift(n int64, shift int) int64 { return (n + 1<<shift - 1) >> shift }

// decodeError reads a refusal. A body that is not ours (a JSON error from
// the peer's HTTP layer or its connection) keeps the status and, where it
// can be read, the code; a 404 means the peer does not know the call, which
// it therefore did not apply.
func decodeError(peer string, status int, ct string, body []byte) error {
	e := &Error{}
	if ct == contentType && unmarshal(body, e) == nil && e.Status == status {
		return e
	}
	if status == http.StatusNotFound {
		// The peer does not serve this call at all (a node of another
		// version): nothing was applied there.
		return &Error{Status: http.StatusServiceUnavailable, Code: "peer_unsupported", Message: fmt.Sprintf("%s does not serve this call (a node of another version?)", peer)}
	}
	var j struct {
		Error struct{ Code, Message string } `json:"error"`
	}
	e = &Error{Status: status, Code: "peer_error", Message: fmt.Sprintf("%s answered %d", peer, status)}
	if json.Unmarshal(body, &j) == nil && j.Error.Code != "" {
		e.Code, e.Message = j.Error.Code, fmt.Sprintf("%s answered %d: %s", peer, status, j.Error.Message)
	}
	return e
}

// isDialError reports whether err happened before the request could be
// sent: then the peer never saw it (peerhttp promises the same of its
// connection errors).
func isDialError(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// Service is what a node serves to its peers. Each method's error is
// turned into the Error the caller receives by the handler's ErrorFunc.
type Service interface {
	// Write applies a forwarded write if this node leads; it never
	// forwards it again.
	Write(ctx context.Context, w Write) (WriteReply, error)
	// Read serves a read from this node's own data.
	Read(ctx context.Context, r Read) (ReadReply, error)
	// List serves a page if this node leads.
	List(ctx context.Context, l List) (ListReply, error)
	// Leader and LeaseReleased take notices; best effort on both sides.
	Leader(ctx context.Context, n LeaderNotice) error
	LeaseReleased(ctx context.Context, n LeaseReleased) error
}

// Services is what a node serves to its peers: its request logic, its
// replication, and how their errors travel back. Either service may be nil;
// its calls are then not served.
type Services struct {
	Node    Service
	Replica ReplicaService
	// ErrorOf turns a service's error into the Error the caller receives.
	// In InMem, nil passes errors through unchanged.
	ErrorOf ErrorFunc
}

// NewHandler serves the calls of Paths (s.Node) and ReplicaPaths
// (s.Replica). It expects to be mounted behind CheckToken. maxBody bounds
// a request body.
func NewHandler(s Services, maxBody int64) http.Handler {
	mux := http.NewServeMux()
	// Each request decodes into its own message, which the closure passed
	// to serve reads after serve has filled it in.
	route := func(path string, h func(w http.ResponseWriter, r *http.Request)) { mux.HandleFunc("POST "+path, h) }
	errOf := s.ErrorOf
	if svc := s.Node; svc != nil {
		route(WritePath, func(w http.ResponseWriter, r *http.Request) {
			var m Write
			serve(w, r, maxBody, errOf, &m, func(ctx context.Context) (message, error) { rep, err := svc.Write(ctx, m); return &rep, err })
		})
		route(ReadPath, func(w http.ResponseWriter, r *http.Request) {
			var m Read
			serve(w, r, maxBody, errOf, &m, func(ctx context.Context) (message, error) { rep, err := svc.Read(ctx, m); return &rep, err })
		})
		route(ListPath, func(w http.ResponseWriter, r *http.Request) {
			var m List
			serve(w, r, maxBody, errOf, &m, func(ctx context.Context) (message, error) { rep, err := svc.List(ctx, m); return &rep, err })
		})
		route(LeaderPath, func(w http.ResponseWriter, r *http.Request) {
			var m LeaderNotice
			serve(w, r, maxBody, errOf, &m, func(ctx context.Context) (message, error) { return &empty{}, svc.Leader(ctx, m) })
		})
		route(LeaseReleasedPath, func(w http.ResponseWriter, r *http.Request) {
			var m LeaseReleased
			serve(w, r, maxBody, errOf, &m, func(ctx context.Context) (message, error) { return &empty{}, svc.LeaseReleased(ctx, m) })
		})
	}
	if svc := s.Replica; svc != nil {
		route(ReplicatePath, func(w http.ResponseWriter, r *http.Request) {
			var m Batch
			serve(w, r, maxBody, errOf, &m, func(ctx context.Context) (message, error) { rep, err := svc.Replicate(ctx, m); return &rep, err })
		})
		route(DigestsPath, func(w http.ResponseWriter, r *http.Request) {
			var m Sync
			serve(w, r, maxBody, errOf, &m, func(ctx context.Context) (message, error) { rep, err := svc.Digests(ctx, m); return &rep, err })
		})
		route(EntriesPath, func(w http.ResponseWriter, r *http.Request) {
			var m Sync
			serve(w, r, maxBody, errOf, &m, func(ctx context.Context) (message, error) { rep, err := svc.Entries(ctx, m); return &rep, err })
		})
		route(ReadIndexPath, func(w http.ResponseWriter, r *http.Request) {
			var m ReadIndex
			serve(w, r, maxBody, errOf, &m, func(ctx context.Context) (message, error) { rep, err := svc.ReadIndex(ctx, m); return &rep, err })
		})
		route(ForgetPath, func(w http.ResponseWriter, r *http.Request) {
			var m Batch
			serve(w, r, maxBody, errOf, &m, func(ctx context.Context) (message, error) { rep, err := svc.Forget(ctx, m); return &rep, err })
		})
	}
	return mux
}

// serve decodes the body into req, runs call and writes its reply or error.
func serve(w http.ResponseWriter, r *http.Request, maxBody int64, errOf ErrorFunc, req message, call func(context.Context) (message, error)) {
	body, err := readBody(r.Body, r.ContentLength, maxBody)
	if err == nil {
		err = unmarshal(body, req)
	}
	if errors.Is(err, errBodyTooLarge) {
		writeError(w, &Error{Status: http.StatusRequestEntityTooLarge, Code: CodeTooLarge, Message: fmt.Sprintf("%s: the call exceeds %d bytes", r.URL.Path, maxBody)})
		return
	}
	if err != nil {
		writeError(w, &Error{Status: http.StatusBadRequest, Code: "invalid_rpc", Message: fmt.Sprintf("%s: %v", r.URL.Path, err)})
		return
	}
	reply, err := call(r.Context())
	if err != nil {
		writeError(w, errOf(err))
		return
	}
	// The reply goes out in segments, its large values straight from
	// where the service holds them (a read's value, copied once out of
	// bbolt), not copied again into one encoded buffer. Content-Length lets
	// a buffering writer (peerhttp's) size its buffer once.
	segs, n := marshalSegments(reply)
	w.Header().Set("Content-Type", contentType)
	w.Header().Set("Content-Length", strconv.Itoa(n))
	w.WriteHeader(http.StatusOK)
	for _, s := range segs {
		if _, err := w.Write(s); err != nil {
			return // the caller is gone
		}
	}
}

// CodeTooLarge is the code of a call refused for its size (413): its
// sender must send it smaller, never again unchanged.
const CodeTooLarge = "rpc_too_large"

func writeError(w http.ResponseWriter, e *Error) {
	if e.Status < 400 || e.Status > 599 {
		e.Status = http.StatusInternalServerError
	}
	w.Header().Set("Content-Type", contentType)
	w.WriteHeader(e.Status)
	_, _ = w.Write(marshal(e))
}
