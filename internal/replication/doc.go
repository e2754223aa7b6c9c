// Package replication places keys on their owners and carries the leader's
// writes to them; DESIGN.md beside this file explains why each part exists.
//
// Cluster wires one type per concern, each in its own file:
//   - replicator (replicator.go): the leader's link to each follower, its
//     queue, sender, liveness and heartbeat together;
//   - receiver (wire.go): a follower's side of the leader's batches;
//   - termGate (catchup.go): a new leader's catch-up, which holds the write
//     gate shut until earlier terms' acknowledged writes are here;
//   - readIndex (readindex.go): strong reads on both sides, the leader's
//     set of writes in flight and the followers' batched read-index calls;
//   - repairer (repair.go): a follower's anti-entropy against the leader;
//   - handOff (handoff.go): a leaving leader's push to the members;
//   - replicaService (service.go): what this node answers other members.
//
// Every call to another member goes through the Peers interface
// (internal/transport), so the tests run the whole protocol on an
// in-memory network with injected faults.
//
// Promises (held by the tests in this package and in cmd/store):
//   - Ring: a key maps to one of PartitionCount partitions and a partition to
//     up to R distinct owners, as a function of the member set alone. Member
//     sets and parameters under which github.com/buraksezer/consistent would
//     panic are refused with an error.
//   - Fence (termFence): a message from an older leadership term than one already seen
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
