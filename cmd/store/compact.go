package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/statefulkv/store/internal/storage"
)

// compactReport is the one line `store compact` prints on success.
type compactReport struct {
	DataDir     string  `json:"data_dir"`
	BeforeBytes int64   `json:"before_bytes"`
	AfterBytes  int64   `json:"after_bytes"`
	FreeBytes   int64   `json:"free_bytes_before"`
	Took        string  `json:"took"`
	TookSeconds float64 `json:"took_seconds"`
}

// runCompact is `store compact --data-dir DIR`: it rewrites the stopped
// store's file without its free pages (storage.Compact) and prints one
// JSON line with the sizes before and after. Exit 2 for bad flags, 1 when
// the compaction fails (the file is then as it was), 0 otherwise.
func runCompact(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	log := slog.New(slog.NewJSONHandler(stderr, nil))
	cfg, err := parseCompactConfig(args, getenv, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		log.Error("startup failed", "err", err.Error())
		return 2
	}
	// An interrupted copy is removed and the file left as it was.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	res, err := storage.Compact(ctx, cfg.dataDir, storage.CompactOptions{LockTimeout: cfg.lockTimeout})
	if err != nil {
		attrs := []any{"data_dir", cfg.dataDir, "err", err.Error()}
		if errors.Is(err, storage.ErrLocked) {
			attrs = append(attrs, "hint", "a store is running on this directory: stop it first, or start it with --compact-at-start-free-ratio")
		}
		// Whatever failed, the rename did not happen: the file is as it was.
		log.Error("compaction failed; the data file is unchanged", attrs...)
		return 1
	}
	line, _ := json.Marshal(compactReport{
		DataDir:     cfg.dataDir,
		BeforeBytes: res.BeforeBytes,
		AfterBytes:  res.AfterBytes,
		FreeBytes:   res.FreeBytes,
		Took:        res.Took.Round(time.Millisecond).String(),
		TookSeconds: res.Took.Seconds(),
	})
	fmt.Fprintln(stdout, string(line))
	return 0
}

// compactAtStart compacts the data file before the store opens it, when
// --compact-at-start-free-ratio asks for it and the file is that free.
// A directory without a file yet (a first start) has nothing to compact.
func compactAtStart(ctx context.Context, cfg config, log *slog.Logger) error {
	if cfg.compactFreeRatio <= 0 {
		return nil
	}
	res, err := storage.Compact(ctx, cfg.dataDir, storage.CompactOptions{
		MinFreeRatio: cfg.compactFreeRatio,
		MinFreeBytes: cfg.compactMinFreeBytes,
		// The same wait as storage.Open's: a predecessor still exiting
		// may hold the lock for a moment.
		LockTimeout: 2 * time.Second,
	})
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("compact at start (--compact-at-start-free-ratio %v, --data-dir %s): %w", cfg.compactFreeRatio, cfg.dataDir, err)
	case !res.Compacted:
		log.Info("data file not compacted at start: not free enough",
			"free_bytes", res.FreeBytes, "file_bytes", res.BeforeBytes,
			"free_ratio", cfg.compactFreeRatio, "min_free_bytes", cfg.compactMinFreeBytes)
	default:
		log.Info("compacted the data file at start",
			"before_bytes", res.BeforeBytes, "after_bytes", res.AfterBytes, "took", res.Took.Round(time.Millisecond).String())
	}
	return nil
}
