package api

import (
	"context"
	"errors"
	"io"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"testing/synctest"
	"time"
)

func TestByteBudget(t *testing.T) {
	tests := []struct {
		name string
		// held are reserved first and kept; then want is asked for.
		held []int64
		want int64
		// admitted: want gets in at once; else it times out overloaded.
		admitted bool
	}{
		{"fits", []int64{30}, 70, true},
		{"over the limit waits and times out", []int64{30}, 71, false},
		{"larger than the limit, alone", nil, 500, true},
		{"larger than the limit, behind another", []int64{1}, 500, false},
		{"zero bytes always fit", []int64{100}, 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				b := newByteBudget(100, time.Second)
				for _, n := range tt.held {
					if _, err := b.acquire(context.Background(), n); err != nil {
						t.Fatal(err)
					}
				}
				start := time.Now()
				release, err := b.acquire(context.Background(), tt.want)
				switch {
				case tt.admitted && (err != nil || time.Since(start) > 0):
					t.Fatalf("acquire(%d) with %v held: %v after %s, want at once", tt.want, tt.held, err, time.Since(start))
				case !tt.admitted && !errors.Is(err, errOverloaded):
					t.Fatalf("acquire(%d) with %v held: %v, want %v", tt.want, tt.held, err, errOverloaded)
				case !tt.admitted && time.Since(start) != time.Second:
					t.Fatalf("refused after %s, want after the wait (1s)", time.Since(start))
				}
				var sum int64
				for _, n := range tt.held {
					sum += n
				}
				if tt.admitted {
					sum += tt.want
					release()
					release() // a second call gives nothing back twice
					sum -= tt.want
				}
				if got := b.inUse(); got != sum {
					t.Fatalf("in use %d, want %d", got, sum)
				}
			})
		})
	}
}

// Waiting requests get in first come, first served once bytes are given
// back: a large body is not starved by small ones arriving after it.
func TestByteBudget_ReleaseAdmitsInOrder(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := newByteBudget(100, time.Minute)
		release, _ := b.acquire(context.Background(), 90)
		admitted := make(chan int64, 2)
		releases := map[int64]chan struct{}{60: make(chan struct{}), 5: make(chan struct{})}
		for _, n := range []int64{60, 5} {
			go func() {
				r, err := b.acquire(context.Background(), n)
				if err != nil {
					t.Error(err)
					return
				}
				admitted <- n
				<-releases[n]
				r()
			}()
			synctest.Wait() // queued before the next one asks
		}
		// 5 would fit beside the 90 but waits behind 60.
		synctest.Wait()
		if len(admitted) != 0 {
			t.Fatalf("%d admitted while 60 waited ahead of it", <-admitted)
		}
		release()
		synctest.Wait()
		if got := b.inUse(); got != 65 || len(admitted) != 2 {
			t.Fatalf("after the release: %d in use, %d admitted; want 65 and both", got, len(admitted))
		}
		close(releases[60])
		close(releases[5])
		synctest.Wait()
		if got := b.inUse(); got != 0 {
			t.Fatalf("in use %d after all released", got)
		}
	})
}

// A waiter whose context ends leaves the queue, and those behind it move up.
func TestByteBudget_CancelledWaiterLeavesTheQueue(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := newByteBudget(100, time.Minute)
		release, _ := b.acquire(context.Background(), 50)
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() {
			_, err := b.acquire(ctx, 80)
			errc <- err
		}()
		synctest.Wait()
		got := make(chan struct{})
		go func() {
			r, err := b.acquire(context.Background(), 40) // fits once 80 is gone
			if err == nil {
				r()
			}
			close(got)
		}()
		synctest.Wait()
		cancel()
		if err := <-errc; !errors.Is(err, errOverloaded) || !strings.Contains(err.Error(), "nothing was applied") {
			t.Fatalf("cancelled waiter: %v, want %v saying nothing was applied", err, errOverloaded)
		}
		<-got
		release()
		if n := b.inUse(); n != 0 {
			t.Fatalf("in use %d", n)
		}
	})
}

// While bodies in flight fill --max-inflight-bytes, another PUT waits, then
// is refused 503 overloaded in JSON with Retry-After, and changes nothing;
// once the first finishes, writes get in again.
func TestServer_Put_InflightBytesFull_503Overloaded_ChangesNothing(t *testing.T) {
	n := startNode(t, nodeOpts{api: Config{NodeID: "n1", MaxValueBytes: 1 << 20, MaxInflightBytes: 1 << 20, InflightWait: 200 * time.Millisecond}})
	value := `"` + strings.Repeat("x", 600<<10) + `"`
	// A slow client: its body is announced whole but arrives in two parts.
	pr, pw := io.Pipe()
	req, err := http.NewRequest(http.MethodPut, n.url+"/v1/kv/slow", pr)
	if err != nil {
		t.Fatal(err)
	}
	req.ContentLength = int64(len(value))
	slow := make(chan response, 1)
	go func() {
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Error(err)
			slow <- response{}
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		slow <- response{status: resp.StatusCode, body: string(b)}
	}()
	if _, err := pw.Write([]byte(value[:1000])); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for n.srv.bodies.inUse() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the slow PUT never reserved its body")
		}
		time.Sleep(time.Millisecond)
	}
	before := n.snapshot()
	got := n.do(http.MethodPut, "/v1/kv/other", value)
	if got.status != http.StatusServiceUnavailable || errorCode(t, got.body) != "overloaded" || got.header.Get("Retry-After") == "" {
		t.Fatalf("PUT while the budget is full: %d %s (Retry-After %q), want 503 overloaded", got.status, got.body, got.header.Get("Retry-After"))
	}
	if after := n.snapshot(); !reflect.DeepEqual(before, after) {
		t.Fatal("a PUT refused as overloaded changed the store")
	}
	if _, err := pw.Write([]byte(value[1000:])); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	if r := <-slow; r.status != http.StatusCreated {
		t.Fatalf("the slow PUT: %d %s", r.status, r.body)
	}
	if got := n.do(http.MethodPut, "/v1/kv/other", value); got.status != http.StatusCreated {
		t.Fatalf("PUT after the budget emptied: %d %s", got.status, got.body)
	}
	if n.srv.bodies.inUse() != 0 {
		t.Fatalf("%d bytes still reserved after every request ended", n.srv.bodies.inUse())
	}
}
