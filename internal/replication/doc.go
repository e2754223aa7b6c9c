// Package replication places keys on their owners and carries the leader's
// writes to them; DESIGN.md beside this file explains why each part exists.
//
// Promises (held by the tests in this package and in cmd/store):
//   - Ring: a key maps to one of PartitionCount partitions and a partition to
//     up to R distinct owners, as a function of the member set alone. Member
//     sets and parameters under which github.com/buraksezer/consistent would
//     panic are refused with an error.
//   - Fence: a message from an older leadership term than one already seen
//     is refused with ErrStaleEpoch, as is a second leader claiming the same
//     term; the store persists the mark with the entries it admits.
//   - Writes (Cluster.Write): ack=leader returns after the leader's fsync;
//     ack=quorum after the leader and ⌊R/2⌋ other members (owners, or live
//     stand-ins for owners that are down) fsynced the entry; ack=all after
//     the leader and every owner did. An error wrapping ErrAckTimeout,
//     ErrTermEnded or storage.ErrStaleEpoch means the entry is durable on the
//     leader but not promised: its outcome is unknown.
//   - A new leader's write gate (Cluster.WriteGate) opens only after its
//     catch-up has collected, from all members but one, every version newer
//     than its own: every write acknowledged at quorum or all in an earlier
//     term is then on the leader.
//   - consistency=strong (Cluster.ReadStrong) returns, for a key, a version
//     at least as new as every write acknowledged before the call started,
//     and, with R ≥ 2, never a version that is not on two members
//     (linearizable; checked with porcupine under leader kills and follower
//     pauses).
//   - consistency=stale (Cluster.ReadStale) returns this replica's copy and
//     the time since it last heard from a leader; nothing more.
//   - Repair: a follower whose owned partitions differ from the leader's
//     pulls them within about one RepairInterval; after a member-set change
//     the new owners pull theirs, and old copies are never dropped.
package replication
