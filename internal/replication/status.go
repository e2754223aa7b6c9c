package replication

import (
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Status is replication's part of GET /v1/status.
type Status struct {
	ReplicationFactor int `json:"replication_factor"`
	// FactorMet is false when there are fewer members than the factor.
	FactorMet bool `json:"replication_factor_met"`
	// CaughtUpEpoch is the term whose catch-up this node finished (leader):
	// every partition holds what earlier terms acknowledged.
	CaughtUpEpoch uint64 `json:"caught_up_epoch,omitempty"`
	// CatchingUpPartitions is how many partitions a leader that accepts
	// writes is still pulling from earlier terms (each is pulled at once
	// when a request needs it).
	CatchingUpPartitions int `json:"catching_up_partitions,omitempty"`
	// LastContactMs is the time since this node heard from a leader.
	LastContactMs int64 `json:"last_contact_ms"`
	// LastRepair is when this node last completed a repair pass against
	// the leader (follower).
	LastRepair *time.Time     `json:"last_repair,omitempty"`
	Members    []MemberStatus `json:"members"`
	Behind     []string       `json:"behind,omitempty"`
}

// MemberStatus is one member as this node sees it.
type MemberStatus struct {
	ID string `json:"id"`
	// Live is this node's latest knowledge: its last call to the member
	// succeeded, or it has not called it yet.
	Live bool `json:"live"`
	// Partitions is how many partitions the member owns.
	Partitions int `json:"partitions"`
	// Queued is the leader's count of entries waiting for the member, and
	// QueuedBytes their size.
	Queued      int   `json:"queued"`
	QueuedBytes int64 `json:"queued_bytes"`
}

// Status reports members, liveness, placement and lag.
func (c *Cluster) Status() Status {
	st := Status{
		ReplicationFactor: c.cfg.ReplicationFactor,
		FactorMet:         len(c.members()) >= c.cfg.ReplicationFactor,
		CaughtUpEpoch:     c.gate.caughtUp.Load(),
		LastContactMs:     min(c.LastContact(), 365*24*time.Hour).Milliseconds(),
		Behind:            c.repl.Behind(),
	}
	if tp := c.gate.progress.Load(); tp != nil && tp.epoch == c.gate.fenced.Load() && st.CaughtUpEpoch != tp.epoch && c.leads(tp.epoch) {
		st.CatchingUpPartitions = tp.left()
	}
	if t := c.repair.lastPass(); !t.IsZero() {
		lr := t.UTC()
		st.LastRepair = &lr
	}
	parts := c.partitionsPerMember()
	queued, queuedBytes := c.repl.Queued(), c.repl.QueuedBytes()
	for _, id := range c.members() {
		st.Members = append(st.Members, MemberStatus{ID: id, Live: id == c.cfg.Self || !c.down(id), Partitions: parts[id], Queued: queued[id], QueuedBytes: queuedBytes[id]})
	}
	slices.Sort(st.Behind)
	return st
}

func (c *Cluster) partitionsPerMember() map[string]int {
	out := map[string]int{}
	for p := range c.cfg.Ring.PartitionCount() {
		owners, err := c.cfg.Ring.PartitionOwners(p, c.cfg.ReplicationFactor)
		if err != nil {
			continue
		}
		for _, o := range owners {
			out[o]++
		}
	}
	return out
}

type clusterMetrics struct {
	replicate          *prometheus.HistogramVec
	catchUp            prometheus.Histogram
	writeGate          prometheus.Histogram
	catchUpKeys        prometheus.Counter
	repairedKeys       prometheus.Counter
	repairedPartitions prometheus.Counter
	readIndexBatch     prometheus.Histogram
	standIns           prometheus.Counter
	// Leader: what collection removed.
	tombstonesCollected prometheus.Counter
	movedDropped        prometheus.Counter
	collectRounds       *prometheus.CounterVec
}

func newClusterMetrics(reg prometheus.Registerer, c *Cluster) *clusterMetrics {
	m := &clusterMetrics{
		replicate: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "store_replication_wait_seconds",
			Help:    "Time a write waited for its ack level after the leader's own commit.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 18),
		}, []string{"ack"}),
		catchUp: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "store_replication_catchup_seconds",
			Help:    "Time a new leader spent collecting earlier terms' writes into every partition (writes are accepted before, per partition).",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
		}),
		writeGate: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "store_replication_write_gate_seconds",
			Help:    "Time from a new term to its leader accepting writes: fencing the term and hearing the members' digests.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
		}),
		catchUpKeys: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "store_replication_catchup_entries_total",
			Help: "Entries a new leader adopted from members while catching up.",
		}),
		repairedKeys: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "store_replication_repaired_keys_total",
			Help: "Entries this follower took from the leader by repair (keys moved to it).",
		}),
		readIndexBatch: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "store_replication_read_index_batch_keys",
			Help:    "Keys per read-index request a follower sent the leader (strong reads sharing a round trip).",
			Buckets: prometheus.ExponentialBuckets(1, 2, 10),
		}),
		standIns: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "store_replication_stand_in_copies_total",
			Help: "Copies of entries the leader sent to live non-owners in place of owners that were down or slow to confirm.",
		}),
		repairedPartitions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "store_replication_repaired_partitions_total",
			Help: "Partitions this follower found different from the leader's and pulled.",
		}),
		tombstonesCollected: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "store_replication_tombstones_collected_total",
			Help: "Tombstones this leader collected on every member (older than --tombstone-ttl, every copy settled).",
		}),
		movedDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "store_replication_moved_copies_dropped_total",
			Help: "Copies this leader had members drop from partitions they no longer own, once the owners held them.",
		}),
		collectRounds: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "store_replication_collection_rounds_total",
			Help: "Collection rounds this leader ran with something old enough to collect: complete, or blocked (a member down or not answering, entries still queued, a forget that failed); blocked rounds collect nothing anywhere they did not reach.",
		}, []string{"outcome"}),
	}
	if reg == nil {
		return m
	}
	self := c.cfg.Self
	reg.MustRegister(m.replicate, m.catchUp, m.writeGate, m.catchUpKeys, m.repairedKeys, m.repairedPartitions, m.readIndexBatch, m.standIns, m.tombstonesCollected, m.movedDropped, m.collectRounds,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "store_replication_collection_horizon_seq",
			Help: "Highest seq this node had seen --tombstone-ttl ago: as leader it collects only versions at or below it (0: collection off, or not yet a TTL since start).",
		}, func() float64 { return float64(c.gc.horizon.Seq()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "store_replication_partitions_owned",
			Help: "Partitions this node owns under the current ring.",
		}, func() float64 { return float64(c.partitionsPerMember()[self]) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "store_replication_factor_met",
			Help: "1 when there are at least as many members as the replication factor.",
		}, func() float64 {
			if len(c.members()) >= c.cfg.ReplicationFactor {
				return 1
			}
			return 0
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "store_replication_last_contact_seconds",
			Help: "Time since this node last heard from a leader (0 on the leader): the staleness bound of its stale reads.",
		}, func() float64 { return min(c.LastContact(), 365*24*time.Hour).Seconds() }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "store_replication_queued_entries",
			Help: "Entries the leader has queued for followers and not yet delivered (replication lag).",
		}, func() float64 {
			n := 0
			for _, q := range c.repl.Queued() {
				n += q
			}
			return float64(n)
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "store_replication_repair_lag_seconds",
			Help: "Time since this follower last completed a repair pass against the leader.",
		}, func() float64 {
			if t := c.repair.lastPass(); !t.IsZero() {
				return time.Since(t).Seconds()
			}
			return 0
		}),
	)
	return m
}
