package storage

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	commitSeconds prometheus.Histogram
	batchSize     prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		commitSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "store",
			Subsystem: "storage",
			Name:      "commit_duration_seconds",
			Help:      "Time to commit and fsync one group-commit transaction.",
			Buckets:   prometheus.ExponentialBuckets(0.0001, 2, 16), // 100µs .. ~3.3s
		}),
		batchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "store",
			Subsystem: "storage",
			Name:      "commit_batch_size",
			Help:      "Mutations carried by one group-commit transaction.",
			Buckets:   prometheus.ExponentialBuckets(1, 2, 11), // 1 .. 1024
		}),
	}
	if reg != nil {
		reg.MustRegister(m.commitSeconds, m.batchSize)
	}
	return m
}

func (m *metrics) observeCommit(d time.Duration, n int) {
	m.commitSeconds.Observe(d.Seconds())
	m.batchSize.Observe(float64(n))
}
