package main

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"testing"
)

func TestReadMemoryLimit(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, content string
		want          int64
		ok            bool
	}{
		{"cgroup v2 limit", "536870912\n", 536870912, true},
		{"cgroup v2 no limit", "max\n", 0, false},
		{"cgroup v1 no limit", "9223372036854771712\n", 0, false},
		{"garbage", "lots\n", 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, tc.name)
			if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			got, ok := readMemoryLimit(path)
			if got != tc.want || ok != tc.ok {
				t.Fatalf("readMemoryLimit(%q) = %d, %v; want %d, %v", tc.content, got, ok, tc.want, tc.ok)
			}
		})
	}
	if _, ok := readMemoryLimit(filepath.Join(dir, "missing")); ok {
		t.Fatal("a missing file gave a limit")
	}
}

// The store's GC defaults apply unless the operator set GOGC/GOMEMLIMIT.
func TestTuneGC_DefaultsUnlessOperatorChose(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	defer debug.SetMemoryLimit(debug.SetMemoryLimit(-1))
	limit := filepath.Join(t.TempDir(), "memory.max")
	if err := os.WriteFile(limit, []byte("1000000000\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	env := func(vars map[string]string) func(string) string { return func(k string) string { return vars[k] } }

	debug.SetGCPercent(100)
	debug.SetMemoryLimit(1 << 62)
	tuneGC(log, env(nil), "/nonexistent", limit)
	if got := debug.SetGCPercent(-1); got != defaultGCPercent {
		t.Errorf("GC percent %d, want the store's default %d", got, defaultGCPercent)
	}
	if got := debug.SetMemoryLimit(-1); got != 700000000 {
		t.Errorf("soft memory limit %d, want 70%% of the container's 1e9", got)
	}

	debug.SetGCPercent(100)
	debug.SetMemoryLimit(1 << 62)
	tuneGC(log, env(map[string]string{"GOGC": "50", "GOMEMLIMIT": "1GiB"}), limit)
	if got := debug.SetGCPercent(-1); got != 100 {
		t.Errorf("GC percent changed to %d although GOGC was set", got)
	}
	if got := debug.SetMemoryLimit(-1); got != 1<<62 {
		t.Errorf("memory limit changed to %d although GOMEMLIMIT was set", got)
	}
}
