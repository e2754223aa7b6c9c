package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
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

// checkContentType accepts JSON media types, no header at all, and the form
// type that a bare `curl -d` sends, because that is what people type.
func checkContentType(r *http.Request) error {
	ct := r.Header.Get("Content-Type")
	if ct == "" {
		return nil
	}
	mt, _, err := mime.ParseMediaType(ct)
	if err == nil {
		switch {
		case mt == "application/json", mt == "text/json",
			strings.HasPrefix(mt, "application/") && strings.HasSuffix(mt, "+json"),
			mt == "application/x-www-form-urlencoded":
			return nil
		}
	}
	return fmt.Errorf("%w: Content-Type %q; send the header 'Content-Type: application/json'", errUnsupportedMedia, ct)
}

// readValue reads and validates the request body as one JSON value of at
// most max bytes. The bytes are kept exactly as sent.
func readValue(w http.ResponseWriter, r *http.Request, max int64) ([]byte, error) {
	if err := checkContentType(r); err != nil {
		return nil, err
	}
	if r.ContentLength > max {
		return nil, fmt.Errorf("%w: body is %d bytes, the limit is %d (--max-value-bytes)", errValueTooLarge, r.ContentLength, max)
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, max))
	if err != nil {
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			return nil, fmt.Errorf("%w: body exceeds the limit of %d bytes (--max-value-bytes)", errValueTooLarge, max)
		}
		return nil, fmt.Errorf("read body: %w", err)
	}
	if len(body) == 0 {
		return nil, fmt.Errorf(`%w: body is empty; send one JSON value, e.g. {"a":1}, "text", 42 or null`, errInvalidJSON)
	}
	if !json.Valid(body) {
		return nil, fmt.Errorf("%w: %s", errInvalidJSON, describeJSONError(body))
	}
	return body, nil
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

// conditions parses If-Match / If-None-Match into the write.
func conditions(r *http.Request, m *node.Write) error {
	ifMatch := strings.TrimSpace(r.Header.Get("If-Match"))
	ifNone := strings.TrimSpace(r.Header.Get("If-None-Match"))
	if ifMatch != "" && ifNone != "" {
		return fmt.Errorf("%w: send If-Match or If-None-Match, not both", errInvalidPrecondition)
	}
	if ifNone != "" {
		if ifNone != "*" {
			return fmt.Errorf("%w: If-None-Match supports only *, got %q", errInvalidPrecondition, ifNone)
		}
		m.IfAbsent = true
	}
	if ifMatch == "*" {
		m.IfExists = true
	} else if ifMatch != "" {
		v, err := parseETag(ifMatch)
		if err != nil {
			return fmt.Errorf("%w: If-Match: %w", errInvalidPrecondition, err)
		}
		m.IfMatch = v
	}
	return nil
}

// parseETag accepts `"1.5"` (the form we send) and, leniently, bare 1.5.
func parseETag(s string) (storage.Version, error) {
	if strings.HasPrefix(s, "W/") {
		return storage.Version{}, fmt.Errorf("weak ETag %s cannot be used for a compare-and-set", s)
	}
	if strings.Contains(s, ",") {
		return storage.Version{}, fmt.Errorf("%q lists several versions; send exactly one", s)
	}
	if unq, err := strconv.Unquote(s); err == nil && strings.HasPrefix(s, `"`) {
		s = unq
	}
	return storage.ParseVersion(s)
}

func etag(v storage.Version) string { return `"` + v.String() + `"` }

// listParams parses GET /v1/kv's query.
func listParams(r *http.Request) (node.ListOptions, error) {
	q := r.URL.Query()
	opts := node.ListOptions{Prefix: q.Get("prefix"), After: q.Get("after"), Limit: defaultListLimit}
	for name, v := range map[string]string{"prefix": opts.Prefix, "after": opts.After} {
		if len(v) > MaxKeyBytes || !utf8.ValidString(v) {
			return opts, fmt.Errorf("%w: %s must be valid UTF-8 of at most %d bytes", errInvalidParameter, name, MaxKeyBytes)
		}
	}
	if s := q.Get("limit"); s != "" {
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

// validateRequestID accepts X-Request-Id values of printable ASCII up to the
// storage limit.
func validateRequestID(id string) error {
	if len(id) > storage.MaxRequestIDBytes {
		return fmt.Errorf("%w: %s is %d bytes, the limit is %d", errInvalidRequestID, HeaderRequestID, len(id), storage.MaxRequestIDBytes)
	}
	for i := 0; i < len(id); i++ {
		if id[i] < 0x21 || id[i] > 0x7e {
			return fmt.Errorf("%w: %s must be printable ASCII without spaces", errInvalidRequestID, HeaderRequestID)
		}
	}
	return nil
}

// parseWrite parses what a PUT (but its body) or a DELETE says besides the
// value: key, preconditions, request id and ack level. Everything is
// checked here, so a follower refuses bad input before forwarding.
func (s *Server) parseWrite(r *http.Request, del bool) (node.Write, error) {
	key, err := keyFromPath(r)
	if err != nil {
		return node.Write{}, err
	}
	w := node.Write{Key: key, Delete: del, RequestID: r.Header.Get(HeaderRequestID)}
	if err := conditions(r, &w); err != nil {
		return w, err
	}
	if del && w.IfAbsent {
		return w, fmt.Errorf("%w: If-None-Match: * cannot apply to DELETE", errInvalidPrecondition)
	}
	// A client's own id makes its retries idempotent. A request without one
	// gets an id only if it is forwarded, where the node's retries need it;
	// one served here directly has nobody to retry it, so it costs no id
	// record.
	if err := validateRequestID(w.RequestID); err != nil {
		return w, err
	}
	if w.Ack, err = parseAck(r); err != nil {
		return w, err
	}
	return w, nil
}

func parseAck(r *http.Request) (replication.AckLevel, error) {
	ack, err := replication.ParseAck(r.URL.Query().Get("ack"))
	if err != nil {
		return ack, fmt.Errorf("%w: %w", errInvalidParameter, err)
	}
	return ack, nil
}

// parseReadOptions reads a GET's consistency=… and max_stale=….
func parseReadOptions(r *http.Request) (node.ReadOptions, error) {
	q := r.URL.Query()
	var o node.ReadOptions
	switch c := q.Get("consistency"); c {
	case "", "strong":
	case "stale":
		o.Stale = true
	default:
		return o, fmt.Errorf("%w: consistency=%q: use strong (the default) or stale", errInvalidParameter, c)
	}
	if s := q.Get("max_stale"); s != "" {
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
func origin(r *http.Request) node.Origin {
	o := node.Origin{ForwardedBy: r.Header.Get(HeaderForwarded)}
	o.Redirect, _ = strconv.ParseBool(r.URL.Query().Get("redirect"))
	if seen, err := strconv.ParseUint(r.Header.Get(HeaderSeenEpoch), 10, 64); err == nil {
		o.SeenEpoch = seen
	}
	return o
}
