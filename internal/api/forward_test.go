package api

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/statefulkv/store/internal/node"
	"github.com/statefulkv/store/internal/peerhttp"
	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// fakeLeadership is a hand-written Leadership with settable state.
type fakeLeadership struct {
	mu sync.Mutex
	// sinceRead and sinceChange are what LeaseView reports.
	sinceRead, sinceChange time.Duration
	leader                 string
	epoch                  uint64
	open                   bool
	observed               []uint64
	nudged                 int
	asked                  int // Leader() calls
}

func (f *fakeLeadership) WriteGate() (uint64, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.epoch, f.open
}

func (f *fakeLeadership) Leader() (string, uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.asked++
	return f.leader, f.epoch
}

func (f *fakeLeadership) leaderCalls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.asked
}

func (f *fakeLeadership) ObserveEpoch(e uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.observed = append(f.observed, e)
	if e > f.epoch && f.open {
		f.open = false
	}
}

// LeaseView: the Lease was read and changed just now, unless a test says
// otherwise.
func (f *fakeLeadership) LeaseView() (time.Duration, time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sinceRead, f.sinceChange
}

func (f *fakeLeadership) Nudge() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.nudged++
}

// nudges is how many times Nudge ran. It takes the lock: the handler that
// nudged ran on another goroutine, and the reply that came back over a
// socket orders nothing for the race detector.
func (f *fakeLeadership) nudges() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.nudged
}

func (f *fakeLeadership) HintLeader(id string, epoch uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if epoch > f.epoch {
		f.leader, f.epoch = id, epoch
	}
}

func (f *fakeLeadership) set(leader string, epoch uint64, open bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.leader, f.epoch, f.open = leader, epoch, open
}

// pair is a leader and a follower on loopback; peers maps ids to addresses
// and may be changed by a test (e.g. to point at a broken leader).
type pair struct {
	leader, follower     *testNode
	leaderLS, followerLS *fakeLeadership
	peersMu              sync.Mutex
	peers                map[string]string
	leaderHS             *httptest.Server
	leaderWrap           func(http.Handler) http.Handler
}

func newPair(t *testing.T, leaderWrap func(http.Handler) http.Handler) *pair {
	p := &pair{leaderLS: &fakeLeadership{}, followerLS: &fakeLeadership{}, peers: map[string]string{}}
	peerAddr := func(id string) (string, error) {
		p.peersMu.Lock()
		defer p.peersMu.Unlock()
		return p.peers[id], nil
	}
	start := func(id string, ls *fakeLeadership, wrap func(http.Handler) http.Handler) *testNode {
		return startNode(t, nodeOpts{
			api:  Config{NodeID: id, PeerAddr: peerAddr, PeerToken: testToken},
			node: node.Config{Leadership: ls, Peers: realPeers(t, peerAddr), ForwardTimeout: 500 * time.Millisecond, Members: func() []string { return []string{"n-leader", "n-follower"} }},
			wrap: wrap,
		})
	}
	p.leader = start("n-leader", p.leaderLS, leaderWrap)
	p.follower = start("n-follower", p.followerLS, nil)
	p.peers["n-leader"] = strings.TrimPrefix(p.leader.url, "http://")
	p.peers["n-follower"] = strings.TrimPrefix(p.follower.url, "http://")
	p.leaderLS.set("n-leader", 3, true)
	p.followerLS.set("n-leader", 3, false)
	return p
}

// realPeers is the transport a node of cmd/store uses: typed calls over
// one multiplexed connection per peer, plain HTTP for a peer that refuses
// it.
func realPeers(t testing.TB, addr func(string) (string, error)) *transport.HTTP {
	streams := &peerhttp.Transport{
		Path:        PeerStreamPath,
		Header:      http.Header{HeaderPeerToken: {testToken}},
		Fallback:    &http.Transport{Proxy: nil},
		DialTimeout: time.Second,
	}
	t.Cleanup(func() { _ = streams.Close() })
	peers, err := transport.NewHTTP(transport.HTTPConfig{Addr: addr, Token: testToken, RoundTripper: streams})
	if err != nil {
		t.Fatal(err)
	}
	return peers
}

