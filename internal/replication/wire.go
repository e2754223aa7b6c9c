package replication

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/statefulkv/store/internal/storage"
)

// ReplicatePath is the follower endpoint a leader sends batches to. It is a
// peer endpoint: the API mounts it behind the cluster-token check.
const ReplicatePath = "/internal/v1/replicate"

// wireEntry is one replicated entry on the wire. Value is the client's JSON
// exactly as sent, carried as a JSON string: a json.RawMessage would be
// compacted and HTML-escaped on the way, and replicas must hold the same
// bytes the client sent.
type wireEntry struct {
	Key     string `json:"key"`
	Version string `json:"version"`
	Deleted bool   `json:"deleted,omitempty"`
	Value   string `json:"value,omitempty"`
}

// batchRequest is the body of POST ReplicatePath.
type batchRequest struct {
	Envelope
	Entries []wireEntry `json:"entries"`
}

// batchReply answers a batch: how many entries changed the follower, and
// the newest term it has admitted (higher than the sender's on a refusal).
type batchReply struct {
	Applied int    `json:"applied"`
	Fence   uint64 `json:"fence"`
	Error   *struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error,omitempty"`
}

func toWire(e storage.Entry) wireEntry {
	w := wireEntry{Key: e.Key, Version: e.Version.String(), Deleted: e.Deleted}
	if !e.Deleted {
		w.Value = string(e.Value)
	}
	return w
}

func fromWire(w wireEntry) (storage.Entry, error) {
	v, err := storage.ParseVersion(w.Version)
	if err != nil {
		return storage.Entry{}, err
	}
	if w.Key == "" || (!w.Deleted && !json.Valid([]byte(w.Value))) {
		return storage.Entry{}, fmt.Errorf("entry %q: missing key or invalid value", w.Key)
	}
	return storage.Entry{Key: w.Key, Value: []byte(w.Value), Version: v, Deleted: w.Deleted}, nil
}

// Applier is what a follower needs from its local store. *storage.DB
// implements it.
type Applier interface {
	// ApplyReplicated durably applies newer entries; it refuses an older
	// term with storage.ErrStaleEpoch.
	ApplyReplicated(ctx context.Context, epoch uint64, entries []storage.Entry) (int, error)
	// FenceEpoch is the newest term admitted.
	FenceEpoch() uint64
}

// maxBatchBytes bounds one replicate request body.
const maxBatchBytes = 64 << 20

// FollowerHandler serves ReplicatePath: it admits a batch through fence (an
// older term, or another leader claiming the current one, is refused) and
// through the store's durable fence, and applies it durably before
// answering 200. A refused batch gets 409 with code stale_epoch and the
// follower's fence, and changes nothing. An empty batch is a heartbeat.
// onAdmit, if set, hears every admitted envelope.
func FollowerHandler(db Applier, fence *Fence, onAdmit func(Envelope)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reply := func(status int, br batchReply) {
			b, _ := json.Marshal(br)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(status)
			_, _ = w.Write(b)
		}
		fail := func(status int, code string, err error) {
			br := batchReply{Fence: db.FenceEpoch()}
			br.Error = &struct {
				Code    string `json:"code"`
				Message string `json:"message"`
			}{code, err.Error()}
			reply(status, br)
		}
		var req batchRequest
		if err := json.NewDecoder(io.LimitReader(r.Body, maxBatchBytes)).Decode(&req); err != nil {
			fail(http.StatusBadRequest, "invalid_batch", fmt.Errorf("decode batch: %w", err))
			return
		}
		if req.Epoch == 0 || req.Leader == "" {
			fail(http.StatusBadRequest, "invalid_batch", errors.New("batch without epoch or leader"))
			return
		}
		if err := fence.Admit(req.Envelope); err != nil {
			fail(http.StatusConflict, "stale_epoch", err)
			return
		}
		if onAdmit != nil {
			onAdmit(req.Envelope)
		}
		entries := make([]storage.Entry, 0, len(req.Entries))
		for _, we := range req.Entries {
			e, err := fromWire(we)
			if err != nil {
				fail(http.StatusBadRequest, "invalid_batch", err)
				return
			}
			entries = append(entries, e)
		}
		if len(entries) == 0 && db.FenceEpoch() >= req.Epoch {
			// A heartbeat of a term already persisted: nothing to sync.
			reply(http.StatusOK, batchReply{Fence: req.Epoch})
			return
		}
		n, err := db.ApplyReplicated(r.Context(), req.Epoch, entries)
		switch {
		case errors.Is(err, storage.ErrStaleEpoch):
			fail(http.StatusConflict, "stale_epoch", err)
		case err != nil:
			fail(http.StatusInternalServerError, "apply_failed", err)
		default:
			reply(http.StatusOK, batchReply{Applied: n, Fence: db.FenceEpoch()})
		}
	})
}
