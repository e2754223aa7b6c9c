//go:build failoverbench

package main

import (
	"fmt"
	"os"
	"slices"
	"syscall"
	"testing"
	"time"
)

// TestFailoverBench measures leader handoff with the default timings
// (15s/10s/2s): 5 graceful (SIGTERM) and 5 crash (SIGKILL) rounds, each the
// longest gap between two acknowledged writes of a steady client writing
// through the surviving nodes. `make bench-failover` runs it; it reports the
// figures against the marks (a report, not a pass/fail test) and is not part
// of make test.
func TestFailoverBench(t *testing.T) {
	const lease, retry = 15 * time.Second, 2 * time.Second
	c := startCluster(t, 3, "--lease-duration", lease.String(), "--renew-deadline", "10s", "--retry-period", retry.String())
	measure := func(sig syscall.Signal) time.Duration {
		leader := c.leader(lease + 3*retry + 10*time.Second)
		var others []string
		for _, id := range c.ids() {
			if id != leader {
				others = append(others, id)
			}
		}
		c.awaitLeaderKnown(leader, others...)
		w := c.startWriter(func() []string { return others })
		waitFor(t, 30*time.Second, "steady writes", func() bool { return w.count() >= 20 })
		at := time.Now()
		p := c.nodes[leader]
		if err := p.cmd.Process.Signal(sig); err != nil {
			t.Fatal(err)
		}
		<-p.done
		n := w.count()
		waitFor(t, lease+3*retry+30*time.Second, "writes after the handoff", func() bool { return w.count() >= n+20 })
		gap := longestGap(w.halt(), at)
		c.start(leader)
		return gap
	}
	report := func(name string, gaps []time.Duration, mark time.Duration) {
		s := slices.Clone(gaps)
		slices.Sort(s)
		med := s[len(s)/2]
		verdict := "met"
		if med > mark {
			verdict = fmt.Sprintf("MISSED by %s", (med - mark).Round(time.Millisecond))
		}
		line := fmt.Sprintf("| %s | %s | %s | %s | ≤ %s | %s |", name, med.Round(time.Millisecond), s[0].Round(time.Millisecond), s[len(s)-1].Round(time.Millisecond), mark, verdict)
		fmt.Fprintln(os.Stdout, line)
	}
	var graceful, crash []time.Duration
	for range 5 {
		graceful = append(graceful, measure(syscall.SIGTERM))
	}
	for range 5 {
		crash = append(crash, measure(syscall.SIGKILL))
	}
	fmt.Fprintf(os.Stdout, "\nfailover with default timings (lease %s, renew 10s, retry %s), 3 nodes on loopback, %s\n", lease, retry, time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintln(os.Stdout, "| handoff | median | min | max | mark | |\n|---|---|---|---|---|---|")
	report("graceful (SIGTERM), 5 rounds", graceful, time.Second)
	report("crash (SIGKILL), 5 rounds", crash, lease+retry)
}
