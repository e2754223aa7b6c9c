package peerhttp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const upgradePath = "/internal/stream"

// peerServer is an httptest server whose upgrade endpoint serves handler
// over peer connections and whose other paths serve it over plain HTTP.
type peerServer struct {
	*httptest.Server
	peer     *Server
	upgrades atomic.Int64
}

func newPeerServer(t *testing.T, handler http.Handler, offer bool) *peerServer {
	t.Helper()
	ps := &peerServer{peer: &Server{Handler: handler}}
	ps.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == upgradePath && offer {
			if err := ps.peer.Upgrade(w, r); err != nil {
				http.Error(w, err.Error(), http.StatusServiceUnavailable)
				return
			}
			ps.upgrades.Add(1)
			return
		}
		handler.ServeHTTP(w, r)
	}))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = ps.peer.Shutdown(ctx)
		ps.Close()
	})
	return ps
}

func newTransport(t *testing.T) *Transport {
	t.Helper()
	tr := &Transport{Path: upgradePath, Header: http.Header{"X-Token": {"secret"}}, Fallback: &http.Transport{}}
	t.Cleanup(func() { _ = tr.Close() })
	return tr
}

// echo answers with what it received.
var echo = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	w.Header().Set("X-Echo-Method", r.Method)
	w.Header().Set("X-Echo-Uri", r.RequestURI)
	w.Header()["X-Echo-Multi"] = r.Header.Values("X-Multi")
	w.Header().Set("X-Echo-Host", r.Host)
	w.WriteHeader(http.StatusAccepted)
	_, _ = w.Write(body)
})

func do(t *testing.T, client *http.Client, method, url string, body []byte, hdr http.Header) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, vs := range hdr {
		req.Header[k] = vs
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, got
}

func TestTransport_ConcurrentRequests_ShareOneConnection_AnswersMatch(t *testing.T) {
	ps := newPeerServer(t, echo, true)
	client := &http.Client{Transport: newTransport(t)}
	const n = 300
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			body := []byte(fmt.Sprintf(`{"n":%d,"pad":%q}`, i, strings.Repeat("x", i*37)))
			path := fmt.Sprintf("/v1/kv/k%d?ack=quorum&x=%%2F", i)
			resp, got := do(t, client, http.MethodPut, ps.URL+path, body, http.Header{"X-Multi": {"a", fmt.Sprint(i)}})
			if resp.StatusCode != http.StatusAccepted || !bytes.Equal(got, body) ||
				resp.Header.Get("X-Echo-Uri") != path || resp.Header.Get("X-Echo-Method") != http.MethodPut ||
				strings.Join(resp.Header.Values("X-Echo-Multi"), ",") != "a,"+fmt.Sprint(i) ||
				resp.Header.Get("X-Echo-Host") != strings.TrimPrefix(ps.URL, "http://") {
				t.Errorf("request %d: got %d %v %q", i, resp.StatusCode, resp.Header, got)
			}
		})
	}
	wg.Wait()
	if got := ps.upgrades.Load(); got != 1 {
		t.Errorf("%d upgraded connections for %d concurrent requests, want 1", got, n)
	}
	// A GET without a body works too.
	if resp, got := do(t, client, http.MethodGet, ps.URL+"/x", nil, nil); resp.StatusCode != http.StatusAccepted || len(got) != 0 {
		t.Errorf("GET: %d %q", resp.StatusCode, got)
	}
}

