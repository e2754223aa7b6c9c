package replication

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"

	"github.com/statefulkv/store/internal/storage"
)

// Peer endpoints besides ReplicatePath. All sit behind the cluster token
// (the API checks it before they are reached).
const (
	// DigestsPath answers this node's partition digests.
	DigestsPath = "/internal/v1/digests"
	// EntriesPath answers every entry of the requested partitions.
	EntriesPath = "/internal/v1/entries"
	// ReadIndexPath (leader only) answers the committed versions of keys.
	ReadIndexPath = "/internal/v1/read-index"
)

// syncRequest asks for digests or entries. A leader catching up sends its
// Envelope, which the answering node admits through its fence first (so an
// older leader can no longer replicate to it). A follower repairing from
// the leader sends none, and the answering node must be the caught-up
// leader.
type syncRequest struct {
	Envelope   *Envelope `json:"envelope,omitempty"`
	Partitions []int     `json:"partitions,omitempty"`
	// VersionsOnly asks for the partitions' keys and versions without
	// values; Keys asks for exactly these keys, values included.
	VersionsOnly bool     `json:"versions_only,omitempty"`
	Keys         []string `json:"keys,omitempty"`
}

type digestsReply struct {
	Envelope
	Digests []uint64 `json:"digests"`
}

type entriesReply struct {
	Envelope
	Entries []wireEntry `json:"entries"`
}

// readIndexRequest asks the leader for the committed versions of keys: the
// strong reads that arrived at a follower while its previous request was in
// flight share one round trip.
type readIndexRequest struct {
	Keys []string `json:"keys"`
}

type readIndexReply struct {
	Envelope
	// Versions holds each key's committed version, in request order; ""
	// when the leader holds none.
	Versions []string `json:"versions"`
}

// peerError is the body of a refused peer call.
type peerError struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
	Fence uint64 `json:"fence"`
}

// Handler serves the peer endpoints of this node: replication batches,
// digests, entries and read index. Mount it behind the cluster-token check.
func (c *Cluster) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("POST "+ReplicatePath, FollowerHandler(c.cfg.Local, c.fence, c.admitted))
	mux.HandleFunc("POST "+DigestsPath, c.serveDigests)
	mux.HandleFunc("POST "+EntriesPath, c.serveEntries)
	mux.HandleFunc("POST "+ReadIndexPath, c.serveReadIndex)
	return mux
}

func (c *Cluster) peerFail(w http.ResponseWriter, status int, code string, err error) {
	var pe peerError
	pe.Error.Code, pe.Error.Message, pe.Fence = code, err.Error(), c.fence.Highest()
	writePeerJSON(w, status, pe)
}

func writePeerJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// syncAuthority decides whether a sync request may be answered: a catching
// up leader's envelope must pass the fence; without one, this node must be
// the caught-up leader, whose envelope heads the reply.
func (c *Cluster) syncAuthority(w http.ResponseWriter, r *http.Request) (req syncRequest, env Envelope, ok bool) {
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&req); err != nil {
		c.peerFail(w, http.StatusBadRequest, "invalid_request", fmt.Errorf("decode: %w", err))
		return req, env, false
	}
	if req.Envelope != nil {
		if err := c.admit(*req.Envelope); err != nil {
			c.peerFail(w, http.StatusConflict, "stale_epoch", err)
			return req, env, false
		}
		// A catching-up leader's term must survive a restart of this node.
		if err := c.persistFence(r.Context(), req.Envelope.Epoch); err != nil {
			status, code := http.StatusInternalServerError, "fence_failed"
			if errors.Is(err, storage.ErrStaleEpoch) {
				status, code = http.StatusConflict, "stale_epoch"
			}
			c.peerFail(w, status, code, err)
			return req, env, false
		}
		return req, *req.Envelope, true
	}
	epoch, open := c.WriteGate()
	if !open {
		c.peerFail(w, http.StatusServiceUnavailable, "not_leader", fmt.Errorf("%s is not a caught-up leader", c.cfg.Self))
		return req, env, false
	}
	return req, Envelope{Epoch: epoch, Leader: c.cfg.Self}, true
}

func (c *Cluster) serveDigests(w http.ResponseWriter, r *http.Request) {
	_, env, ok := c.syncAuthority(w, r)
	if !ok {
		return
	}
	writePeerJSON(w, http.StatusOK, digestsReply{Envelope: env, Digests: c.cfg.Local.Digests()})
}

func (c *Cluster) serveEntries(w http.ResponseWriter, r *http.Request) {
	req, env, ok := c.syncAuthority(w, r)
	if !ok {
		return
	}
	var entries []storage.Entry
	var err error
	switch {
	case len(req.Keys) > 0:
		entries, err = c.cfg.Local.LookupMany(req.Keys)
	case req.VersionsOnly:
		entries, err = c.cfg.Local.PartitionVersions(req.Partitions)
	default:
		entries, err = c.cfg.Local.PartitionEntries(req.Partitions)
	}
	if err != nil {
		c.peerFail(w, http.StatusBadRequest, "invalid_request", err)
		return
	}
	reply := entriesReply{Envelope: env, Entries: make([]wireEntry, len(entries))}
	for i, e := range entries {
		reply.Entries[i] = toWire(e)
	}
	writePeerJSON(w, http.StatusOK, reply)
}