func TestForward_FollowerWriteLandsOnLeader(t *testing.T) {
	p := newPair(t, nil)
	r := p.follower.do("PUT", "/v1/kv/a", `{"x":1}`)
	if r.status != 201 || r.header.Get(HeaderLeader) != "n-leader" || r.header.Get(HeaderEpoch) != "3" || r.header.Get("ETag") != `"3.1"` {
		t.Fatalf("PUT via follower: %d %v %s", r.status, r.header, r.body)
	}
	if _, err := p.leader.db.Get("a"); err != nil {
		t.Fatalf("leader lacks the write: %v", err)
	}
	if p.follower.db.LastSeq() != 0 {
		t.Fatal("follower applied the write itself")
	}
	// Reads are served by the leader too, through the follower.
	if g := p.follower.do("GET", "/v1/kv/a", ""); g.status != 200 || g.body != `{"x":1}` {
		t.Fatalf("GET via follower: %d %s", g.status, g.body)
	}
	// Bad input is refused by the follower without bothering the leader.
	if b := p.follower.do("PUT", "/v1/kv/a", `{`); b.status != 400 {
		t.Fatalf("invalid JSON via follower: %d", b.status)
	}
	// The forwarded request told the leader which epoch the follower saw.
	if got := p.leaderLS.observed; len(got) == 0 || got[0] != 3 {
		t.Fatalf("leader observed epochs %v, want 3", got)
	}
}

const testToken = "0123456789abcdef-test"

func TestForward_ForwardedRequestIsNeverForwardedAgain(t *testing.T) {
	p := newPair(t, nil)
	r := p.follower.do("PUT", "/v1/kv/a", `1`, HeaderForwarded, "n-other", HeaderPeerToken, testToken)
	if r.status != 503 || errorCode(t, r.body) != "not_leader" || r.header.Get("Retry-After") == "" {
		t.Fatalf("forwarded PUT at a follower: %d %s", r.status, r.body)
	}
	if p.leader.db.LastSeq() != 0 {
		t.Fatal("a forwarded request was forwarded again")
	}
}

func TestForward_RedirectAnswers307ToTheLeader(t *testing.T) {
	p := newPair(t, nil)
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	req, _ := http.NewRequest("PUT", p.follower.url+"/v1/kv/k?redirect=true&ack=all", strings.NewReader("1"))
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	want := "http://" + p.peers["n-leader"] + "/v1/kv/k?redirect=true&ack=all"
	if resp.StatusCode != 307 || resp.Header.Get("Location") != want {
		t.Fatalf("redirect = %d %q, want 307 %q", resp.StatusCode, resp.Header.Get("Location"), want)
	}
	if p.leader.db.LastSeq() != 0 || p.follower.db.LastSeq() != 0 {
		t.Fatal("a redirect applied the write")
	}
}

func TestForward_NoLeaderIs503AfterWaiting(t *testing.T) {
	p := newPair(t, nil)
	p.followerLS.set("", 0, false)
	start := time.Now()
	r := p.follower.do("PUT", "/v1/kv/a", `1`)
	if r.status != 503 || errorCode(t, r.body) != "no_leader" || r.header.Get("Retry-After") == "" {
		t.Fatalf("no leader: %d %s", r.status, r.body)
	}
	if waited := time.Since(start); waited < 400*time.Millisecond {
		t.Fatalf("gave up after %s, before the forward timeout", waited)
	}
}

func TestForward_NoLeaderThenElected_WriteGoesThrough(t *testing.T) {
	p := newPair(t, nil)
	p.followerLS.set("", 0, false)
	before := p.followerLS.leaderCalls()
	go func() {
		// The election finishes while the request is waiting: once the
		// follower has asked for the leader twice, it is in its wait loop.
		for p.followerLS.leaderCalls() < before+2 {
			time.Sleep(time.Millisecond)
		}
		p.followerLS.set("n-leader", 3, false)
	}()
	if r := p.follower.do("PUT", "/v1/kv/a", `1`); r.status != 201 {
		t.Fatalf("write during an election: %d %s", r.status, r.body)
	}
}

func TestForward_LeaderUnreachable_503NothingApplied(t *testing.T) {
	p := newPair(t, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close() // connection refused from now on
	p.peersMu.Lock()
	p.peers["n-leader"] = dead
	p.peersMu.Unlock()
	r := p.follower.do("PUT", "/v1/kv/a", `1`)
	if r.status != 503 || errorCode(t, r.body) != "no_leader" {
		t.Fatalf("unreachable leader: %d %s", r.status, r.body)
	}
}

func TestForward_LeaderHangs_504OutcomeUnknown(t *testing.T) {
	for _, tc := range []struct {
		name string
		wrap func(release <-chan struct{}) func(http.Handler) http.Handler
	}{
		// The leader accepted the peer connection and then stopped
		// answering (paused): the write went out over it.
		{"peer stream", func(release <-chan struct{}) func(http.Handler) http.Handler {
			return func(http.Handler) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					conn, _, err := w.(http.Hijacker).Hijack()
					if err != nil {
						return
					}
					defer conn.Close()
					_, _ = io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "+peerhttp.Protocol+"\r\n\r\n")
					go func() { _, _ = io.Copy(io.Discard, conn) }()
					<-release
				})
			}
		}},
		// A leader without peer streams takes the request and hangs.
		{"plain HTTP", func(release <-chan struct{}) func(http.Handler) http.Handler {
			return func(http.Handler) http.Handler {
				return refuseStreams(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { <-release }))
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			release := make(chan struct{})
			p := newPair(t, tc.wrap(release))
			defer close(release)
			r := p.follower.do("PUT", "/v1/kv/a", `1`)
			if r.status != 504 || errorCode(t, r.body) != "outcome_unknown" {
				t.Fatalf("hung leader: %d %s", r.status, r.body)
			}
		})
	}
}

