//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// client has no keep-alives, so that each request opens a connection
// through the Service's VIP and kube-proxy picks a ready pod for it, which
// is what a fleet of short-lived clients sees.
var client = &http.Client{
	Timeout:   10 * time.Second,
	Transport: &http.Transport{DisableKeepAlives: true},
}

func httpDo(ctx context.Context, method, url, body string, header http.Header) (string, int, error) {
	req, err := http.NewRequestWithContext(ctx, method, url, strings.NewReader(body))
	if err != nil {
		return "", 0, err
	}
	for k, v := range header {
		req.Header[k] = v
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", resp.StatusCode, err
	}
	return string(b), resp.StatusCode, nil
}

// ledger holds every acknowledged write: key → the value the store said it
// took. All must be readable at the end of the run.
type ledger struct {
	mu    sync.Mutex
	acked map[string]string
}

func newLedger() *ledger { return &ledger{acked: map[string]string{}} }

func (l *ledger) add(key, value string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.acked[key] = value
}

func (l *ledger) snapshot() map[string]string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make(map[string]string, len(l.acked))
	for k, v := range l.acked {
		out[k] = v
	}
	return out
}

// load is a few writers PUTting fresh keys through a base URL (the store
// Service's VIP) at a steady pace, noting when each write was acknowledged.
type load struct {
	base    string
	phase   string
	ledger  *ledger
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	mu      sync.Mutex
	acks    []time.Time
	failed  atomic.Int64
	unknown atomic.Int64
	codes   sync.Map // status or error text → *atomic.Int64
}

const writers = 4

func startLoad(base, phase string, l *ledger) *load {
	ctx, cancel := context.WithCancel(context.Background())
	ld := &load{base: base, phase: phase, ledger: l, cancel: cancel}
	for w := range writers {
		ld.wg.Go(func() { ld.write(ctx, w) })
	}
	return ld
}

func (ld *load) count(what string) {
	v, _ := ld.codes.LoadOrStore(what, new(atomic.Int64))
	v.(*atomic.Int64).Add(1)
}

func (ld *load) write(ctx context.Context, w int) {
	for n := 0; ctx.Err() == nil; n++ {
		key := fmt.Sprintf("e2e/%s/w%d/%06d", ld.phase, w, n)
		value := fmt.Sprintf(`{"phase":%q,"writer":%d,"n":%d}`, ld.phase, w, n)
		body, code, err := httpDo(ctx, http.MethodPut, ld.base+"/v1/kv/"+key, value, nil)
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			// No answer: the write may or may not have landed; it is not
			// acknowledged, so the ledger does not hold the store to it.
			ld.unknown.Add(1)
			ld.count(errorClass(err))
		case code == http.StatusOK || code == http.StatusCreated:
			ld.ledger.add(key, value)
			ld.mu.Lock()
			ld.acks = append(ld.acks, time.Now())
			ld.mu.Unlock()
		default:
			ld.failed.Add(1)
			ld.count(fmt.Sprintf("%d %s", code, errorCode(body)))
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// stop ends the load and reports, for the window [from, to], the longest
// time without an acknowledged write (from the window's start to the first
// ack, between acks, and from the last ack to the window's end).
func (ld *load) stop(from, to time.Time) (gap time.Duration, acked int) {
	ld.cancel()
	ld.wg.Wait()
	ld.mu.Lock()
	defer ld.mu.Unlock()
	acks := slices.Clone(ld.acks)
	slices.SortFunc(acks, func(a, b time.Time) int { return a.Compare(b) })
	prev := from
	for _, a := range acks {
		if a.Before(from) {
			continue
		}
		if a.After(to) {
			break
		}
		gap = max(gap, a.Sub(prev))
		prev = a
	}
	gap = max(gap, to.Sub(prev))
	return gap, len(acks)
}

// acked is how many writes have been acknowledged so far.
func (ld *load) acked() int {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	return len(ld.acks)
}

func (ld *load) summary() string {
	var parts []string
	ld.codes.Range(func(k, v any) bool {
		parts = append(parts, fmt.Sprintf("%s×%d", k, v.(*atomic.Int64).Load()))
		return true
	})
	slices.Sort(parts)
	return fmt.Sprintf("%d acked, %d refused, %d without answer [%s]", len(ld.acks), ld.failed.Load(), ld.unknown.Load(), strings.Join(parts, " "))
}

// errorClass names a transport error without its addresses, so that the
// summary counts kinds ("connection refused", "Client.Timeout exceeded").
func errorClass(err error) string {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "Client.Timeout"):
		return "client timeout"
	case strings.Contains(msg, "connection refused"):
		return "connection refused"
	case strings.Contains(msg, "connection reset"):
		return "connection reset"
	case strings.Contains(msg, "EOF"):
		return "EOF"
	case strings.Contains(msg, "no route to host"):
		return "no route to host"
	}
	if i := strings.LastIndex(msg, ": "); i >= 0 {
		msg = msg[i+2:]
	}
	return msg
}

// errorCode pulls "code" out of the store's error body, for the summary.
func errorCode(body string) string {
	const k = `"code":"`
	i := strings.Index(body, k)
	if i < 0 {
		return ""
	}
	rest := body[i+len(k):]
	if j := strings.IndexByte(rest, '"'); j >= 0 {
		return rest[:j]
	}
	return ""
}

// verifyLedger reads every acknowledged key back (strong reads, through the
// Service) and fails on any that is missing or different. A read the store
// refuses for now (a 503 right after a disruption: a new leader whose DNS
// name does not resolve yet, a pod just starting) is asked again for up to
// 30 s; a 404 or another value is a lost write at once. It reports how many
// reads had to wait and for how long, which is the read side of the gap.
func verifyLedger(t *testing.T, base string, l *ledger) {
	t.Helper()
	want := l.snapshot()
	deadline := time.Now().Add(30 * time.Second)
	keys := make(chan string)
	var mu sync.Mutex
	var lost []string
	var waited int
	var longest time.Duration
	var lastRefusal string
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for k := range keys {
				start := time.Now()
				for {
					body, code, err := httpDo(context.Background(), http.MethodGet, base+"/v1/kv/"+k, "", nil)
					if err == nil && code == http.StatusOK && body == want[k] {
						if d := time.Since(start); d > time.Second {
							mu.Lock()
							waited++
							longest = max(longest, d)
							mu.Unlock()
						}
						break
					}
					definitive := err == nil && (code == http.StatusOK || code == http.StatusNotFound)
					if definitive || time.Now().After(deadline) {
						mu.Lock()
						lost = append(lost, fmt.Sprintf("%s: %d %v %.300q (want %q)", k, code, err, body, want[k]))
						mu.Unlock()
						break
					}
					mu.Lock()
					lastRefusal = fmt.Sprintf("%d %v %.300s", code, err, body)
					mu.Unlock()
					time.Sleep(200 * time.Millisecond)
				}
			}
		})
	}
	for k := range want {
		keys <- k
	}
	close(keys)
	wg.Wait()
	if waited > 0 {
		t.Logf("ledger: %d reads were refused for a while (longest %s until answered); last refusal: %s", waited, longest.Round(100*time.Millisecond), lastRefusal)
	}
	if len(lost) > 0 {
		slices.Sort(lost)
		if len(lost) > 20 {
			lost = append(lost[:20], fmt.Sprintf("… and %d more", len(lost)-20))
		}
		t.Fatalf("%d of %d acknowledged writes are not readable:\n  %s", len(lost), len(want), strings.Join(lost, "\n  "))
	}
	t.Logf("ledger: all %d acknowledged writes read back", len(want))
}
