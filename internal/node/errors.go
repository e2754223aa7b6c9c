package node

import (
	"context"
	"errors"
	"fmt"

	"github.com/statefulkv/store/internal/replication"
	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// Errors of the node's routing. Each is wrapped with a message that says
// what happened; OutcomeOf says what it means for the client's write.
var (
	// ErrNotLeader: a forwarded request reached a node that does not lead.
	// Nothing was applied.
	ErrNotLeader = errors.New("not the leader")
	// ErrNoLeader: no leader could be found or reached in time. Nothing
	// was applied.
	ErrNoLeader = errors.New("no leader")
	// ErrOutcomeUnknown: the write may or may not have been applied (the
	// leader's term ended during the commit, or its answer was lost).
	ErrOutcomeUnknown = errors.New("outcome unknown")
	// ErrLeaderTimeout: the leader had the write and did not answer in
	// time. Outcome unknown.
	ErrLeaderTimeout = errors.New("leader did not answer in time")
	// ErrReplicasTimeout: the write is durable on the leader but its ack
	// level was not met in time. Outcome unknown.
	ErrReplicasTimeout = errors.New("replicas did not confirm in time")
	// ErrTooStale: a stale read's replica is further behind than max_stale.
	ErrTooStale = errors.New("replica too stale")
	// ErrReadUnconfirmed: a strong read could not be confirmed.
	ErrReadUnconfirmed = errors.New("read not confirmed")
)

// Outcome is what an error from a node method means for the request.
type Outcome int

const (
	// Applied: no error.
	Applied Outcome = iota
	// NotApplied: nothing changed anywhere, and the request may be sent
	// again, to this node or another (the leader moved, none is known, a
	// replica cannot confirm a read now).
	NotApplied
	// Unknown: a write may or may not have been applied; a retry with the
	// same request id is safe.
	Unknown
	// Refused: the request itself was refused (a failed precondition, a
	// missing key, a reused request id); nothing changed, and sending it
	// again gets the same answer.
	Refused
)

func (o Outcome) String() string {
	return [...]string{"applied", "not applied", "outcome unknown", "refused"}[o]
}

// OutcomeOf classifies err, including a peer's refusal relayed as a
// *transport.Error (by its status: 503 not applied, 4xx refused).
func OutcomeOf(err error) Outcome {
	if err == nil {
		return Applied
	}
	if te, ok := errors.AsType[*transport.Error](err); ok {
		switch {
		case te.Status == 503:
			return NotApplied
		case te.Status >= 400 && te.Status < 500:
			return Refused
		}
		return Unknown
	}
	switch {
	case errors.Is(err, ErrOutcomeUnknown), errors.Is(err, ErrLeaderTimeout), errors.Is(err, ErrReplicasTimeout),
		errors.Is(err, storage.ErrSyncFailed), errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return Unknown
	case errors.Is(err, ErrNotLeader), errors.Is(err, ErrNoLeader), errors.Is(err, storage.ErrStaleEpoch),
		errors.Is(err, storage.ErrClosed), errors.Is(err, ErrTooStale), errors.Is(err, ErrReadUnconfirmed),
		errors.Is(err, transport.ErrNotSent), errors.Is(err, replication.ErrNotCaughtUp):
		return NotApplied
	case errors.Is(err, storage.ErrConditionFailed), errors.Is(err, storage.ErrNotFound),
		errors.Is(err, storage.ErrRequestIDReused), errors.Is(err, storage.ErrInvalidMutation):
		return Refused
	}
	return Unknown
}

// notFoundKey names the key in a not-found error; other errors pass through.
func notFoundKey(err error, key string) error {
	if errors.Is(err, storage.ErrNotFound) {
		return fmt.Errorf("%w: %q", storage.ErrNotFound, key)
	}
	return err
}