// Forwarded writes share one upgraded connection to the leader instead of
// one HTTP request each; the endpoint refuses anyone without the token and
// any request that is not an upgrade.
func TestForward_WritesTravelOverOnePeerStream(t *testing.T) {
	var upgrades, plain atomic.Int32
	p := newPair(t, func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == PeerStreamPath {
				upgrades.Add(1)
			} else {
				plain.Add(1)
			}
			next.ServeHTTP(w, r)
		})
	})
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Go(func() {
			if r := p.follower.do("PUT", fmt.Sprintf("/v1/kv/k%d", i), `1`); r.status != 201 || r.header.Get(HeaderLeader) != "n-leader" {
				t.Errorf("PUT via follower: %d %s", r.status, r.body)
			}
		})
	}
	wg.Wait()
	if upgrades.Load() != 1 || plain.Load() != 0 {
		t.Fatalf("%d upgrades and %d plain requests at the leader, want 1 and 0", upgrades.Load(), plain.Load())
	}
	if r := p.leader.do("GET", PeerStreamPath, "", "Connection", "Upgrade", "Upgrade", peerhttp.Protocol); r.status != 401 {
		t.Errorf("upgrade without the token: %d %s", r.status, r.body)
	}
	if r := p.leader.do("GET", PeerStreamPath, "", HeaderPeerToken, testToken); r.status != 426 || errorCode(t, r.body) != "upgrade_required" {
		t.Errorf("plain GET of the stream endpoint: %d %s", r.status, r.body)
	}
	// A connection that cannot be taken over (here: no connection at all).
	req := httptest.NewRequest(http.MethodGet, PeerStreamPath, nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", peerhttp.Protocol)
	req.Header.Set(HeaderPeerToken, testToken)
	rec := httptest.NewRecorder()
	p.leader.srv.ServeHTTP(rec, req)
	if rec.Code != 501 || errorCode(t, rec.Body.String()) != "upgrade_unsupported" {
		t.Errorf("upgrade on a connection that cannot be hijacked: %d %s", rec.Code, rec.Body.String())
	}
}

// refuseStreams answers the peer-stream upgrade with 404, as a node of an
// older version would, so that forwarded requests travel as plain HTTP
// requests: the wrappers of these tests then see, and can break, each one.
func refuseStreams(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == PeerStreamPath {
			http.NotFound(w, r)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// The leader applies a write but the connection drops before the answer:
// the follower retries with the same request id and the write is applied once.
func TestForward_DroppedAnswer_RetryAppliesOnce(t *testing.T) {
	var drops atomic.Int32
	// Over plain HTTP, where the wrapper sees each request; over a peer
	// stream a lost answer is a broken connection, which peerhttp reports
	// as possibly served (TestTransport_ConnectionCut_...), and the retry
	// below is the same.
	p := newPair(t, func(next http.Handler) http.Handler {
		return refuseStreams(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if drops.Add(1) == 1 {
				next.ServeHTTP(httptest.NewRecorder(), r) // applied...
				conn, _, err := w.(http.Hijacker).Hijack()
				if err == nil {
					conn.Close() // ...but the answer is lost
				}
				return
			}
			next.ServeHTTP(w, r)
		}))
	})
	r := p.follower.do("PUT", "/v1/kv/a", `1`)
	if r.status != 201 || r.header.Get("ETag") != `"3.1"` {
		t.Fatalf("after a dropped answer: %d %s etag %s", r.status, r.body, r.header.Get("ETag"))
	}
	if n := p.leader.db.LastSeq(); n != 1 {
		t.Fatalf("leader applied the write %d times", n)
	}
	// The same for a DELETE, which has no body: its retry must not turn a
	// delete that happened into a 404.
	drops.Store(0)
	r = p.follower.do("DELETE", "/v1/kv/a", "")
	if r.status != 200 || !strings.Contains(r.body, `"deleted":true`) {
		t.Fatalf("DELETE after a dropped answer: %d %s", r.status, r.body)
	}
	if n := p.leader.db.LastSeq(); n != 2 {
		t.Fatalf("leader applied %d writes, want 2", n)
	}
}

