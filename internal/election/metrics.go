package election

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	isLeader    prometheus.Gauge
	epoch       prometheus.Gauge
	transitions prometheus.Counter
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
	}
	if reg != nil {
		reg.MustRegister(m.isLeader, m.epoch, m.transitions)
	}
	return m
}