// serveReadIndex answers the committed version of each key: the leader's
// version once no write to the key is in flight. Every write acknowledged
// before the call is at or below it.
func (c *Cluster) serveReadIndex(w http.ResponseWriter, r *http.Request) {
	var req readIndexRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 16<<20)).Decode(&req); err != nil || len(req.Keys) == 0 {
		c.peerFail(w, http.StatusBadRequest, "invalid_request", fmt.Errorf("body must be {\"keys\":[...]} with at least one key (%v)", err))
		return
	}
	entries, found, epoch, err := c.leaderRead(r.Context(), req.Keys)
	if err != nil {
		c.peerFail(w, http.StatusServiceUnavailable, "not_leader", err)
		return
	}
	reply := readIndexReply{Envelope: Envelope{Epoch: epoch, Leader: c.cfg.Self}, Versions: make([]string, len(req.Keys))}
	for i := range req.Keys {
		if found[i] {
			reply.Versions[i] = entries[i].Version.String()
		}
	}
	writePeerJSON(w, http.StatusOK, reply)
}

// call POSTs (or GETs, with a nil body) to a peer and decodes a 200 reply
// into out. A refusal comes back as *peerCallError.
func (c *Cluster) call(ctx context.Context, id, method, path string, query url.Values, body, out any) error {
	addr, err := c.cfg.PeerAddr(id)
	if err != nil {
		return err
	}
	u := "http://" + addr + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(PeerTokenHeader, c.cfg.Token)
	resp, err := c.client.Do(req)
	if err != nil {
		c.noteResult(id, err)
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 500 {
		c.noteResult(id, fmt.Errorf("status %d", resp.StatusCode))
	} else {
		c.noteResult(id, nil)
	}
	if resp.StatusCode != http.StatusOK {
		var pe peerError
		_ = json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&pe)
		return &peerCallError{Peer: id, Status: resp.StatusCode, Code: pe.Error.Code, Message: pe.Error.Message, Fence: pe.Fence}
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// peerCallError is a peer's refusal of a call.
type peerCallError struct {
	Peer          string
	Status        int
	Code, Message string
	Fence         uint64
}

func (e *peerCallError) Error() string {
	return fmt.Sprintf("%s answered %d %s: %s", e.Peer, e.Status, e.Code, e.Message)
}

// Unwrap makes a stale_epoch refusal match storage.ErrStaleEpoch.
func (e *peerCallError) Unwrap() error {
	if e.Code == "stale_epoch" {
		return storage.ErrStaleEpoch
	}
	return nil
}

// fetchNewer brings this node level with a peer on the given partitions:
// it asks for their keys and versions first (no values), then for the
// values of exactly the keys the peer holds newer, and applies them here in
// term epoch (newer versions win). Steady-state differences, a few keys in
// flight, thus cost a few keys, not whole partitions. It returns how many
// entries changed this node.
func (c *Cluster) fetchNewer(ctx context.Context, from string, env *Envelope, epoch uint64, parts []int) (int, error) {
	var versions entriesReply
	if err := c.call(ctx, from, http.MethodPost, EntriesPath, nil, syncRequest{Envelope: env, Partitions: parts, VersionsOnly: true}, &versions); err != nil {
		return 0, err
	}
	var want []string
	const chunk = 1024
	for i := 0; i < len(versions.Entries); i += chunk {
		batch := versions.Entries[i:min(i+chunk, len(versions.Entries))]
		keys := make([]string, len(batch))
		for j, we := range batch {
			keys[j] = we.Key
		}
		local, err := c.cfg.Local.LookupMany(keys)
		if err != nil {
			return 0, err
		}
		have := make(map[string]storage.Version, len(local))
		for _, e := range local {
			have[e.Key] = e.Version
		}
		for _, we := range batch {
			v, err := storage.ParseVersion(we.Version)
			if err != nil {
				return 0, fmt.Errorf("versions from %s: %w", from, err)
			}
			if cur, ok := have[we.Key]; !ok || cur.Less(v) {
				want = append(want, we.Key)
			}
		}
	}
	applied := 0
	for len(want) > 0 {
		n := min(chunk, len(want))
		var reply entriesReply
		if err := c.call(ctx, from, http.MethodPost, EntriesPath, nil, syncRequest{Envelope: env, Keys: want[:n]}, &reply); err != nil {
			return applied, err
		}
		want = want[n:]
		entries := make([]storage.Entry, 0, len(reply.Entries))
		for _, we := range reply.Entries {
			e, err := fromWire(we)
			if err != nil {
				return applied, fmt.Errorf("entries from %s: %w", from, err)
			}
			entries = append(entries, e)
		}
		k, err := c.cfg.Local.ApplyReplicated(ctx, epoch, entries)
		applied += k
		if err != nil {
			return applied, err
		}
	}
	return applied, nil
}

// differing lists the partitions whose digests differ, limited to those
// for which keep returns true.
func differing(mine, theirs []uint64, keep func(int) bool) ([]int, error) {
	if len(mine) != len(theirs) {
		return nil, fmt.Errorf("%w: peer has %d partitions, this node %d (the partition count must match across the cluster)", ErrInvalidRing, len(theirs), len(mine))
	}
	var out []int
	for p := range mine {
		if mine[p] != theirs[p] && keep(p) {
			out = append(out, p)
		}
	}
	return out, nil
}
