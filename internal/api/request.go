package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"mime"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/statefulkv/store/internal/node"
	"github.com/statefulkv/store/internal/replication"
	"github.com/statefulkv/store/internal/storage"
)

// MaxKeyBytes is the longest key accepted, in bytes of UTF-8.
const MaxKeyBytes = 512

const kvPrefix = "/v1/kv/"

// keyFromPath takes the key from the decoded URL path, so "a%2Fb" and "a/b"
// name the same key.
func keyFromPath(r *http.Request) (string, error) {
	key := strings.TrimPrefix(r.URL.Path, kvPrefix)
	return key, validateKey(key, "key")
}

// validateKey enforces the README's key rules: UTF-8, 1–512 bytes, no control
// characters. Slashes are ordinary characters.
func validateKey(key, what string) error {
	switch {
	case key == "":
		return fmt.Errorf("%w: %s is empty; use /v1/kv/<key> with 1-%d bytes", errInvalidKey, what, MaxKeyBytes)
	case len(key) > MaxKeyBytes:
		return fmt.Errorf("%w: %s is %d bytes, the limit is %d", errInvalidKey, what, len(key), MaxKeyBytes)
	case !utf8.ValidString(key):
		return fmt.Errorf("%w: %s is not valid UTF-8", errInvalidKey, what)
	}
	for i, c := range key {
		if unicode.IsControl(c) {
			return fmt.Errorf("%w: %s has control character %U at byte %d", errInvalidKey, what, c, i)
		}
	}
	return nil
}

// checkContentHeaders refuses a body whose bytes the client has told us
// are not plain UTF-8 JSON. Content-Type may be absent, a JSON type, or the
// form type that a bare `curl -d` sends, because that is what people type.
//
// A charset other than utf-8 is refused (415) rather than ignored: JSON is
// UTF-8 (RFC 8259 §8.1), and a client that says latin1 means its bytes are
// latin1; if they happened to be valid UTF-8 too ("Ã©" is C3 A9) we would
// store different text than the client meant, silently. Content-Type is a
// single-valued field, so two of them are refused as well instead of
// letting one win; and this server decodes no content coding, so an
// encoded body is refused for what it is, not as invalid JSON.
func checkContentHeaders(r *http.Request) error {
	switch cts := r.Header.Values("Content-Type"); {
	case len(cts) > 1:
		return fmt.Errorf("%w: %d Content-Type headers (%q); send exactly one, 'Content-Type: application/json'", errUnsupportedMedia, len(cts), cts)
	case len(cts) == 1 && cts[0] != "":
		if err := checkContentType(cts[0]); err != nil {
			return err
		}
	}
	for _, line := range r.Header.Values("Content-Encoding") {
		for c := range strings.SplitSeq(line, ",") {
			if c = strings.TrimSpace(c); c != "" && !strings.EqualFold(c, "identity") {
				return fmt.Errorf("%w: Content-Encoding %q; this server decodes no content coding, send the body unencoded (no Content-Encoding header)", errUnsupportedMedia, line)
			}
		}
	}
	return nil
}

func checkContentType(ct string) error {
	mt, params, err := mime.ParseMediaType(ct)
	if err != nil {
		return fmt.Errorf("%w: Content-Type %q cannot be parsed (%w); send the header 'Content-Type: application/json'", errUnsupportedMedia, ct, err)
	}
	switch {
	case mt == "application/json", mt == "text/json",
		strings.HasPrefix(mt, "application/") && strings.HasSuffix(mt, "+json"),
		mt == "application/x-www-form-urlencoded":
	default:
		return fmt.Errorf("%w: Content-Type %q; send the header 'Content-Type: application/json'", errUnsupportedMedia, ct)
	}
	if cs, ok := params["charset"]; ok && !strings.EqualFold(cs, "utf-8") {
		return fmt.Errorf("%w: Content-Type %q: charset %q; JSON is UTF-8 (RFC 8259 §8.1), send UTF-8 with charset=utf-8 or no charset", errUnsupportedMedia, ct, cs)
	}
	return nil
}

// readValue reads and validates the request body as one JSON value of at
// most max bytes of UTF-8. The bytes are kept exactly as sent.
func readValue(w http.ResponseWriter, r *http.Request, max int64) ([]byte, error) {
	if err := checkContentHeaders(r); err != nil {
		return nil, err
	}
	if r.ContentLength > max {
		return nil, fmt.Errorf("%w: body is %d bytes, the limit is %d (--max-value-bytes)", errValueTooLarge, r.ContentLength, max)
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, max))
	if err != nil {
		return nil, bodyReadError(r, len(body), max, err)
	}
	if len(body) == 0 {
		return nil, fmt.Errorf(`%w: body is empty; send one JSON value, e.g. {"a":1}, "text", 42 or null`, errInvalidJSON)
	}
	if i := invalidUTF8(body); i >= 0 {
		return nil, fmt.Errorf("%w: body is not valid UTF-8 at byte %d; JSON text must be UTF-8 (RFC 8259 §8.1)", errInvalidJSON, i)
	}
	if !json.Valid(body) {
		return nil, fmt.Errorf("%w: %s", errInvalidJSON, describeJSONError(body))
	}
	return body, nil
}

