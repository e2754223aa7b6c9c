package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/statefulkv/store/internal/storage"
)

// TestCompactCommand_RealStore_KeepsEveryKey runs a store process, fills
// it with large values and deletes most, checks that `store compact`
// refuses the directory while the store runs, stops it, compacts, and
// reads every key back from a restarted store.
func TestCompactCommand_RealStore_KeepsEveryKey(t *testing.T) {
	dir := t.TempDir()
	p := startStoreWith(t, storeOptions{binary: storeBinaryNoRace}, "--data-dir", dir)
	value := func(i, round int) string {
		return fmt.Sprintf(`{"i":%d,"round":%d,"pad":%q}`, i, round, strings.Repeat("x", 32<<10))
	}
	want := map[string]string{}
	for round := range 3 {
		for i := range 60 {
			key := fmt.Sprintf("k%02d", i)
			if code, err := put(http.DefaultClient, p.url("/v1/kv/"+key), value(i, round)); err != nil || code/100 != 2 {
				t.Fatalf("PUT %s: %d %v", key, code, err)
			}
			want[key] = value(i, round)
		}
	}
	for i := 10; i < 60; i++ {
		key := fmt.Sprintf("k%02d", i)
		req, _ := http.NewRequest(http.MethodDelete, p.url("/v1/kv/"+key), nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil || resp.StatusCode/100 != 2 {
			t.Fatalf("DELETE %s: %v %v", key, resp, err)
		}
		resp.Body.Close()
		delete(want, key)
	}

	var stdout, stderr bytes.Buffer
	if code := run([]string{"compact", "--data-dir", dir, "--lock-timeout", "200ms"}, noEnv, &stdout, &stderr); code != 1 || !strings.Contains(stderr.String(), "locked") {
		t.Fatalf("compact beside a running store: exit %d, want 1 naming the lock:\n%s", code, stderr.String())
	}

	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		t.Fatal("store did not exit within 30s of SIGTERM")
	}

	stdout.Reset()
	stderr.Reset()
	if code := run([]string{"compact", "--data-dir", dir}, noEnv, &stdout, &stderr); code != 0 {
		t.Fatalf("compact: exit %d\n%s", code, stderr.String())
	}
	var rep compactReport
	if err := json.Unmarshal(stdout.Bytes(), &rep); err != nil || rep.DataDir != dir || rep.AfterBytes <= 0 || rep.AfterBytes >= rep.BeforeBytes || rep.Took == "" {
		t.Fatalf("report %q (%v): want one JSON line with a smaller file after", stdout.String(), err)
	}
	t.Logf("store compact: %s", strings.TrimSpace(stdout.String()))
	if _, err := os.Stat(filepath.Join(dir, "store.db.compact")); !os.IsNotExist(err) {
		t.Fatalf("copy left behind: %v", err)
	}

	p = startStoreWith(t, storeOptions{binary: storeBinaryNoRace}, "--data-dir", dir)
	for i := range 60 {
		key := fmt.Sprintf("k%02d", i)
		resp, err := http.Get(p.url("/v1/kv/" + key))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if v, ok := want[key]; ok {
			if resp.StatusCode != 200 || string(body) != v {
				t.Fatalf("GET %s after compaction: %d, %d bytes; want 200 and the last value", key, resp.StatusCode, len(body))
			}
		} else if resp.StatusCode != 404 {
			t.Fatalf("GET deleted %s after compaction: %d, want 404", key, resp.StatusCode)
		}
	}
}

// TestStore_CompactAtStart compacts a file that is mostly free pages when
// --compact-at-start-free-ratio says so, and starts on a fresh directory
// (nothing to compact) with the same flags.
func TestStore_CompactAtStart(t *testing.T) {
	dir := t.TempDir()
	db, err := storage.Open(dir, storage.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	big := []byte(strconv.Quote(strings.Repeat("x", 64<<10)))
	for i := range 100 {
		if _, err := db.Apply(ctx, storage.Mutation{Key: fmt.Sprintf("k%02d", i), Value: big, Epoch: 1}); err != nil {
			t.Fatal(err)
		}
	}
	for i := 1; i < 100; i++ {
		if _, err := db.Apply(ctx, storage.Mutation{Key: fmt.Sprintf("k%02d", i), Delete: true, Epoch: 1}); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	flags := []string{"--compact-at-start-free-ratio", "0.5", "--compact-at-start-min-free-bytes", "1048576"}

	p := startStoreWith(t, storeOptions{binary: storeBinaryNoRace}, append([]string{"--data-dir", dir}, flags...)...)
	if logs := p.Logs(); !strings.Contains(logs, "compacted the data file at start") {
		t.Fatalf("no compaction logged at start:\n%s", logs)
	}
	resp, err := http.Get(p.url("/v1/kv/k00"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != string(big) {
		t.Fatalf("GET k00 after compaction at start: %d, %d bytes", resp.StatusCode, len(body))
	}

	startStoreWith(t, storeOptions{binary: storeBinaryNoRace}, append([]string{"--data-dir", t.TempDir()}, flags...)...)
}

func TestCompactCommand_Errors(t *testing.T) {
	tests := []struct {
		name     string
		args     []string
		wantCode int
		want     string // in the JSON line on stderr
	}{
		{"unknown flag", []string{"compact", "--listen", ":1"}, 2, "-listen"},
		{"empty data dir", []string{"compact", "--data-dir="}, 2, "--data-dir"},
		{"stray argument", []string{"compact", "--data-dir", "d", "now"}, 2, `\"now\"`},
		{"bad lock timeout", []string{"compact", "--lock-timeout", "soon"}, 2, "-lock-timeout"},
		{"no store in the directory", []string{"compact", "--data-dir", t.TempDir()}, 1, "no such file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(tt.args, noEnv, &stdout, &stderr)
			lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
			last := lines[len(lines)-1]
			var rec struct{ Level, Err string }
			if code != tt.wantCode || json.Unmarshal([]byte(last), &rec) != nil || rec.Level != "ERROR" || !strings.Contains(last, tt.want) {
				t.Fatalf("exit %d, stderr %q; want exit %d and a JSON error naming %s", code, stderr.String(), tt.wantCode, tt.want)
			}
			if stdout.Len() != 0 {
				t.Errorf("stdout %q, want nothing on failure", stdout.String())
			}
		})
	}
}

func noEnv(string) string { return "" }
