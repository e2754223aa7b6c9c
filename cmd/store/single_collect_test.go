package main

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A single node with --tombstone-ttl collects its own tombstones: nobody
// replicates it, so no copy can bring a deleted key back. The deleted keys
// stay deleted, before and after a restart, and can be created again.
func TestStore_SingleNode_CollectsTombstones(t *testing.T) {
	dir := t.TempDir()
	args := []string{"--data-dir", dir, "--tombstone-ttl", "2s", "--replication-timeout", "1s"}
	p := startStore(t, args...)
	const keys, deleted = 50, 40
	for i := range keys {
		if code, err := put(http.DefaultClient, p.url(fmt.Sprintf("/v1/kv/k%02d", i)), `"v"`); err != nil || code != http.StatusCreated {
			t.Fatalf("PUT k%02d: %d %v", i, code, err)
		}
	}
	for i := range deleted {
		req, _ := http.NewRequest(http.MethodDelete, p.url(fmt.Sprintf("/v1/kv/k%02d", i)), nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("DELETE k%02d: %d", i, resp.StatusCode)
		}
	}
	if n := metricAt(t, p.addr, "store_storage_tombstones"); n != deleted {
		t.Fatalf("%v tombstones right after the deletes, want %d", n, deleted)
	}
	waitFor(t, 30*time.Second, "the tombstones collected", func() bool {
		return metricAt(t, p.addr, "store_storage_tombstones") == 0
	})
	check := func(p *proc) {
		t.Helper()
		if n := metricAt(t, p.addr, "store_storage_keys"); n != keys-deleted {
			t.Fatalf("%v live keys, want %d", n, keys-deleted)
		}
		for i := range keys {
			resp, err := http.Get(p.url(fmt.Sprintf("/v1/kv/k%02d", i)))
			if err != nil {
				t.Fatal(err)
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			want := http.StatusOK
			if i < deleted {
				want = http.StatusNotFound
			}
			if resp.StatusCode != want {
				t.Fatalf("GET k%02d: %d, want %d", i, resp.StatusCode, want)
			}
		}
	}
	check(p)
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	<-p.done
	p = startStore(t, args...)
	check(p)
	req, _ := http.NewRequest(http.MethodPut, p.url("/v1/kv/k00"), strings.NewReader(`"again"`))
	req.Header.Set("If-None-Match", "*")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("create-only of a collected key: %d, want 201", resp.StatusCode)
	}
}
