// Package transport carries the typed calls nodes make to each other: a
// write forwarded to the leader, a read handed to an owner, a listing the
// leader answers, and the leader and lease-released notices.
//
// Each call is a Go method with a request and a reply type (Write and
// WriteReply, Read and ReadReply, ...). HTTP is the real implementation: a
// POST of a length-prefixed binary body to the peer's NewHandler, over
// whatever http.RoundTripper main passes (internal/peerhttp's one
// multiplexed connection per peer). InMem is the other: the same calls as
// function calls through the same codec, with faults a test injects per
// call (unreachable, reply lost, delayed), so a partition is one line of a
// testing/synctest test.
//
// What it guarantees:
//   - Values travel as their exact bytes: no escaping, no UTF-8 repair.
//   - A peer's refusal has one shape, *Error: the HTTP status and stable
//     code of the peer's error table, its message, and the current version
//     of a failed precondition. Status 503 promises nothing was applied.
//   - An error wrapping ErrNotSent means the peer never saw the call; any
//     other failure means it may have served it.
//   - A decoder never allocates more than the body it was given, and
//     refuses a truncated or trailing body.
//   - The cluster token is defined once (TokenHeader) and checked once
//     (CheckToken, by the API in front of NewHandler).
//
// What it does not do: decide where a call goes or whether to repeat it
// (internal/node does; HTTP only repeats a call that was never sent), stream
// large bodies (a call and its reply are held whole, but once: a reply's
// values are written from where the service holds them, and a decoded
// message's values alias the body it arrived in), or encrypt.
//
// It imports no other package of this module.
package transport
