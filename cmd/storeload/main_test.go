package main

import (
	"encoding/json"
	"io"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/statefulkv/store/internal/api"
	"github.com/statefulkv/store/internal/node"
	"github.com/statefulkv/store/internal/storage"
)

func TestParseFlags(t *testing.T) {
	tests := []struct {
		args    []string
		wantErr string
	}{
		{[]string{"-targets", "http://a:1,http://b:2"}, ""},
		{[]string{"-targets", "ftp://x"}, "-targets"},
		{[]string{"-targets", "127.0.0.1:8080"}, "-targets"},
		{[]string{"-put-ratio", "1.5"}, "-put-ratio"},
		{[]string{"-put-ratio", "0.8", "-delete-ratio", "0.3"}, "-delete-ratio"},
		{[]string{"-delete-ratio", "-0.1"}, "-delete-ratio"},
		{[]string{"-put-ratio", "0.7", "-delete-ratio", "0.3"}, ""},
		{[]string{"-dist", "pareto"}, "-dist"},
		{[]string{"-dist", "zipf", "-zipf-s", "1"}, "-zipf-s"},
		{[]string{"-duration", "0"}, "-duration or -requests"},
		{[]string{"-concurrency", "0"}, "-concurrency"},
		{[]string{"-value-size", "1"}, "-value-size"},
	}
	for _, tt := range tests {
		_, err := parseFlags(tt.args, io.Discard)
		if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
			t.Errorf("parseFlags(%v) = %v, want error containing %q", tt.args, err, tt.wantErr)
		}
	}
}

// A short closed-loop run against a real in-process store: every request is
// counted once, all succeed after the prefill (a DELETE's 404 for a key
// deleted already included), and the JSON report says so.
func TestRun_AgainstARealStore(t *testing.T) {
	db, err := storage.Open(t.TempDir(), storage.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	nd, err := node.New(node.Config{Self: "load-test", Store: db})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := api.New(api.Config{NodeID: "load-test", Node: nd, Stats: db})
	if err != nil {
		t.Fatal(err)
	}
	srv.SetReady(true)
	hs := httptest.NewServer(srv)
	defer hs.Close()

	out := filepath.Join(t.TempDir(), "report.json")
	cfg, err := parseFlags([]string{"-targets", hs.URL, "-requests", "300", "-duration", "0", "-concurrency", "4",
		"-keys", "50", "-dist", "zipf", "-put-ratio", "0.3", "-delete-ratio", "0.2", "-json", out}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	cfg.timeout = 10 * time.Second
	rep, err := run(cfg, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	counted := 0
	for code, n := range rep.StatusCodes {
		if !strings.HasPrefix(code, "PUT 2") && !strings.HasPrefix(code, "GET 200") && !strings.HasPrefix(code, "GET 404") &&
			code != "DELETE 200" && code != "DELETE 404" {
			t.Errorf("status %q ×%d", code, n)
		}
		counted += n
	}
	if rep.Requests != 300 || rep.Success != 300 || counted != 300 || rep.StatusCodes["DELETE 200"] == 0 {
		t.Fatalf("report = %+v", rep)
	}
	if rep.Put == nil || rep.Get == nil || rep.Delete == nil || rep.Put.Count+rep.Get.Count+rep.Delete.Count != 300 || rep.Latency.P50 <= 0 || rep.Latency.Max < rep.Latency.P999 {
		t.Fatalf("latencies = %+v / %+v / %+v / %+v", rep.Latency, rep.Put, rep.Get, rep.Delete)
	}
	var onDisk Report
	b, err := os.ReadFile(out)
	if err != nil || json.Unmarshal(b, &onDisk) != nil || onDisk.Success != rep.Success {
		t.Fatalf("JSON report: %v %s", err, b)
	}
	if db.LastSeq() < 50 { // the prefill wrote every key
		t.Fatalf("store saw %d writes, want the 50-key prefill at least", db.LastSeq())
	}
}