func TestTransport_PeerWithoutUpgrade_UsesFallback(t *testing.T) {
	ps := newPeerServer(t, echo, false)
	client := &http.Client{Transport: newTransport(t)}
	for i := range 3 {
		resp, got := do(t, client, http.MethodPut, ps.URL+"/k", []byte(fmt.Sprint(i)), nil)
		if resp.StatusCode != http.StatusAccepted || string(got) != fmt.Sprint(i) {
			t.Fatalf("through the fallback: %d %q", resp.StatusCode, got)
		}
	}
	// A GET goes through the fallback too, with no body at all.
	var te atomic.Value
	inner := ps.Config.Handler
	ps.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		te.Store(fmt.Sprint(r.TransferEncoding))
		inner.ServeHTTP(w, r)
	})
	if resp, _ := do(t, client, http.MethodGet, ps.URL+"/k", nil, nil); resp.StatusCode != http.StatusAccepted || te.Load() != "[]" {
		t.Fatalf("GET through the fallback: %d, transfer encoding %v", resp.StatusCode, te.Load())
	}
	if got := ps.upgrades.Load(); got != 0 {
		t.Errorf("%d upgrades on a peer that offers none", got)
	}
}

func TestTransport_UpgradeCarriesHeader(t *testing.T) {
	var token atomic.Value
	ps := newPeerServer(t, echo, true)
	inner := ps.Config.Handler
	ps.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == upgradePath {
			token.Store(r.Header.Get("X-Token"))
		}
		inner.ServeHTTP(w, r)
	})
	do(t, &http.Client{Transport: newTransport(t)}, http.MethodGet, ps.URL+"/x", nil, nil)
	if got, _ := token.Load().(string); got != "secret" {
		t.Errorf("upgrade request carried X-Token %q, want the transport's Header", got)
	}
}

func TestTransport_DialRefused_IsDialError(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, err = (&http.Client{Transport: newTransport(t)}).Get("http://" + addr + "/x")
	var op *net.OpError
	if !errors.As(err, &op) || op.Op != "dial" {
		t.Fatalf("error %v: want a *net.OpError with Op dial (never sent)", err)
	}
}

func TestTransport_CallerGivesUp_ConnectionStillServesOthers(t *testing.T) {
	release := make(chan struct{})
	ps := newPeerServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			<-release
		}
		_, _ = io.WriteString(w, r.URL.Path)
	}), true)
	defer close(release)
	client := &http.Client{Transport: newTransport(t)}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, ps.URL+"/slow", nil)
	if _, err := client.Do(req); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("slow request: %v, want the caller's deadline", err)
	}
	if resp, got := do(t, client, http.MethodGet, ps.URL+"/fast", nil, nil); resp.StatusCode != http.StatusOK || string(got) != "/fast" {
		t.Fatalf("after a abandoned request: %d %q", resp.StatusCode, got)
	}
	if got := ps.upgrades.Load(); got != 1 {
		t.Errorf("%d connections, want the first one reused", got)
	}
}

func TestServer_HandlerPanics_Answers500_ConnectionSurvives(t *testing.T) {
	ps := newPeerServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/panic" {
			panic("boom")
		}
		w.WriteHeader(http.StatusNoContent)
	}), true)
	client := &http.Client{Transport: newTransport(t)}
	if resp, got := do(t, client, http.MethodGet, ps.URL+"/panic", nil, nil); resp.StatusCode != http.StatusInternalServerError || !strings.Contains(string(got), "boom") {
		t.Fatalf("panicking handler: %d %q", resp.StatusCode, got)
	}
	if resp, _ := do(t, client, http.MethodGet, ps.URL+"/ok", nil, nil); resp.StatusCode != http.StatusNoContent {
		t.Fatalf("after the panic: %d", resp.StatusCode)
	}
}

