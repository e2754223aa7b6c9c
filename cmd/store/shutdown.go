package main

import (
	"context"
	"log/slog"
	"time"
)

// step is one step of the shutdown order: what it does, its budget (0: no
// deadline; the step is bounded by its own means), and the call.
type step struct {
	name   string
	budget time.Duration
	run    func(ctx context.Context) error
}

// shutdown runs steps in order, each on a fresh context with its own
// budget (never one derived from the signal that started the shutdown,
// which is already cancelled), and logs each. A step that fails is logged
// and the next one still runs: a late step (closing storage) must not be
// skipped because an earlier one (a drain) ran out of time.
func shutdown(log *slog.Logger, steps []step) {
	for _, s := range steps {
		ctx, cancel := context.Background(), context.CancelFunc(func() {})
		if s.budget > 0 {
			ctx, cancel = context.WithTimeout(ctx, s.budget)
		}
		start := time.Now()
		log.Info("shutting down: "+s.name, "budget", s.budget)
		if err := s.run(ctx); err != nil {
			log.Warn("shutdown step incomplete: "+s.name, "err", err, "took", time.Since(start).Round(time.Millisecond))
		}
		cancel()
	}
}