// A leader whose term is older than what the follower has seen steps down
// instead of applying the write.
func TestForward_SeenEpochDeposesAnOlderLeader(t *testing.T) {
	p := newPair(t, nil)
	p.followerLS.set("n-leader", 4, false) // the follower already saw epoch 4
	r := p.follower.do("PUT", "/v1/kv/a", `1`)
	if r.status/100 == 2 {
		t.Fatalf("an epoch-3 leader applied a write forwarded under epoch 4: %d", r.status)
	}
	if _, open := p.leaderLS.WriteGate(); open || p.leader.db.LastSeq() != 0 {
		t.Fatal("the superseded leader kept writing")
	}
}

func TestPeerAddrFromTemplate(t *testing.T) {
	tests := []struct {
		tmpl, id, want string
		wantErr        bool
	}{
		{"{id}.store-peers.{namespace}.svc:8080", "store-0", "store-0.store-peers.prod.svc:8080", false},
		{"127.0.0.{ordinal}:9000", "store-3", "127.0.0.3:9000", false},
		{"127.0.0.{ordinal}:9000", "store", "", true},
		{"{id}", "store-0", "", true}, // no port
	}
	for _, tt := range tests {
		f, err := PeerAddrFromTemplate(tt.tmpl, "prod")
		if err != nil {
			t.Fatal(err)
		}
		got, err := f(tt.id)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("%s(%s) = %q, %v; want %q", tt.tmpl, tt.id, got, err, tt.want)
		}
	}
	if _, err := PeerAddrFromTemplate("static:80", "prod"); err == nil {
		t.Error("a template without {id} or {ordinal} was accepted")
	}
}

// A client that can reach the port cannot pose as a node: the peer headers
// without the cluster token (or with a wrong one) are refused, change
// nothing, and depose nobody.
func TestForward_PeerHeadersNeedTheToken(t *testing.T) {
	for _, hdr := range [][]string{
		{HeaderForwarded, "store-9"},
		{HeaderSeenEpoch, "99"},
		{HeaderSeenEpoch, "99", HeaderPeerToken, "wrong-token-wrong-token"},
		{HeaderPeerToken, testToken + "x"},
	} {
		p := newPair(t, nil)
		r := p.leader.do("PUT", "/v1/kv/a", `1`, hdr...)
		if r.status != 401 || errorCode(t, r.body) != "peer_unauthenticated" {
			t.Fatalf("%v: %d %s", hdr, r.status, r.body)
		}
		if strings.Contains(r.body, testToken) {
			t.Fatal("the error body shows the token")
		}
		if _, open := p.leaderLS.WriteGate(); !open || p.leader.db.LastSeq() != 0 || len(p.leaderLS.observed) != 0 {
			t.Fatalf("%v: a refused request had an effect", hdr)
		}
	}
}

func TestLeaseReleased_NudgesPeersWithTheTokenOnly(t *testing.T) {
	p := newPair(t, nil)
	if r := p.follower.do("POST", transport.LeaseReleasedPath, ""); r.status != 401 {
		t.Fatalf("without the token: %d %s", r.status, r.body)
	}
	p.leader.nd.NotifyLeaseReleased(context.Background())
	if f, l := p.followerLS.nudges(), p.leaderLS.nudges(); f != 1 || l != 0 {
		t.Fatalf("nudged follower %d, leader %d; want 1 and 0", f, l)
	}
}

func TestLeaderHint_FollowerRoutesToTheNewLeaderAtOnce(t *testing.T) {
	p := newPair(t, nil)
	p.followerLS.set("n-gone", 2, false) // still believes in a dead leader
	p.leader.nd.NotifyLeader(context.Background(), 3)
	if id, ep := p.followerLS.Leader(); id != "n-leader" || ep != 3 {
		t.Fatalf("follower after the hint: %s %d", id, ep)
	}
	if r := p.follower.do("PUT", "/v1/kv/a", `1`); r.status != 201 || r.header.Get(HeaderLeader) != "n-leader" {
		t.Fatalf("write after the hint: %d %s", r.status, r.body)
	}
	if r := p.follower.do("POST", transport.LeaderPath, `{"leader":"x","epoch":9}`); r.status != 401 {
		t.Fatalf("hint without the token: %d", r.status)
	}
	if r := p.follower.do("POST", transport.LeaderPath, `{"leader":""}`, HeaderPeerToken, testToken); r.status != 400 {
		t.Fatalf("malformed hint: %d", r.status)
	}
}

