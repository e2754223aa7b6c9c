package api

import (
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/statefulkv/store/internal/transport"
)

// Headers of requests and responses.
const (
	// HeaderRequestID makes a write idempotent: a retry with the same id is
	// applied at most once. Clients may set it; otherwise the first node
	// that forwards the write generates one.
	HeaderRequestID = "X-Request-Id"
	// HeaderLeader and HeaderEpoch name the node that applied a write.
	HeaderLeader = "X-Store-Leader"
	HeaderEpoch  = "X-Store-Epoch"
	// HeaderServedBy names the node whose replica answered a read.
	HeaderServedBy = "X-Store-Served-By"
	// HeaderConsistency echoes the consistency a read was served at.
	HeaderConsistency = "X-Store-Consistency"
	// HeaderLastContact is, on a stale read, the milliseconds since the
	// answering replica last heard from the leader.
	HeaderLastContact = "X-Store-Last-Contact"

	// HeaderForwarded marks a request a node forwarded as plain HTTP (nodes
	// of an older version did); such a request is never forwarded again.
	HeaderForwarded = "X-Store-Forwarded-By"
	// HeaderSeenEpoch carries, on such a request, the newest epoch the
	// forwarding node has seen. A leader of an older term learns from it
	// that it has been superseded and steps down before applying anything.
	HeaderSeenEpoch = "X-Store-Seen-Epoch"
	// HeaderPeerToken authenticates a request as coming from another node of
	// the cluster; the peer headers above are honoured only with it.
	HeaderPeerToken = transport.TokenHeader
)

// maxReportedAge caps the staleness a header reports (a node that never
// heard from a leader has an unbounded one).
const maxReportedAge = 365 * 24 * time.Hour

// PeerStreamPath upgrades to the connection over which a node sends its
// calls to this one (internal/peerhttp).
const PeerStreamPath = "/internal/v1/peer-stream"

// peerAuth refuses requests that carry the peer headers (which can depose a
// leader or bypass forwarding) or go to /internal/ without the cluster
// token, so a client that can reach the port cannot pose as a node. It is
// the one check of the token (transport.CheckToken takes constant time);
// the token is never logged.
func (s *Server) peerAuth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/internal/") ||
			r.Header.Get(HeaderForwarded) != "" || r.Header.Get(HeaderSeenEpoch) != "" || r.Header.Get(HeaderPeerToken) != "" {
			if !transport.CheckToken(r, s.cfg.PeerToken) {
				s.writeError(w, r, fmt.Errorf("%w: /internal/ and the %s and %s headers are for nodes of this cluster and need a valid %s",
					errPeerAuth, HeaderForwarded, HeaderSeenEpoch, HeaderPeerToken))
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// peerStream turns a peer's request into the multiplexed connection it
// sends its calls over.
func (s *Server) peerStream(w http.ResponseWriter, r *http.Request) {
	if err := s.streams.Upgrade(w, r); err != nil {
		s.writeError(w, r, fmt.Errorf("%s: %w", PeerStreamPath, err))
	}
}

// PeerAddrFromTemplate turns a template such as
// "{id}.store-peers.{namespace}.svc:8080" into a function from node identity
// to host:port. {ordinal} is the number at the end of the identity (the
// StatefulSet ordinal), which lets a local cluster map store-1 to 127.0.0.1.
func PeerAddrFromTemplate(tmpl, namespace string) (func(id string) (string, error), error) {
	if !strings.Contains(tmpl, "{id}") && !strings.Contains(tmpl, "{ordinal}") {
		return nil, fmt.Errorf("peer address template %q uses neither {id} nor {ordinal}", tmpl)
	}
	return func(id string) (string, error) {
		out := strings.ReplaceAll(tmpl, "{id}", id)
		out = strings.ReplaceAll(out, "{namespace}", namespace)
		if strings.Contains(out, "{ordinal}") {
			i := strings.LastIndexFunc(id, func(c rune) bool { return c < '0' || c > '9' })
			if i == len(id)-1 {
				return "", fmt.Errorf("identity %q has no trailing ordinal for {ordinal}", id)
			}
			out = strings.ReplaceAll(out, "{ordinal}", id[i+1:])
		}
		if _, _, err := net.SplitHostPort(out); err != nil {
			return "", fmt.Errorf("peer address %q for %s: %w", out, id, err)
		}
		return out, nil
	}, nil
}