// TestServer_Shutdown_ServesWhatItRead_GoAwayNamesTheRest speaks the
// protocol by hand to control exactly which frames were read: request 1 is
// being served when Shutdown begins, request 2 is sent after the GOAWAY.
func TestServer_Shutdown_ServesWhatItRead_GoAwayNamesTheRest(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	var served sync.Map
	ps := newPeerServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		served.Store(r.URL.Path, true)
		if r.URL.Path == "/one" {
			close(entered)
			<-release
		}
		_, _ = io.WriteString(w, "done "+r.URL.Path)
	}), true)
	conn, err := net.Dial("tcp", strings.TrimPrefix(ps.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n", upgradePath, Protocol)
	r := bufio.NewReader(conn)
	if resp, err := http.ReadResponse(r, nil); err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	send := func(id uint64, path string) {
		req, _ := http.NewRequest(http.MethodGet, "http://x"+path, nil)
		if _, err := conn.Write(appendRequest(nil, id, req, nil, 0)); err != nil {
			t.Fatal(err)
		}
	}
	send(1, "/one")
	<-entered
	shut := make(chan error, 1)
	go func() { shut <- ps.peer.Shutdown(context.Background()) }()

	f, err := readFrame(r, MaxFrameBytes)
	if err != nil || f.kind != kindGoAway || f.id != 1 {
		t.Fatalf("first frame after Shutdown: %+v %v, want GOAWAY naming request 1", f, err)
	}
	send(2, "/two")
	close(release)
	f, err = readFrame(r, MaxFrameBytes)
	if err != nil || f.kind != kindResponse || f.id != 1 {
		t.Fatalf("want the answer to request 1, got %+v %v", f, err)
	}
	if resp, err := decodeResponse(f.payload); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("answer to request 1: %v %v", resp, err)
	}
	if _, err := readFrame(r, MaxFrameBytes); !errors.Is(err, io.EOF) {
		t.Fatalf("after the last answer: %v, want the connection closed", err)
	}
	conn.Close() // as a Transport does on EOF; the server waits for it
	if err := <-shut; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if _, ok := served.Load("/two"); ok {
		t.Error("request 2, sent after the GOAWAY, was served")
	}
}

func TestTransport_ServerShutsDown_InFlightAnswered_NextRequestNotSent(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	ps := newPeerServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			close(entered)
			<-release
		}
		_, _ = io.WriteString(w, r.URL.Path)
	}), true)
	client := &http.Client{Transport: newTransport(t)}
	slow := make(chan error, 1)
	go func() {
		resp, err := client.Get(ps.URL + "/slow")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(body) != "/slow" {
				err = fmt.Errorf("body %q", body)
			}
		}
		slow <- err
	}()
	<-entered
	shut := make(chan error, 1)
	go func() { shut <- ps.peer.Shutdown(context.Background()) }()
	close(release)
	if err := <-slow; err != nil {
		t.Fatalf("request in flight during Shutdown: %v", err)
	}
	if err := <-shut; err != nil {
		t.Fatal(err)
	}
	// The peer refuses new upgrades now (503): the next request fails as
	// never sent, so the caller may take it to another node.
	_, err := client.Get(ps.URL + "/after")
	var op *net.OpError
	if !errors.As(err, &op) || op.Op != "dial" {
		t.Fatalf("request after Shutdown: %v, want a dial error (never sent)", err)
	}
}

func TestTransport_ConnectionCut_WaitingRequestIsNotADialError(t *testing.T) {
	entered := make(chan struct{})
	ps := newPeerServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(entered)
		<-r.Context().Done() // the peer went away
	}), true)
	tr := newTransport(t)
	errc := make(chan error, 1)
	go func() {
		_, err := (&http.Client{Transport: tr}).Get(ps.URL + "/x")
		errc <- err
	}()
	<-entered
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_ = ps.peer.Shutdown(ctx) // an expired context closes at once
	// The cancelled handler may still return in time for its (empty)
	// answer to go out before the connection closes, or the connection may
	// close first; either way the request was read, so it must never come
	// back as a dial error ("never sent"), which would invite a resend.
	err := <-errc
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		t.Fatalf("got %v: a request the peer read and then lost must not look unsent", err)
	}
}

func TestServer_NotAnUpgrade_ErrNotUpgrade(t *testing.T) {
	rec := httptest.NewRecorder()
	err := (&Server{Handler: echo}).Upgrade(rec, httptest.NewRequest(http.MethodGet, upgradePath, nil))
	if !errors.Is(err, ErrNotUpgrade) || rec.Body.Len() != 0 {
		t.Fatalf("got %v and %q written, want ErrNotUpgrade and nothing written", err, rec.Body.String())
	}
}