// gateClosingStore closes the leader's gate while a write is being
// committed, as a lost renewal during an fsync would.
type gateClosingStore struct {
	*storage.DB
	ls *fakeLeadership
}

func (g gateClosingStore) Apply(ctx context.Context, m storage.Mutation) (storage.Result, error) {
	res, err := g.DB.Apply(ctx, m)
	g.ls.set("n-leader", 3, false)
	return res, err
}

// README: "2xx: applied and fsynced by the leader of the epoch in
// X-Store-Epoch"; a write whose gate closed during the fsync is not
// acknowledged but reported as outcome_unknown.
func TestLeader_GateClosesDuringCommit_OutcomeUnknownNotAck(t *testing.T) {
	ls := &fakeLeadership{}
	ls.set("n-leader", 3, true)
	n := startNode(t, nodeOpts{
		api:   Config{NodeID: "n-leader", PeerToken: testToken, PeerAddr: func(string) (string, error) { return "127.0.0.1:1", nil }},
		node:  node.Config{Leadership: ls, Peers: transport.NewInMem().Client("n-leader"), ForwardTimeout: 300 * time.Millisecond},
		store: func(db *storage.DB) node.Store { return gateClosingStore{db, ls} },
	})
	r := n.do("PUT", "/v1/kv/a", `1`)
	if r.status != 502 || errorCode(t, r.body) != "outcome_unknown" || r.header.Get(HeaderLeader) != "" {
		t.Fatalf("write whose gate closed during commit: %d %s leader %q", r.status, r.body, r.header.Get(HeaderLeader))
	}
}

// A leader of a term older than this node's fence is refused with 503
// stale_epoch, which promises nothing was applied.
func TestLeader_StaleEpochIs503NotApplied(t *testing.T) {
	p := newPair(t, nil)
	if _, err := p.leader.db.ApplyReplicated(context.Background(), 9, []storage.Entry{{Key: "x", Value: []byte("1"), Version: storage.Version{Epoch: 9, Seq: 1}}}); err != nil {
		t.Fatal(err)
	}
	before := p.leader.db.LastSeq()
	r := p.leader.do("PUT", "/v1/kv/a", `1`) // the leader's term is 3 < 9
	if r.status != 503 || errorCode(t, r.body) != "stale_epoch" {
		t.Fatalf("write under a stale term: %d %s", r.status, r.body)
	}
	if _, err := p.leader.db.Get("a"); err == nil || p.leader.db.LastSeq() != before {
		t.Fatal("a refused write was applied")
	}
}

// Item 5: in cluster mode a HEAD of a key goes through the node exactly as
// a GET does: proxied to the replica that serves it, or redirected.
func TestForward_HeadOfKeyGoesThroughTheNode(t *testing.T) {
	p := newPair(t, nil)
	put := p.follower.do("PUT", "/v1/kv/h", `{"x":"head"}`)
	get := p.follower.do("GET", "/v1/kv/h", "")
	head := p.follower.do("HEAD", "/v1/kv/h", "")
	if head.status != 200 || head.body != "" || head.header.Get("ETag") != put.header.Get("ETag") ||
		head.header.Get("Content-Length") != strconv.Itoa(len(`{"x":"head"}`)) {
		t.Fatalf("HEAD via follower = %d %v %q", head.status, head.header, head.body)
	}
	// The follower holds nothing: the answer came through the node.
	if p.follower.db.LastSeq() != 0 {
		t.Fatal("the follower applied the write itself")
	}
	if head.header.Get("Content-Type") != "application/json" {
		t.Errorf("HEAD Content-Type = %q", head.header.Get("Content-Type"))
	}
	for _, h := range []string{HeaderServedBy, HeaderConsistency, HeaderLastContact, "Content-Type"} {
		if head.header.Get(h) != get.header.Get(h) {
			t.Errorf("HEAD %s = %q, GET's = %q", h, head.header.Get(h), get.header.Get(h))
		}
	}
	if r := p.follower.do("HEAD", "/v1/kv/missing", ""); r.status != 404 || r.body != "" {
		t.Fatalf("HEAD of a missing key via follower = %d %q", r.status, r.body)
	}
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Head(p.follower.url + "/v1/kv/h?redirect=true")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 307 || !strings.HasSuffix(resp.Header.Get("Location"), "/v1/kv/h?redirect=true") {
		t.Fatalf("HEAD ?redirect=true = %d %q", resp.StatusCode, resp.Header.Get("Location"))
	}
}
