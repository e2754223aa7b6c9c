package api

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/statefulkv/store/internal/replication"
	"github.com/statefulkv/store/internal/storage"
)

// contactOnly is a Replication whose only working method is LastContact:
// readiness reads nothing else.
type contactOnly struct{ since time.Duration }

func (f contactOnly) Write(context.Context, uint64, replication.AckLevel, string, func(func(storage.Result)) (storage.Result, error)) (storage.Result, error) {
	panic("not used")
}
func (f contactOnly) Owners(string) []string { return nil }
func (f contactOnly) ReadStrong(context.Context, string) (storage.Entry, bool, error) {
	panic("not used")
}
func (f contactOnly) ReadStale(string) (storage.Entry, bool, time.Duration, error) {
	panic("not used")
}
func (f contactOnly) Status() replication.Status { return replication.Status{} }
func (f contactOnly) Handler() http.Handler      { return http.NotFoundHandler() }
func (f contactOnly) LastContact() time.Duration { return f.since }

func TestReadyz_ReflectsReachabilityOfTheLeader(t *testing.T) {
	tests := []struct {
		name      string
		leader    string
		open      bool
		since     time.Duration
		wantReady bool
		wantMsg   string
	}{
		{name: "leader with its gate open", leader: "n1", open: true, since: 0, wantReady: true},
		{name: "follower that heard from the leader", leader: "n1", since: 600 * time.Millisecond, wantReady: true},
		{name: "follower cut off from the leader", leader: "n1", since: 5 * time.Second, wantMsg: "no message from the leader (n1) for 5s"},
		{name: "node that never heard from a leader", since: time.Duration(1<<63 - 1), wantMsg: "no message from a leader yet"},
		{name: "leader whose gate closed and who hears from nobody", leader: "n2", since: 3 * time.Second, wantMsg: "for 3s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ls := &fakeLeadership{}
			ls.set(tt.leader, 4, tt.open)
			n := startNode(t, Config{NodeID: "n2", Leadership: ls, PeerAddr: func(string) (string, error) { return "", nil },
				PeerToken: testToken, Replication: contactOnly{since: tt.since}}, nil)
			r := n.do("GET", "/readyz", "")
			if tt.wantReady {
				if r.status != http.StatusOK {
					t.Fatalf("readyz = %d %s, want 200", r.status, r.body)
				}
				return
			}
			if r.status != http.StatusServiceUnavailable || errorCode(t, r.body) != "not_ready" || !strings.Contains(r.body, tt.wantMsg) {
				t.Fatalf("readyz = %d %s, want 503 not_ready saying %q", r.status, r.body, tt.wantMsg)
			}
		})
	}
}