// bodyReadError says why the body could not be read. Every cause but the
// size limit is the client's or its network's: the connection's read
// deadline (the http.Server's ReadTimeout) passed, the client hung up
// before sending what it announced, or the chunked framing broke. None is a
// server fault, so none is a 500.
func bodyReadError(r *http.Request, got int, max int64, err error) error {
	if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
		return fmt.Errorf("%w: body exceeds the limit of %d bytes (--max-value-bytes)", errValueTooLarge, max)
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("%w: the body did not arrive within the server's read timeout (%d bytes received): %w", errRequestTimeout, got, err)
	}
	if errors.Is(err, io.ErrUnexpectedEOF) && r.ContentLength > 0 {
		return fmt.Errorf("%w: body ended after %d of the %d bytes its Content-Length announced", errIncompleteBody, got, r.ContentLength)
	}
	return fmt.Errorf("%w: body could not be read in full (%d bytes received): %w", errIncompleteBody, got, err)
}

// invalidUTF8 is the offset of the first byte that is not UTF-8, or -1.
// json.Valid alone lets such bytes through inside strings.
func invalidUTF8(b []byte) int {
	for i := 0; i < len(b); {
		if b[i] < utf8.RuneSelf {
			i++
			continue
		}
		c, size := utf8.DecodeRune(b[i:])
		if c == utf8.RuneError && size == 1 {
			return i
		}
		i += size
	}
	return -1
}

// describeJSONError says where the body stops being JSON.
func describeJSONError(body []byte) string {
	var v any
	err := json.Unmarshal(body, &v)
	if se, ok := errors.AsType[*json.SyntaxError](err); ok {
		return fmt.Sprintf("body is not a JSON value: %v (at byte %d)", se, se.Offset)
	}
	if err != nil {
		return "body is not a JSON value: " + err.Error()
	}
	return "body is not a single JSON value"
}

// query is a request's query string, each parameter given at most once.
type query map[string]string

// parseQuery decodes r's query strictly, so that nothing a client sends is
// silently dropped: a query that cannot be decoded (a bad % escape, a raw
// ';', which Go no longer treats as a separator), a parameter given twice
// (which one would win?) and a parameter the route does not take (a typo
// such as consistancy=stale would otherwise give a strong read) are each an
// error naming the problem. It works on RawQuery because URL.Query drops
// what it cannot decode.
func parseQuery(r *http.Request, known ...string) (query, error) {
	q := query{}
	if r.URL.RawQuery == "" {
		return q, nil
	}
	vals, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return nil, fmt.Errorf("%w: the query string cannot be decoded: %w", errInvalidParameter, err)
	}
	for _, name := range slices.Sorted(maps.Keys(vals)) {
		switch vs := vals[name]; {
		case !slices.Contains(known, name):
			takes := "takes no parameters"
			if len(known) > 0 {
				takes = "takes only " + strings.Join(known, ", ")
			}
			return nil, fmt.Errorf("%w: unknown parameter %q; %s %s", errInvalidParameter, name, routeOf(r), takes)
		case len(vs) > 1:
			return nil, fmt.Errorf("%w: %s is given %d times (%q); send it once", errInvalidParameter, name, len(vs), vs)
		default:
			q[name] = vs[0]
		}
	}
	return q, nil
}

// routeOf names r's route for messages, e.g. "GET /v1/kv/{key}". A HEAD
// is named as the GET it mirrors, so that its headers, Content-Length
// included, are exactly the GET's.
func routeOf(r *http.Request) string {
	m := r.Method
	if m == http.MethodHead {
		m = http.MethodGet
	}
	if strings.HasPrefix(r.URL.Path, kvPrefix) {
		return m + " /v1/kv/{key}"
	}
	return m + " " + r.URL.Path
}

// listParams parses GET /v1/kv's query.
func listParams(q query) (node.ListOptions, error) {
	opts := node.ListOptions{Prefix: q["prefix"], After: q["after"], Limit: defaultListLimit}
	for _, name := range []string{"prefix", "after"} {
		if v := q[name]; len(v) > MaxKeyBytes || !utf8.ValidString(v) {
			return opts, fmt.Errorf("%w: %s must be valid UTF-8 of at most %d bytes", errInvalidParameter, name, MaxKeyBytes)
		}
	}
	if s := q["limit"]; s != "" {
		n, convErr := strconv.Atoi(s)
		if convErr != nil || n < 1 || n > maxListLimit {
			return opts, fmt.Errorf("%w: limit must be an integer from 1 to %d, got %q", errInvalidParameter, maxListLimit, s)
		}
		opts.Limit = n
	}
	return opts, nil
}

