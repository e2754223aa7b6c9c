package api

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// Tests that speak HTTP/1.1 over raw TCP, for what a client library would
// not send: bodies cut short or stalled, and requests net/http refuses
// before any handler runs.

// lockedBuffer collects log output that servers write while a test reads.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// rawExchange writes raw to the server at url over one TCP connection and
// reads one response. With closeWrite the client half-closes once it has
// written, like a client that hangs up in the middle of its body.
func rawExchange(t *testing.T, url, raw string, closeWrite bool) (*http.Response, string) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// A safety net, so that a server that never answers fails the test
	// instead of hanging it; nothing waits on it.
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	// Written concurrently with the read: a server that answers before
	// it has read everything (431) must not block the writer forever.
	go func() {
		if _, err := io.WriteString(conn, raw); err == nil && closeWrite {
			_ = conn.(*net.TCPConn).CloseWrite()
		}
	}()
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read response body: %v", err)
	}
	return resp, string(body)
}

// Item 4: a body that ends before what it announced, or whose framing
// breaks, is the client's fault: 400 incomplete_body, logged below ERROR,
// nothing changed.
func TestServer_Body_CutShortIs400IncompleteBody(t *testing.T) {
	tests := []struct {
		name string
		raw  string
		msg  string
	}{
		{"Content-Length larger than the body",
			"PUT /v1/kv/x HTTP/1.1\r\nHost: t\r\nContent-Length: 20\r\n\r\n{\"a\":1", "body ended after 6 of the 20 bytes its Content-Length announced"},
		{"chunked body without its last chunk",
			"PUT /v1/kv/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n{\"a\":1\r\n", "unexpected EOF"},
		{"chunk shorter than its size",
			"PUT /v1/kv/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"a\":1", "could not be read in full"},
		{"malformed chunk size",
			"PUT /v1/kv/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n1\r\n\r\n0\r\n\r\n", "could not be read in full"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			logs := &lockedBuffer{}
			n := startNode(t, nodeOpts{api: Config{NodeID: "n1", Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))}})
			before := n.snapshot()
			resp, body := rawExchange(t, n.url, tt.raw, true)
			checkRawRefusal(t, n, before, logs, resp, body, 400, "incomplete_body", tt.msg)
		})
	}
}

// Item 4: a body that does not arrive within the http.Server's
// ReadTimeout is 408 request_timeout (cmd/store sets 60 s; 1 s here).
func TestServer_Body_ReadTimeoutIs408(t *testing.T) {
	logs := &lockedBuffer{}
	n := startNode(t, nodeOpts{
		api:    Config{NodeID: "n1", Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))},
		server: func(s *http.Server) { s.ReadTimeout = time.Second },
	})
	before := n.snapshot()
	// Six of twenty bytes, and the connection stays open.
	resp, body := rawExchange(t, n.url, "PUT /v1/kv/x HTTP/1.1\r\nHost: t\r\nContent-Length: 20\r\n\r\n{\"a\":1", false)
	checkRawRefusal(t, n, before, logs, resp, body, 408, "request_timeout", "did not arrive within the server's read timeout (6 bytes received)")
}

func checkRawRefusal(t *testing.T, n *testNode, before snapshot, logs *lockedBuffer, resp *http.Response, body string, status int, code, msg string) {
	t.Helper()
	if resp.StatusCode != status || errorCode(t, body) != code {
		t.Fatalf("answer = %d %s, want %d %s", resp.StatusCode, body, status, code)
	}
	var eb errorBody
	_ = json.Unmarshal([]byte(body), &eb)
	if !strings.Contains(eb.Error.Message, msg) {
		t.Fatalf("message %q does not say %q", eb.Error.Message, msg)
	}
	if !resp.Close {
		t.Error("the answer does not close the connection, whose framing is lost")
	}
	if diff := cmp.Diff(before, n.snapshot()); diff != "" {
		t.Fatalf("rejected request changed the store (-before +after):\n%s", diff)
	}
	if l := logs.String(); strings.Contains(l, "level=ERROR") || !strings.Contains(l, "level=DEBUG msg=\"request failed\"") {
		t.Fatalf("a client fault must be logged at debug, not error; log:\n%s", l)
	}
}