// A peer that accepts the connection and then reads nothing (dead, or
// paused with full socket buffers) costs the connection after WriteTimeout:
// requests queued behind the stuck write fail as never sent, the one being
// written as possibly sent, and the next request connects again instead of
// queueing on the dead connection.
func TestTransport_PeerStopsReading_ConnectionDropped_QueuedRequestsNotSent(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var upgrades atomic.Int32
	var held sync.WaitGroup
	stop := make(chan struct{})
	defer func() { close(stop); held.Wait() }()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			held.Go(func() {
				defer conn.Close()
				if _, err := http.ReadRequest(bufio.NewReader(conn)); err != nil {
					return
				}
				upgrades.Add(1)
				fmt.Fprintf(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n", Protocol)
				<-stop // and never read again
			})
		}
	}()
	addr := ln.Addr().String()
	tr := &Transport{Path: upgradePath, Fallback: &http.Transport{}, WriteTimeout: 300 * time.Millisecond}
	defer tr.Close()
	client := &http.Client{Transport: tr}
	put := func(size int) error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodPut, "http://"+addr+"/k", bytes.NewReader(make([]byte, size)))
		_, err := client.Do(req)
		return err
	}
	isDial := func(err error) bool {
		var op *net.OpError
		return errors.As(err, &op) && op.Op == "dial"
	}
	// 32 MiB cannot all leave: a peer that never reads keeps its receive
	// window at the initial size (the kernel grows it only as the
	// application reads), and the send buffer holds at most a few MiB.
	big := make(chan error, 1)
	go func() { big <- put(32 << 20) }()
	waitUntil(t, "the writer took the big frame", func() bool {
		tr.mu.Lock()
		p := tr.peers[addr]
		tr.mu.Unlock()
		if p == nil {
			return false
		}
		p.mu.Lock()
		c := p.conn
		p.mu.Unlock()
		if c == nil {
			return false
		}
		c.w.mu.Lock()
		defer c.w.mu.Unlock()
		return len(c.w.buf) == 0 && len(c.w.queued) == 0 && c.nextIDForTest() == 1
	})
	var wg sync.WaitGroup
	for range 5 {
		wg.Go(func() {
			if err := put(100); !isDial(err) {
				t.Errorf("request queued behind the stuck write: %v, want a dial error (never sent)", err)
			}
		})
	}
	wg.Wait()
	if err := <-big; err == nil || isDial(err) {
		t.Errorf("the request being written: %v, want a connection error (possibly sent)", err)
	}
	// The next request connects again (and, this peer reading nothing,
	// times out there).
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/k", nil)
	if _, err := client.Do(req); err == nil {
		t.Error("a peer that reads nothing answered")
	}
	if got := upgrades.Load(); got != 2 {
		t.Errorf("%d upgrades, want 2: the transport must drop the dead connection and connect again", got)
	}
}

func (c *clientConn) nextIDForTest() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nextID
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// Shutdown whose context has run out cancels the handlers still running
// but returns only once they are done: a handler finishing a commit after
// Shutdown returned could race whatever its caller does next.
func TestServer_ShutdownExpired_WaitsForCancelledHandlers(t *testing.T) {
	entered := make(chan struct{})
	var finished atomic.Bool
	ps := newPeerServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(entered)
		<-r.Context().Done()
		time.Sleep(100 * time.Millisecond) // the work it had started
		finished.Store(true)
	}), true)
	go func() { _, _ = (&http.Client{Transport: newTransport(t)}).Get(ps.URL + "/x") }()
	<-entered
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := ps.peer.Shutdown(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Shutdown: %v, want the context's error", err)
	}
	if !finished.Load() {
		t.Fatal("Shutdown returned while a cancelled handler was still running")
	}
}

