package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// resetPeakRSS sets a process's VmHWM back to its current RSS (proc(5),
// clear_refs "5"), so a later peakRSS measures one phase, not the process's
// whole life.
func resetPeakRSS(t *testing.T, pid int) {
	t.Helper()
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0); err != nil {
		t.Fatalf("reset the peak RSS of %d: %v", pid, err)
	}
}

// Issue item "large reads stream": 100 concurrent GETs of escaped 1 MiB
// values through each follower (stale and strong) and through the leader
// answer every byte, and no node's heap or RSS grows past what its flags
// and the concurrency allow. A GET served elsewhere crosses a hop (the
// leader hands reads off to an owner, a follower that does not own the key
// asks one), so the bound below is what each hop may hold per read.
func TestLargeRead_100ConcurrentGETsOf1MiB_BoundedPerHop(t *testing.T) {
	const (
		valueBytes = 1 << 20 // --max-value-bytes, the default
		values     = 20
		readers    = 100
	)
	c := startClusterWith(t, storeOptions{binary: storeBinaryNoRace, env: []string{"GODEBUG=gctrace=1"}}, 3)
	leader := c.leader(30 * time.Second)
	c.awaitLeaderKnown(leader, c.ids()...)
	followers := c.except(leader)

	client := &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: readers}}
	acked := map[string]written{}
	var mu sync.Mutex
	parallel(values, 4, func(i int) {
		key, value := fmt.Sprintf("big/%02d", i), escapedValue(t, 1000+i, valueBytes)
		code, version, body, err := c.putValue(client, leader, key, value, true, "")
		if err != nil || code/100 != 2 {
			t.Errorf("PUT %s: %d %s %v", key, code, body, err)
			return
		}
		mu.Lock()
		acked[key] = written{value, version}
		mu.Unlock()
	})
	if t.Failed() {
		t.FailNow()
	}
	c.awaitCopies(t, client, leader, acked, 30*time.Second)

	// From here on only reads run: the peaks below are theirs.
	logStart := map[string]int{}
	baseline := map[string]int64{}
	for _, id := range c.ids() {
		pid := c.nodes[id].cmd.Process.Pid
		resetPeakRSS(t, pid)
		baseline[id], _, _ = peakRSS(t, pid)
		logStart[id] = len(c.nodes[id].Logs())
	}
	rounds := []struct {
		name  string
		via   []string
		query string
	}{
		{"followers, stale", followers, "?consistency=stale"},
		{"followers, strong", followers, ""},
		{"leader, strong", []string{leader}, ""},
		{"leader, stale", []string{leader}, "?consistency=stale"},
	}
	allocated := func() (sum float64) {
		for _, id := range c.ids() {
			sum += c.metric(id, "go_memstats_alloc_bytes_total")
		}
		return sum
	}
	// Bytes allocated per GET, on all nodes together. A GET served where it
	// arrives allocates its value once (the copy out of bbolt); one that
	// crosses a hop allocates it at most four times: twice at the node
	// that serves it (that copy, and the response recorded for the peer
	// connection) and at most twice at the node that passes it on (the
	// frame it arrives in, which grows by doubling from 64 KiB to exactly
	// its size). Plus the request's own small allocations and the nodes'
	// background work over the round (256 KiB per GET, generously: 0.07
	// MiB measured). The copies the read path used to make (an encoded
	// reply, the frame writer's buffer, the reply read whole, the decoded
	// value) would each show here.
	const allocBound = 4*valueBytes + 256<<10
	for _, r := range rounds {
		allocBefore := allocated()
		start := time.Now()
		var wg sync.WaitGroup
		for i := range readers {
			wg.Go(func() {
				key, via := fmt.Sprintf("big/%02d", i%values), r.via[i%len(r.via)]
				resp, err := client.Get("http://" + c.addr(via) + "/v1/kv/" + key + r.query)
				if err != nil {
					t.Errorf("%s: GET %s via %s: %v", r.name, key, via, err)
					return
				}
				b, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				w := acked[key]
				switch {
				case err != nil || resp.StatusCode != http.StatusOK:
					t.Errorf("%s: GET %s via %s: %d %.200s %v", r.name, key, via, resp.StatusCode, b, err)
				case string(b) != w.value:
					t.Errorf("%s: GET %s via %s: %d bytes that differ from the %d written at byte %d", r.name, key, via, len(b), len(w.value), firstDiff(string(b), w.value))
				case strings.Trim(resp.Header.Get("ETag"), `"`) != w.version || resp.Header.Get("Content-Length") != strconv.Itoa(len(w.value)):
					t.Errorf("%s: GET %s via %s: ETag %s, Content-Length %s; want %s, %d", r.name, key, via, resp.Header.Get("ETag"), resp.Header.Get("Content-Length"), w.version, len(w.value))
				}
			})
		}
		wg.Wait()
		took := time.Since(start)
		perGET := (allocated() - allocBefore) / readers
		t.Logf("%s: %d concurrent GETs of %d-byte values in %s; %.2f MiB allocated per GET on all nodes together (bound %.2f MiB)",
			r.name, readers, valueBytes, took.Round(time.Millisecond), perGET/(1<<20), float64(allocBound)/(1<<20))
		if perGET > allocBound {
			t.Errorf("%s: %.2f MiB allocated per GET, over the bound of %.2f MiB", r.name, perGET/(1<<20), float64(allocBound)/(1<<20))
		}
	}

	// Memory. A read in flight holds its value at most twice on any one
	// node, and a node that only passes it on holds it once:
	//   - the node that serves it: its copy out of bbolt (storage.DB.Get
	//     says why it copies) and, when it answers a peer, the response
	//     recorded for the peer connection (peerhttp writes it from there,
	//     and transport wrote the value into it from the copy);
	//   - a node that passes it on (the leader handing a read off, a
	//     follower asking an owner): the frame it arrived in, which the
	//     decoded reply and the client's response use in place.
	// A node may serve some reads and pass others on, but never both for
	// one read, so with C reads in flight and values of at most V
	// (--max-value-bytes), plus per connection its buffers and goroutine
	// (64 KiB, generously):
	//
	//	live ≤ live before + 2·C·V + C·64 KiB
	//
	// checked against the live heap each collection found (gctrace). The
	// heap may grow past what is live by GOGC between collections
	// (defaultGCPercent = 400), and reading values touches bbolt's pages
	// (RssFile), so
	//
	//	peak RSS ≤ RSS before + file + (1 + GOGC/100) · (2·C·V + C·64 KiB)
	//
	// Before this bound held, a read crossing a hop was held about four
	// times at the serving node (its copy, the encoded reply, the
	// recorder, the frame writer's buffer) and three at the relaying one
	// (the frame, the reply read whole, the decoded value).
	const perReads = 2*readers*valueBytes + readers*64<<10
	const heapFactor = (100 + defaultGCPercent) / 100
	for _, id := range c.ids() {
		peak, anon, file := peakRSS(t, c.nodes[id].cmd.Process.Pid)
		logs := c.nodes[id].Logs()
		_, before, _ := lastGC(logs[:logStart[id]])
		heap, live, gcs := gcHeaps(logs[logStart[id]:])
		role := "follower"
		if id == leader {
			role = "leader"
		}
		liveBound := before + perReads>>20
		bound := baseline[id] + file + heapFactor*perReads
		t.Logf("%s (%s): peak RSS %d MiB over the reads, bound %d MiB (%d MiB before; now anon %d MiB, file %d MiB); heap peak %d MiB, live peak %d MiB, bound %d MiB (%d MiB live before; %d GCs)",
			id, role, peak>>20, bound>>20, baseline[id]>>20, anon>>20, file>>20, heap, live, liveBound, before, gcs)
		if gcs == 0 {
			t.Errorf("%s: no collection during the reads (gctrace)", id)
		}
		if live > liveBound {
			t.Errorf("%s: %d MiB of heap live at a collection, over the bound of %d MiB", id, live, liveBound)
		}
		if peak > bound {
			t.Errorf("%s: peak RSS %d MiB exceeds the bound %d MiB", id, peak>>20, bound>>20)
		}
	}
}

// lastGC is the heap sizes of the last gctrace line in logs, in MiB: at
// its start, at its end, and live.
func lastGC(logs string) (start, live, end int64) {
	for line := range strings.Lines(logs) {
		if m := gcTraceRE.FindStringSubmatch(strings.TrimSpace(line)); m != nil {
			start, _ = strconv.ParseInt(m[1], 10, 64)
			end, _ = strconv.ParseInt(m[2], 10, 64)
			live, _ = strconv.ParseInt(m[3], 10, 64)
		}
	}
	return start, live, end
}
