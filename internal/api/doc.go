// Package api is the HTTP face of a node: the /v1 routes, the probes,
// /metrics, and the peer endpoints behind the cluster token.
//
// It only parses and validates a request (keys, UTF-8 JSON bodies and their
// Content-* headers, If-Match lists, query parameters, strictly: nothing a
// client sends is silently dropped, and a follower refuses bad input before
// anything is forwarded), calls internal/node, which decides where the
// request is served, and writes the answer: the result, a 307 for a
// node.Redirect, or an error mapped to its status and stable code through
// the one table in errors.go. HEAD is answered by the GET handler. A peer's
// refusal relayed by the node keeps the status and code the peer gave it,
// and errors this node answers to a peer's call travel back through the
// same table (Server.wireError). Metric labels come from fixed sets, so no
// client input adds series.
//
// Every error body it writes is JSON. What it does not write: the answers
// net/http's server gives before any handler runs (a request line or
// header it cannot parse, headers over MaxHeaderBytes, an unsupported
// Transfer-Encoding or HTTP version, an odd Expect). http.Server writes
// those straight onto the connection in plain text and offers no hook to
// change them; making them JSON would take a connection wrapper that
// parses HTTP/1 ahead of net/http, a second parser with its own bugs in
// front of the one that is tested, for requests no real client sends. So
// the README's error table lists each exception, and
// TestServer_PreHandlerErrors_PlainTextAsDocumented pins them.
//
// It also serves, in cluster mode, the multiplexed peer connections
// (internal/peerhttp) and mounts the typed calls (internal/transport) and
// replication's endpoints under /internal/, all behind one token check.
//
// It does not route, retry or replicate.
package api
