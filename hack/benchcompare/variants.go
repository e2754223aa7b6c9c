package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// variant is one store build or setting to compare: a binary and extra
// flags for every node.
type variant struct {
	name, bin, args string
}

type variantFlags []variant

func (v *variantFlags) String() string { return fmt.Sprint(*v) }

func (v *variantFlags) Set(s string) error {
	name, rest, ok := strings.Cut(s, "=")
	if !ok || name == "" || strings.TrimSpace(rest) == "" {
		return errors.New("want name=binary [flags...]")
	}
	bin, args, _ := strings.Cut(strings.TrimSpace(rest), " ")
	*v = append(*v, variant{name: name, bin: bin, args: strings.TrimSpace(args)})
	return nil
}

// runVariants measures every shape on a fresh local cluster of each
// variant per round, rotating the order so that no variant always runs
// first (a cold page cache, a warm one), and prints medians and ratios to
// the first variant.
func runVariants(vs []variant, storeLoad string, port, rounds int, out, state string) error {
	results := map[string]map[string][]result{} // variant → shape → rounds
	var names []string
	for r := range rounds {
		for k := range vs {
			v := vs[(r+k)%len(vs)]
			if err := clusterUp(v); err != nil {
				return fmt.Errorf("%s: %w", v.name, err)
			}
			leader, follower, err := storeRoles(port)
			if err != nil {
				clusterDown()
				return fmt.Errorf("%s: %w", v.name, err)
			}
			for _, sh := range shapes(leader, follower) {
				s, err := runStore(storeLoad, sh, filepath.Join(state, "variant.json"))
				if err != nil {
					clusterDown()
					return fmt.Errorf("%s, %s: %w", v.name, sh.Name, err)
				}
				if results[v.name] == nil {
					results[v.name] = map[string][]result{}
				}
				if r == 0 && k == 0 {
					names = append(names, sh.Name)
				}
				results[v.name][sh.Name] = append(results[v.name][sh.Name], s)
				fmt.Fprintf(os.Stderr, "round %d, %s, %s: %.0f/s p50 %.2f ms\n", r+1, v.name, sh.Name, s.OpsPerSec, s.P50ms)
			}
			clusterDown()
		}
	}
	base := vs[0].name
	fmt.Printf("\nstore variants, medians of %d rounds (order rotating), %s, 3 nodes on loopback, 256 B values; ratios to %s\n", rounds, time.Now().UTC().Format("2006-01-02"), base)
	header := "| shape |"
	rule := "|---|"
	for _, v := range vs {
		header += fmt.Sprintf(" %s ops/s | %s p50 / p99 ms |", v.name, v.name)
		rule += "---|---|"
		if v.name != base {
			header += fmt.Sprintf(" %s ÷ %s |", v.name, base)
			rule += "---|"
		}
	}
	fmt.Println(header)
	fmt.Println(rule)
	summary := map[string]map[string]result{}
	for _, sh := range names {
		line := "| " + sh + " |"
		b := median(results[base][sh])
		for _, v := range vs {
			m := median(results[v.name][sh])
			if summary[v.name] == nil {
				summary[v.name] = map[string]result{}
			}
			summary[v.name][sh] = m
			line += fmt.Sprintf(" %.0f | %.2f / %.2f |", m.OpsPerSec, m.P50ms, m.P99ms)
			if v.name != base {
				line += fmt.Sprintf(" %.2f× |", m.OpsPerSec/b.OpsPerSec)
			}
		}
		fmt.Println(line)
	}
	j, _ := json.MarshalIndent(map[string]any{"date": time.Now().UTC(), "rounds": rounds, "medians": summary}, "", "  ")
	return os.WriteFile(out, append(j, '\n'), 0o644)
}

// clusterUp starts a fresh local cluster (make cluster) of variant v.
func clusterUp(v variant) error {
	clusterDown()
	if err := os.RemoveAll(".cluster/data"); err != nil {
		return err
	}
	cmd := exec.Command("bash", "hack/cluster.sh", "up", "--store", v.bin, "--store-args", v.args)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("cluster up: %v: %s", err, lastLines(out))
	}
	return nil
}

func clusterDown() { _ = exec.Command("bash", "hack/cluster.sh", "down").Run() }
