// Package storage is the durable, versioned key-value state of one node, kept
// in a single bbolt file.
//
// It guarantees:
//   - Apply returns success only after the mutation is fsynced (group commit:
//     concurrent writers share one transaction and one fsync; a lone writer
//     pays no added delay).
//   - Every write gets a Version (epoch, seq) greater than any version this
//     file has assigned before; seq survives restarts.
//   - Preconditions (IfMatch, IfExists, IfAbsent) are checked inside the same
//     transaction that writes, so compare-and-set is atomic.
//   - Values handed out are copies: callers may keep and modify them.
//   - ApplyReplicated stores an entry only if its version is newer than the
//     key's, and refuses a term older than one already admitted.
//   - With Options.Partitions, Digests equal on two replicas exactly when
//     they hold the same versions in a partition (up to 64-bit collisions).
//
// It does not:
//   - know about leaders, replication or the network; the caller supplies the
//     epoch and decides who may write.
//   - validate that values are JSON or bound their size; the API layer does.
//   - garbage-collect tombstones (they are small; see DESIGN.md).
//   - shrink its file: freed pages are reused, never returned, and large
//     values fragment them; Compact rewrites a closed file without them.
//   - keep a request id past Options.RequestTTL or Options.MaxRequestBytes,
//     whichever ends first; a retry after that is applied again.
//
// The on-disk layout is described in DESIGN.md beside this file.
package storage
