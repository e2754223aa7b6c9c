package storage

import "errors"

var (
	// ErrNotFound means the key has no live value (never written, or deleted).
	ErrNotFound = errors.New("key not found")

	// ErrConditionFailed means an If-Match / If-None-Match style precondition
	// did not hold; nothing was written. The concrete error is a
	// *ConditionError carrying the current version.
	ErrConditionFailed = errors.New("condition failed")

	// ErrClosed means the database has been closed; nothing was written.
	ErrClosed = errors.New("storage closed")

	// ErrBadVersion means a version string could not be parsed.
	ErrBadVersion = errors.New("malformed version")

	// ErrInvalidMutation means the caller passed a mutation that can never be
	// applied (empty key, zero epoch, condition on both sides). It is a
	// programming error in the caller, not a client error.
	ErrInvalidMutation = errors.New("invalid mutation")

	// ErrCorrupt means a stored record could not be decoded.
	ErrCorrupt = errors.New("corrupt record")

	// ErrUnsupportedFormat means the file was written by a format this
	// binary does not know; see DESIGN.md for the migration rule.
	ErrUnsupportedFormat = errors.New("unsupported on-disk format")

	// ErrRequestIDReused means a request id already applied to one key was
	// sent again for another key; nothing was written.
	ErrRequestIDReused = errors.New("request id reused for another key")

	// ErrStaleEpoch means a write came from an older leadership term than
	// one this node has already admitted; nothing was written. Its sender has
	// been superseded.
	ErrStaleEpoch = errors.New("stale epoch")

	// ErrSyncFailed means a commit failed after its mutation's result had
	// been handed to Mutation.BeforeSync: the version may exist elsewhere
	// but is not durable here. The caller must treat the outcome as unknown.
	ErrSyncFailed = errors.New("commit failed after the version was handed out")

	// ErrLocked means another process holds the database file.
	ErrLocked = errors.New("database file is locked by another process")
)
