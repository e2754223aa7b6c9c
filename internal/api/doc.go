// Package api is the HTTP face of a node: the /v1 routes, the probes,
// /metrics, and the peer endpoints behind the cluster token.
//
// It only parses and validates a request (keys, JSON bodies, preconditions,
// query parameters; a follower refuses bad input before anything is
// forwarded), calls internal/node, which decides where the request is
// served, and writes the answer: the result, a 307 for a node.Redirect, or
// an error mapped to its status and stable code through the one table in
// errors.go. Every error body is JSON. A peer's refusal relayed by the node
// keeps the status and code the peer gave it, and errors this node answers
// to a peer's call travel back through the same table (Server.wireError).
//
// It also serves, in cluster mode, the multiplexed peer connections
// (internal/peerhttp) and mounts the typed calls (internal/transport) and
// replication's endpoints under /internal/, all behind one token check.
//
// It does not route, retry or replicate.
package api
