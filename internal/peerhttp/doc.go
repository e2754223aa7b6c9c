// Package peerhttp carries HTTP requests from one node of the cluster to
// another over a single long-lived connection per peer, with many requests
// in flight at once.
//
// A follower forwards every write it receives to the leader, and a leader
// hands strong reads to an owner. Over plain HTTP/1.1 each of those
// requests costs its own write and read system calls on both sides and a
// hop through net/http's connection machinery; on loopback, where the
// peers share the CPU, that hop cost 40 % of the throughput of writing to
// the leader directly. Here the requests of all goroutines share one TCP
// connection: each side queues its frames and one writer goroutine sends
// everything queued with one write, so under load many requests travel per
// system call.
//
// The connection starts as an HTTP/1.1 request with "Upgrade:
// statefulkv-peer/1" to Server's endpoint, so it passes the same listener,
// routing and authentication as any peer request. Transport is the client
// side, an http.RoundTripper: callers keep using net/http (and
// go-retryablehttp's retries) and only the transport changes. A peer that
// does not offer the upgrade (an older version during a rolling update) is
// reached through the Fallback transport instead.
//
// What it guarantees:
//   - A request a Transport returns an error for with a *net.OpError whose
//     Op is "dial" was never seen by the peer: it is safe to send again
//     anywhere. That covers failed connects and handshakes, a transient
//     refusal of the upgrade (503), requests the peer's graceful shutdown
//     announced it would not read (GOAWAY), and requests still queued
//     behind a write that timed out.
//   - A peer that reads nothing for Transport.WriteTimeout (dead, or paused
//     with its socket buffers full) loses the connection; the next request
//     connects again rather than queueing behind it.
//   - Any other error means the peer may have received and served it.
//   - Server.Shutdown serves every request it has read, sends its
//     response, and only then closes the connection.
//   - A body is held once on each side: a large one is written from where
//     it lies (the caller's request body, the handler's recorded response),
//     never copied into the writer's buffer, and a received one is the
//     frame it arrived in, whose Body hands it over uncopied (Bytes).
//
// What it does not do: stream bodies (requests and responses are held in
// memory whole, bounded by MaxFrameBytes), cancel a request at the peer
// when the caller gives up (the answer is dropped on arrival), or encrypt
// (like the rest of the peer traffic it relies on the cluster network).
package peerhttp
