// Package node decides where each request is served and says what came of
// it. It is the layer between the HTTP face (internal/api, which parses,
// validates and maps errors to statuses) and the parts that hold data
// (internal/replication, internal/storage); it knows no HTTP.
//
// Where a request goes:
//   - A write is applied here when this node's write gate is open (it
//     leads, and replication's catch-up of the term is done); otherwise it
//     is forwarded to the leader over the transport (Peers). While no
//     leader is known it waits, up to ForwardTimeout, for one. A write
//     that reached this node forwarded is never forwarded again.
//   - A forward that the leader refuses with "not applied" (it lost the
//     Lease, its gate is closed) or that was never sent is sent again,
//     after a jittered backoff, to whoever leads by then, possibly this
//     node; every forwarded write carries a request id so that a retry
//     after a lost answer is applied once.
//   - A read with replication is served by an owner of the key that is
//     not the leader (the leader hands reads off), else by the leader,
//     which holds every key; a replica that cannot confirm passes the read
//     to the next candidate. Without replication, reads and listings are
//     served by the leader.
//   - With Origin.Redirect, the answer is a *Redirect to the node that
//     should serve, instead of a forward.
//
// What it says: every error maps to an Outcome (OutcomeOf): NotApplied
// (nothing changed; retry anywhere), Refused (the request itself was
// refused; nothing changed), or Unknown (a write may or may not have been
// applied; retry with the same request id). A peer's answer is relayed as
// the peer gave it (*transport.Error), so the client hears what the leader
// said.
//
// What it does not do: replicate (internal/replication), elect
// (internal/election), keep request ids across leader changes (storage
// keeps them on the leader that applied the write only).
package node