// Item 7: what net/http answers before any handler runs. These bodies are
// plain text, not JSON: http.Server writes them itself, straight onto the
// connection, and Go offers no hook to change them (see the README's error
// table, which lists each one). The test holds the README to what the
// server really sends, with the server settings cmd/store uses.
func TestServer_PreHandlerErrors_PlainTextAsDocumented(t *testing.T) {
	const plain = "text/plain; charset=utf-8"
	tests := []struct {
		name   string
		raw    string
		status int
		ctype  string
		body   string
	}{
		{"malformed request line", "NONSENSE\r\n\r\n", 400, plain, "400 Bad Request"},
		{"HTTP version not 1.x", "GET /healthz HTTP/2.0\r\nHost: t\r\n\r\n", 505, plain, "505 HTTP Version Not Supported: unsupported protocol version"},
		{"bad escape in the path", "GET /v1/kv/a%zz HTTP/1.1\r\nHost: t\r\n\r\n", 400, plain, "400 Bad Request"},
		{"control byte in the path", "GET /v1/kv/a\x01b HTTP/1.1\r\nHost: t\r\n\r\n", 400, plain, "400 Bad Request"},
		{"header line without a colon", "GET /healthz HTTP/1.1\r\nHost: t\r\nnonsense\r\n\r\n", 400, plain, "400 Bad Request"},
		{"invalid header name", "GET /healthz HTTP/1.1\r\nHost: t\r\nX(y): 1\r\n\r\n", 400, plain, "400 Bad Request"},
		{"control byte in a header value", "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Request-Id: a\x7fb\r\n\r\n", 400, plain, "400 Bad Request"},
		{"missing Host", "GET /healthz HTTP/1.1\r\n\r\n", 400, plain, "400 Bad Request: missing required Host header"},
		{"malformed Host", "GET /healthz HTTP/1.1\r\nHost: a b\r\n\r\n", 400, plain, "400 Bad Request: malformed Host header"},
		{"two Host headers", "GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, plain, "400 Bad Request"},
		{"Content-Length not a number", "PUT /v1/kv/x HTTP/1.1\r\nHost: t\r\nContent-Length: ten\r\n\r\n1", 400, plain, "400 Bad Request"},
		{"two different Content-Lengths", "PUT /v1/kv/x HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n12", 400, plain, "400 Bad Request"},
		{"Transfer-Encoding other than chunked", "PUT /v1/kv/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 501, plain, "Unsupported transfer encoding"},
		{"Expect other than 100-continue", "PUT /v1/kv/x HTTP/1.1\r\nHost: t\r\nExpect: teapot\r\nContent-Length: 1\r\n\r\n1", 417, "", ""},
		{"headers over 1 MiB", "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: " + strings.Repeat("p", 1<<20+4096) + "\r\n\r\n", 431, plain, "431 Request Header Fields Too Large"},
	}
	n := newTestNode(t, 0)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := n.snapshot()
			resp, body := rawExchange(t, n.url, tt.raw, false)
			if resp.StatusCode != tt.status || resp.Header.Get("Content-Type") != tt.ctype || body != tt.body {
				t.Fatalf("answer = %d %q %q, want %d %q %q", resp.StatusCode, resp.Header.Get("Content-Type"), body, tt.status, tt.ctype, tt.body)
			}
			if !resp.Close {
				t.Error("the answer does not close the connection")
			}
			if diff := cmp.Diff(before, n.snapshot()); diff != "" {
				t.Fatalf("refused request changed the store (-before +after):\n%s", diff)
			}
		})
	}
	// The same connection handling serves a well-formed request with our
	// JSON, so what is above is net/http's alone.
	resp, body := rawExchange(t, n.url, "GET /v1/kv/a%2Fb HTTP/1.1\r\nHost: t\r\n\r\n", false)
	if resp.StatusCode != 404 || errorCode(t, body) != "key_not_found" {
		t.Fatalf("well-formed request = %d %s", resp.StatusCode, body)
	}
}
