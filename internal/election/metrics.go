package election

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	isLeader    prometheus.Gauge
	epoch       prometheus.Gauge
	transitions prometheus.Counter
	// expiryTakeovers counts Leases this node took over the moment they
	// expired (Elector.takeOverIfExpired).
	expiryTakeovers prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		isLeader: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "store", Subsystem: "election", Name: "is_leader",
			Help: "1 while this node holds the Lease and its write gate is open.",
		}),
		epoch: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "store", Subsystem: "election", Name: "epoch",
			Help: "Epoch (leaseTransitions+1) of the leader this node last observed.",
		}),
		transitions: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "store", Subsystem: "election", Name: "leader_changes_total",
			Help: "Changes of the observed Lease holder.",
		}),
		expiryTakeovers: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "store", Subsystem: "election", Name: "expiry_takeovers_total",
			Help: "Leases this node took over the moment they expired (a leader that stopped renewing), instead of at its next poll.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.isLeader, m.epoch, m.transitions, m.expiryTakeovers)
	}
	return m
}
