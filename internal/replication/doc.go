// Package replication places keys on their owners and will carry the
// leader's writes to them. DESIGN.md beside this file is the plan; this
// comment states only what the code guarantees today.
//
// It guarantees:
//   - Ring: a key maps to one of PartitionCount partitions and a partition to
//     up to R distinct owners, as a function of the member set alone (the
//     order members were added, or a restart re-adding the same names, does
//     not matter). Member sets and parameters under which
//     github.com/buraksezer/consistent would panic are refused with an error.
//   - Fence: a message from an older leadership term than one already seen
//     is refused with ErrStaleEpoch, as is a second leader claiming the same
//     term.
//
// It does not yet:
//   - replicate: in cluster mode the leader's bbolt is the only copy. Ack
//     levels, follower reads with explicit consistency, repair and
//     membership changes are designed in DESIGN.md and not built.
package replication
