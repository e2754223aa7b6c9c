// Package election elects one leader among the store's pods over a
// coordination.k8s.io/v1 Lease, using client-go's tools/leaderelection.
//
// The ConfigMap and Endpoints lock types that older tutorials use have been
// removed from client-go; the Lease is the only lock, and it is what
// Kubernetes' own components use.
//
// It guarantees:
//   - Each leadership term has an epoch, leaseTransitions+1 of the Lease
//     record this node wrote when it acquired. The apiserver's optimistic
//     concurrency means no two terms share an epoch, and a later term always
//     has a higher one. With Config.EpochFloor, a term also starts above the
//     newest term the node has admitted, so a deleted Lease does not restart
//     epochs at 1.
//   - The write gate (WriteGate) is open only while now < start of the last
//     successful renewal + RenewDeadline, on this process's monotonic clock.
//     RenewDeadline < LeaseDuration, so the gate shuts before any other node
//     can acquire, even if this process was paused or cut off.
//   - Losing the Lease never stops the process or the campaign.
//   - On shutdown (Stop, then cancel Run's context) the Lease is released on
//     a fresh context, so a successor takes over within about a retry period.
//   - A leader that stops renewing (crashed, or cut off) is replaced the
//     moment its Lease has gone unchanged for LeaseDuration since this node
//     saw it change: client-go's own expiry rule, applied on a timer instead
//     of at the candidate's next poll (which comes every 1 to 2.2 ×
//     RetryPeriod). The takeover writes with the read's resourceVersion, so
//     of several candidates only one wins.
//
// It does not:
//   - fence by itself. client-go documents that it cannot guarantee a single
//     acting leader (clock skew, long pauses). Fencing is the epoch: every
//     replicated write carries it and followers refuse older epochs.
//   - tell followers about a new leader instantly: they learn it on their
//     next poll of the Lease (every RetryPeriod).
package election
