// Command store runs one node of the replicated JSON key-value store.
//
// A request's path: main builds storage.DB (the bbolt file) and api.Server
// (the HTTP routes in internal/api/server.go) and serves it; every write goes
// through api.Server.put/delete into storage.DB.Apply, which group-commits and
// fsyncs before the response is sent.
//
// Without Kubernetes configuration the store runs as a single node on a
// local bbolt file; leader election and replication build on this.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/statefulkv/store/internal/api"
	"github.com/statefulkv/store/internal/storage"
)

// version is stamped at build time (-ldflags "-X main.version=v1.2.3");
// buildVersion falls back to the module and VCS data Go records.
var version string

func main() {
	os.Exit(run(os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

func run(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	host, _ := os.Hostname()
	cfg, err := parseConfig(args, getenv, host, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		// Startup errors are one JSON line naming the flag, like every log.
		slog.New(slog.NewJSONHandler(stderr, nil)).Error("startup failed", "err", err.Error())
		return 2
	}
	if cfg.showVersion {
		fmt.Fprintln(stdout, "store", buildVersion())
		return 0
	}
	log := newLogger(cfg, stderr)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := serve(ctx, cfg, log); err != nil {
		log.Error("store stopped with an error", "err", err)
		return 1
	}
	return 0
}

func newLogger(cfg config, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.logLevel}
	if cfg.logFormat == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// serve runs the node until ctx is cancelled, then shuts down in the one
// order that loses nothing: readiness off → HTTP drains (every in-flight
// write finishes its fsync) → storage closes.
func serve(ctx context.Context, cfg config, log *slog.Logger) error {
	log.Info("starting single-node store: no Kubernetes configuration, so no election or replication",
		"mode", "single-node", "node", cfg.nodeID, "version", buildVersion(),
		"listen", cfg.listen, "data_dir", cfg.dataDir)

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	db, err := storage.Open(cfg.dataDir, storage.Options{Registerer: reg})
	if err != nil {
		return fmt.Errorf("open storage (--data-dir %s): %w", cfg.dataDir, err)
	}
	defer func() {
		if err := db.Close(); err != nil {
			log.Error("close storage", "err", err)
		}
	}()

	srv, err := api.New(api.Config{
		NodeID:        cfg.nodeID,
		BuildVersion:  buildVersion(),
		Store:         db,
		MaxValueBytes: cfg.maxValueBytes,
		Logger:        log,
		Registerer:    reg,
		Gatherer:      reg,
	})
	if err != nil {
		return err
	}

	ln, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		return fmt.Errorf("listen (--listen %s): %w", cfg.listen, err)
	}
	httpSrv := &http.Server{
		Handler:           srv,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       60 * time.Second,
		IdleTimeout:       120 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- httpSrv.Serve(ln) }()
	srv.SetReady(true)
	log.Info("serving", "addr", ln.Addr().String())

	select {
	case err := <-serveErr:
		return fmt.Errorf("http server: %w", err)
	case <-ctx.Done():
	}
	log.Info("shutting down: draining HTTP", "timeout", cfg.shutdownTimeout)
	srv.SetReady(false)
	drainCtx, cancel := context.WithTimeout(context.Background(), cfg.shutdownTimeout)
	defer cancel()
	if err := httpSrv.Shutdown(drainCtx); err != nil {
		log.Warn("HTTP drain did not finish; closing connections", "err", err)
		_ = httpSrv.Close()
	}
	log.Info("shut down cleanly")
	return nil
}

func buildVersion() string {
	if version != "" {
		return version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := bi.Main.Version
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			v += "+" + s.Value[:12]
		}
	}
	return v
}
