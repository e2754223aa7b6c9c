package api

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"sync/atomic"
	"testing"
)

// benchNode serves the real API over loopback HTTP with fsync on.
func benchNode(b *testing.B) (string, *http.Client) {
	b.Helper()
	n := startNode(b, nodeOpts{api: Config{NodeID: "bench"}})
	return n.url, &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}}
}

func doBench(b *testing.B, client *http.Client, method, url string, body []byte, want int) {
	req, _ := http.NewRequest(method, url, bytes.NewReader(body))
	resp, err := client.Do(req)
	if err != nil {
		b.Error(err)
		return
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != want && !(want == 200 && resp.StatusCode == 201) {
		b.Errorf("%s %s: %d", method, url, resp.StatusCode)
	}
}

// runClients runs op from the given number of concurrent clients: exactly
// one goroutine for 1, else RunParallel with that many goroutines.
func runClients(b *testing.B, clients int, op func()) {
	b.ResetTimer()
	if clients == 1 {
		for b.Loop() {
			op()
		}
		return
	}
	b.SetParallelism(max(clients/runtime.GOMAXPROCS(0), 1))
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			op()
		}
	})
}

var benchValue = []byte(`{"v":"` + string(bytes.Repeat([]byte("x"), 248)) + `"}`) // 256 B

// BenchmarkHTTP_Put is PUT /v1/kv/{key} over loopback, 1 and 64 clients.
func BenchmarkHTTP_Put(b *testing.B) {
	for _, clients := range []int{1, 64} {
		b.Run(fmt.Sprintf("clients=%d", clients), func(b *testing.B) {
			url, client := benchNode(b)
			var n atomic.Int64
			runClients(b, clients, func() {
				doBench(b, client, http.MethodPut, fmt.Sprintf("%s/v1/kv/k%d", url, n.Add(1)), benchValue, 200)
			})
		})
	}
}

// BenchmarkHTTP_Get is GET /v1/kv/{key} over loopback, 1 and 64 clients.
func BenchmarkHTTP_Get(b *testing.B) {
	for _, clients := range []int{1, 64} {
		b.Run(fmt.Sprintf("clients=%d", clients), func(b *testing.B) {
			url, client := benchNode(b)
			for i := range 1000 {
				doBench(b, client, http.MethodPut, fmt.Sprintf("%s/v1/kv/k%d", url, i), benchValue, 200)
			}
			var n atomic.Int64
			runClients(b, clients, func() {
				doBench(b, client, http.MethodGet, fmt.Sprintf("%s/v1/kv/k%d", url, n.Add(1)%1000), nil, 200)
			})
		})
	}
}
