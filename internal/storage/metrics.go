package storage

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	commitSeconds prometheus.Histogram
	batchSize     prometheus.Histogram
	keys          prometheus.Gauge
	tombstones    prometheus.Gauge
	requestBytes  prometheus.Gauge
	// requestsEvicted counts request ids forgotten before their TTL
	// because the records passed Options.MaxRequestBytes.
	requestsEvicted prometheus.Counter
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
		keys: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "store",
			Subsystem: "storage",
			Name:      "keys",
			Help:      "Keys this node holds undeleted: every key on the leader; a follower's owned share, plus copies collection has not dropped yet.",
		}),
		tombstones: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "store",
			Subsystem: "storage",
			Name:      "tombstones",
			Help:      "Deleted keys whose tombstone this node still keeps (collection removes them; see internal/replication/DESIGN.md).",
		}),
		requestBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "store",
			Subsystem: "storage",
			Name:      "request_id_bytes",
			Help:      "Bytes of request-id records kept to recognise retried writes (bounded by --request-id-bytes).",
		}),
		requestsEvicted: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "store",
			Subsystem: "storage",
			Name:      "request_ids_evicted_total",
			Help:      "Request ids forgotten before their TTL because the records reached their byte bound; a retry of one is applied again.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.commitSeconds, m.batchSize, m.keys, m.tombstones, m.requestBytes, m.requestsEvicted)
	}
	return m
}

func (m *metrics) observeCommit(d time.Duration, n int) {
	m.commitSeconds.Observe(d.Seconds())
	m.batchSize.Observe(float64(n))
}

func (m *metrics) setCounts(live, tombstones int) {
	m.keys.Set(float64(live))
	m.tombstones.Set(float64(tombstones))
}

func (m *metrics) setRequestBytes(n int64) { m.requestBytes.Set(float64(n)) }

func (m *metrics) addRequestsEvicted(n int) { m.requestsEvicted.Add(float64(n)) }

// watchFile registers the file's size and its free part, read at each
// scrape: the free part is what compaction would give back (README:
// --compact-at-start-free-ratio).
func (m *metrics) watchFile(reg prometheus.Registerer, sizes func() (file, free int64)) {
	if reg == nil {
		return
	}
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "store",
			Subsystem: "storage",
			Name:      "file_bytes",
			Help:      "Size of the bbolt file on disk.",
		}, func() float64 { f, _ := sizes(); return float64(f) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "store",
			Subsystem: "storage",
			Name:      "free_bytes",
			Help:      "Bytes of the bbolt file holding no live page (free pages and the unused tail): what store compact would give back.",
		}, func() float64 { _, f := sizes(); return float64(f) }),
	)
}
