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
//   - Replicator.Replicate returns nil only after `need` followers answered
//     200 to a batch holding the entry, i.e. after they fsynced it
//     (FollowerHandler applies through storage.DB.ApplyReplicated before it
//     answers). A follower that is down keeps its queue, so it catches up
//     when it returns; a full queue marks it Behind. A follower that has
//     admitted a newer term refuses the batch and OnStaleEpoch is told.
//
// It does not yet:
//   - take part in the write path: the API does not call the Replicator, so
//     in cluster mode the leader's bbolt is still the only copy. Membership,
//     ack levels in the API, follower reads with explicit consistency,
//     catch-up on leader change and anti-entropy repair are designed in
//     DESIGN.md and not built.
package replication
