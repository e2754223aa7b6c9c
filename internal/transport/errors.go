package transport

import (
	"errors"
	"fmt"
)

// ErrNotSent means the call never reached the peer (the connection could
// not be made, or the peer announced it would not read the call): it is
// safe to send it again, anywhere.
var ErrNotSent = errors.New("transport: not sent")

// Error is the one shape of a peer's refusal: the peer served the call and
// answered with an error. Status and Code are the HTTP status and stable
// code the peer's own error table gave it (see internal/api), so a node
// that relays the answer to its client answers exactly what the peer would
// have. Status 503 promises that nothing was applied.
type Error struct {
	Status  int
	Code    string
	Message string
	// Current is the key's version on a failed precondition (zero if the
	// key does not exist).
	Current Version
	// Fence is, on a refusal of the sender's term (code stale_epoch), the
	// newest term the peer has admitted.
	Fence uint64
}

func (e *Error) Error() string { return e.Message }

// NotApplied reports whether the peer promised that nothing was applied
// and another node may serve the call (HTTP 503).
func (e *Error) NotApplied() bool { return e.Status == 503 }

func (e *Error) encode(enc *encoder) {
	enc.uvarint(uint64(e.Status))
	enc.str(e.Code)
	enc.str(e.Message)
	enc.version(e.Current)
	enc.uvarint(e.Fence)
}

func (e *Error) decode(d *decoder) {
	e.Status, e.Code, e.Message, e.Current, e.Fence = int(min(d.uvarint(), 999)), d.str(), d.str(), d.version(), d.uvarint()
}

// ErrorFunc turns a service's error into the Error sent to the peer. The
// API layer provides it from its error table.
type ErrorFunc func(error) *Error

// notSent wraps err as ErrNotSent.
func notSent(err error) error { return fmt.Errorf("%w: %w", ErrNotSent, err) }