// A frame's declared length is a claim, not an allocation: a peer that
// declares a large frame and sends a little costs what it sent, and one
// over the limit is refused before anything is read.
func TestReadFrame_AllocatesWhatArrives_RefusesOverLimit(t *testing.T) {
	header := func(n uint32) []byte {
		b := binary.BigEndian.AppendUint32(nil, n)
		b = append(b, kindRequest)
		return binary.BigEndian.AppendUint64(b, 7)
	}
	tests := []struct {
		name      string
		declared  uint32
		sent      int
		limit     int
		wantErr   error
		maxAllocs uint64 // bytes allocated while reading, at most
	}{
		// The counter is the process's, so the bounds leave room for
		// whatever else runs; they are far below the declared sizes.
		// A frame just past a power of two: the steps end at its size,
		// together at most twice it.
		{"whole frame", 3<<20 + 5, 3<<20 + 5, 8 << 20, nil, 2*(3<<20+5) + 1<<20},
		{"whole frame past a power of two", 1<<20 + 100, 1<<20 + 100, 8 << 20, nil, 2*(1<<20+100) + 1<<20},
		{"declares 512 MiB, sends 100 KiB", 512 << 20, 100 << 10, 1 << 30, errBadFrame, 16 << 20},
		{"declares 900 MiB over an 8 MiB limit", 900 << 20, 100 << 10, 8 << 20, errFrameTooLarge, 16 << 20},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := append(header(tt.declared), make([]byte, tt.sent)...)
			r := bufio.NewReader(bytes.NewReader(in))
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			f, err := readFrame(r, tt.limit)
			runtime.ReadMemStats(&after)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("readFrame: %v, want %v", err, tt.wantErr)
			}
			if tt.wantErr == nil && (len(f.payload) != tt.sent || f.id != 7) {
				t.Fatalf("frame id %d with %d bytes, want id 7 with %d", f.id, len(f.payload), tt.sent)
			}
			// A body decoded from the frame keeps it: no slack past it.
			if tt.wantErr == nil && cap(f.payload) != tt.sent {
				t.Errorf("payload of %d bytes in a buffer of %d", len(f.payload), cap(f.payload))
			}
			if got := after.TotalAlloc - before.TotalAlloc; got > tt.maxAllocs {
				t.Fatalf("allocated %d bytes reading it, want at most %d", got, tt.maxAllocs)
			}
		})
	}
}

// Large bodies go out by reference (frameWriter.send's tail) between small
// frames queued around them; every request and answer still arrives whole
// and in its own frame, and the answer's body is handed over in place.
func TestTransport_LargeAndSmallBodiesInterleaved_ArriveWhole(t *testing.T) {
	ps := newPeerServer(t, echo, true)
	client := &http.Client{Transport: newTransport(t)}
	sizes := []int{0, 1, tailBytes - 1, tailBytes, tailBytes + 1, 1 << 20, 3<<20 + 7}
	var wg sync.WaitGroup
	for i := range 8 * len(sizes) {
		wg.Go(func() {
			body := bytes.Repeat([]byte{byte('a' + i%26)}, sizes[i%len(sizes)])
			req, _ := http.NewRequest(http.MethodPut, fmt.Sprintf("%s/k%d", ps.URL, i), bytes.NewReader(body))
			resp, err := client.Do(req)
			if err != nil {
				t.Errorf("request %d: %v", i, err)
				return
			}
			defer resp.Body.Close()
			whole, inPlace := resp.Body.(interface{ Bytes() []byte })
			got, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusAccepted || !bytes.Equal(got, body) || !inPlace || len(whole.Bytes()) != 0 {
				t.Errorf("request %d of %d bytes: %d, %d bytes back (equal %v), body held whole %v", i, len(body), resp.StatusCode, len(got), bytes.Equal(got, body), inPlace)
			}
		})
	}
	wg.Wait()
}