const (
	defaultListLimit = 100
	maxListLimit     = 1000
)

// requestID reads X-Request-Id: at most one header line, of at most the
// storage limit in bytes of printable ASCII without spaces (0x21-0x7e), as
// the README says. Several lines are refused rather than one winning: the
// id decides whether a retry is applied again.
func requestID(r *http.Request) (string, error) {
	ids := r.Header.Values(HeaderRequestID)
	switch len(ids) {
	case 0:
		return "", nil
	case 1:
		return ids[0], validateRequestID(ids[0])
	default:
		return "", fmt.Errorf("%w: %d %s headers; send one", errInvalidRequestID, len(ids), HeaderRequestID)
	}
}

func validateRequestID(id string) error {
	if len(id) > storage.MaxRequestIDBytes {
		return fmt.Errorf("%w: %s is %d bytes, the limit is %d", errInvalidRequestID, HeaderRequestID, len(id), storage.MaxRequestIDBytes)
	}
	for i := 0; i < len(id); i++ {
		if id[i] < 0x21 || id[i] > 0x7e {
			return fmt.Errorf("%w: %s has byte 0x%02x at %d; it must be printable ASCII without spaces (0x21-0x7e)", errInvalidRequestID, HeaderRequestID, id[i], i)
		}
	}
	return nil
}

// parseWrite parses what a PUT (but its body) or a DELETE says besides the
// value: key, query, preconditions, request id and ack level. Everything is
// checked here, so a follower refuses bad input before forwarding.
func (s *Server) parseWrite(r *http.Request, del bool) (node.Write, precondition, node.Origin, error) {
	var (
		w   = node.Write{Delete: del}
		pre precondition
		o   node.Origin
		err error
	)
	if w.Key, err = keyFromPath(r); err != nil {
		return w, pre, o, err
	}
	q, err := parseQuery(r, "ack", "redirect")
	if err != nil {
		return w, pre, o, err
	}
	if pre, err = parsePreconditions(r.Header); err != nil {
		return w, pre, o, err
	}
	if del && pre.ifAbsent {
		return w, pre, o, fmt.Errorf("%w: If-None-Match: * cannot apply to DELETE", errInvalidPrecondition)
	}
	// A client's own id makes its retries idempotent. A request without one
	// gets an id only if it is forwarded, where the node's retries need it;
	// one served here directly has nobody to retry it, so it costs no id
	// record.
	if w.RequestID, err = requestID(r); err != nil {
		return w, pre, o, err
	}
	if w.Ack, err = parseAck(q); err != nil {
		return w, pre, o, err
	}
	o, err = origin(r, q)
	return w, pre, o, err
}

func parseAck(q query) (replication.AckLevel, error) {
	ack, err := replication.ParseAck(q["ack"])
	if err != nil {
		return ack, fmt.Errorf("%w: %w", errInvalidParameter, err)
	}
	return ack, nil
}

// parseReadOptions reads a GET's consistency=… and max_stale=….
func parseReadOptions(q query) (node.ReadOptions, error) {
	var o node.ReadOptions
	switch c := q["consistency"]; c {
	case "", "strong":
	case "stale":
		o.Stale = true
	default:
		return o, fmt.Errorf("%w: consistency=%q: use strong (the default) or stale", errInvalidParameter, c)
	}
	if s := q["max_stale"]; s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 {
			return o, fmt.Errorf("%w: max_stale=%q: use a positive duration such as 2s or 500ms", errInvalidParameter, s)
		}
		if !o.Stale {
			return o, fmt.Errorf("%w: max_stale applies only with consistency=stale", errInvalidParameter)
		}
		o.MaxStale = d
	}
	return o, nil
}

// origin reads where a request came from: ?redirect=true, and the peer
// headers a node of an older version forwards with (peerAuth has checked
// their token).
func origin(r *http.Request, q query) (node.Origin, error) {
	o := node.Origin{ForwardedBy: r.Header.Get(HeaderForwarded)}
	if s := q["redirect"]; s != "" {
		var err error
		if o.Redirect, err = strconv.ParseBool(s); err != nil {
			return o, fmt.Errorf("%w: redirect=%q: use true or false", errInvalidParameter, s)
		}
	}
	if seen, err := strconv.ParseUint(r.Header.Get(HeaderSeenEpoch), 10, 64); err == nil {
		o.SeenEpoch = seen
	}
	return o, nil
}
