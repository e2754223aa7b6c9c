// Command benchcompare runs the same load shapes against a 3-member etcd and
// a 3-node store cluster on loopback, alternating A B A B, and prints the
// medians and the store ÷ etcd ratios. `make bench-compare` starts the store
// cluster (make cluster), builds the tools and runs this.
//
// With -variant (repeated), it compares store builds or settings with each
// other instead of with etcd: each round starts a fresh local cluster of
// every variant in turn (the order rotating from round to round), runs
// every shape once, and stops it; the table gives each variant's medians
// and its ratio to the first. `make bench-ab` uses it to compare this tree
// with an earlier commit.
//
// etcd is driven by its own benchmark tool (hack/etcdbench); the store by
// cmd/storeload. Both are closed loops with the same client counts, 256 B
// values and request totals, over kept-alive connections.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

type result struct {
	OpsPerSec float64 `json:"ops_per_sec"`
	P50ms     float64 `json:"p50_ms"`
	P99ms     float64 `json:"p99_ms"`
}

type shape struct {
	Name    string
	etcd    []string // etcdbench arguments after the global flags
	clients int
	store   []string // storeload arguments; {leader}/{follower} are substituted
	total   int
}

type row struct {
	Shape  string  `json:"shape"`
	Etcd   result  `json:"etcd"`
	Store  result  `json:"store"`
	Ratio  float64 `json:"throughput_ratio"`
	Rounds int     `json:"rounds"`
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "benchcompare:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		etcdBin   = flag.String("etcd", "", "etcd server binary (from make controlplane)")
		etcdBench = flag.String("etcdbench", ".bench/etcdbench", "etcd benchmark tool")
		storeLoad = flag.String("storeload", ".bench/storeload", "store load tool")
		port      = flag.Int("store-port", 18080, "port of the running store cluster (make cluster)")
		rounds    = flag.Int("rounds", 3, "A/B repeats per shape")
		out       = flag.String("out", ".bench/bench-compare.json", "JSON results")
		state     = flag.String("state", ".bench", "scratch folder")
		variants  variantFlags
	)
	flag.Var(&variants, "variant", "`name=binary [flags...]`: compare store variants instead of etcd (repeat; the first is the baseline)")
	flag.Parse()
	if len(variants) > 0 {
		return runVariants(variants, *storeLoad, *port, *rounds, *out, *state)
	}
	if *etcdBin == "" {
		return errors.New("-etcd is required")
	}
	leader, follower, err := storeRoles(*port)
	if err != nil {
		return err
	}
	stopEtcd, err := startEtcd(*etcdBin, filepath.Join(*state, "etcd"))
	if err != nil {
		return err
	}
	defer stopEtcd()

	defer stopEtcd()
	return compareEtcd(*etcdBench, *storeLoad, *rounds, *out, *state, leader, follower)
}

// shapes are the load shapes, with the store's targets filled in.
func shapes(leader, follower string) []shape {
	return []shape{
		{Name: "put, 1 client, via a follower", clients: 1, total: 2000,
			etcd: []string{"put", "--key-size", "8", "--val-size", "256"}, store: []string{"-targets", follower, "-put-ratio", "1"}},
		{Name: "put, 1 client, to the leader", clients: 1, total: 2000,
			etcd: []string{"put", "--key-size", "8", "--val-size", "256"}, store: []string{"-targets", leader, "-put-ratio", "1"}},
		{Name: "put, 100 clients, via a follower", clients: 100, total: 20000,
			etcd: []string{"put", "--key-size", "8", "--val-size", "256"}, store: []string{"-targets", follower, "-put-ratio", "1"}},
		{Name: "put, 100 clients, to the leader", clients: 100, total: 20000,
			etcd: []string{"put", "--key-size", "8", "--val-size", "256"}, store: []string{"-targets", leader, "-put-ratio", "1"}},
		{Name: "read, 100 clients, strong vs linearizable", clients: 100, total: 40000,
			etcd: []string{"range", "bench-key", "--consistency", "l"}, store: []string{"-targets", follower, "-put-ratio", "0", "-consistency", "strong"}},
		{Name: "read, 100 clients, stale vs serializable", clients: 100, total: 40000,
			etcd: []string{"range", "bench-key", "--consistency", "s"}, store: []string{"-targets", follower, "-put-ratio", "0", "-consistency", "stale"}},
	}
}

// compareEtcd runs every shape against etcd and the running store cluster,
// alternating, and prints the medians and ratios.
func compareEtcd(etcdBench, storeLoad string, rounds int, out, state, leader, follower string) error {
	endpoints := "127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793"
	var rows []row
	for _, sh := range shapes(leader, follower) {
		var es, ss []result
		for i := range rounds {
			e, err := runEtcd(etcdBench, endpoints, sh)
			if err != nil {
				return fmt.Errorf("%s (etcd): %w", sh.Name, err)
			}
			s, err := runStore(storeLoad, sh, filepath.Join(state, fmt.Sprintf("store-%d.json", i)))
			if err != nil {
				return fmt.Errorf("%s (store): %w", sh.Name, err)
			}
			fmt.Fprintf(os.Stderr, "%s round %d: etcd %.0f/s, store %.0f/s\n", sh.Name, i+1, e.OpsPerSec, s.OpsPerSec)
			es, ss = append(es, e), append(ss, s)
		}
		r := row{Shape: sh.Name, Etcd: median(es), Store: median(ss), Rounds: rounds}
		r.Ratio = r.Store.OpsPerSec / r.Etcd.OpsPerSec
		rows = append(rows, r)
	}
	fmt.Printf("\nstore ÷ etcd, medians of %d alternating rounds, %s, %s\n", rounds, time.Now().UTC().Format("2006-01-02"), "3 members / 3 nodes on loopback, 256 B values")
	fmt.Println("| shape | etcd ops/s | store ops/s | ratio | etcd p50 / p99 ms | store p50 / p99 ms |")
	fmt.Println("|---|---|---|---|---|---|")
	for _, r := range rows {
		fmt.Printf("| %s | %.0f | %.0f | %.2f× | %.2f / %.2f | %.2f / %.2f |\n", r.Shape, r.Etcd.OpsPerSec, r.Store.OpsPerSec, r.Ratio, r.Etcd.P50ms, r.Etcd.P99ms, r.Store.P50ms, r.Store.P99ms)
	}
	b, _ := json.MarshalIndent(map[string]any{"date": time.Now().UTC(), "rounds": rounds, "rows": rows}, "", "  ")
	return os.WriteFile(out, append(b, '\n'), 0o644)
}

// storeRoles finds the leader and a follower of the running store cluster.
func storeRoles(port int) (leader, follower string, err error) {
	for i := 1; i <= 3; i++ {
		url := fmt.Sprintf("http://127.0.0.%d:%d", i, port)
		resp, err := http.Get(url + "/v1/status")
		if err != nil {
			return "", "", fmt.Errorf("store cluster not reachable (run make cluster): %w", err)
		}
		var st struct{ Role string }
		err = json.NewDecoder(resp.Body).Decode(&st)
		resp.Body.Close()
		if err != nil {
			return "", "", err
		}
		if st.Role == "leader" {
			leader = url
		} else if follower == "" {
			follower = url
		}
	}
	if leader == "" || follower == "" {
		return "", "", errors.New("store cluster has no leader yet")
	}
	return leader, follower, nil
}

// startEtcd runs a 3-member etcd on 127.0.0.1:2379{1,2,3} (peers 2380x).
func startEtcd(bin, dir string) (stop func(), err error) {
	_ = os.RemoveAll(dir)
	var procs []*exec.Cmd
	stop = func() {
		for _, p := range procs {
			_ = p.Process.Kill()
			_ = p.Wait()
		}
	}
	cluster := "m1=http://127.0.0.1:23801,m2=http://127.0.0.1:23802,m3=http://127.0.0.1:23803"
	for i := 1; i <= 3; i++ {
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return stop, err
		}
		log, err := os.Create(filepath.Join(dir, fmt.Sprintf("m%d.log", i)))
		if err != nil {
			return stop, err
		}
		cmd := exec.Command(bin, "--name", fmt.Sprintf("m%d", i), "--data-dir", filepath.Join(dir, fmt.Sprintf("m%d", i)),
			"--listen-client-urls", fmt.Sprintf("http://127.0.0.1:2379%d", i), "--advertise-client-urls", fmt.Sprintf("http://127.0.0.1:2379%d", i),
			"--listen-peer-urls", fmt.Sprintf("http://127.0.0.1:2380%d", i), "--initial-advertise-peer-urls", fmt.Sprintf("http://127.0.0.1:2380%d", i),
			"--initial-cluster", cluster, "--initial-cluster-state", "new", "--log-level", "error")
		cmd.Stdout, cmd.Stderr = log, log
		if err := cmd.Start(); err != nil {
			return stop, err
		}
		procs = append(procs, cmd)
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := http.Get("http://127.0.0.1:23791/health"); err == nil {
			var h struct{ Health string }
			_ = json.NewDecoder(resp.Body).Decode(&h)
			resp.Body.Close()
			if h.Health == "true" {
				return stop, nil
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	return stop, errors.New("etcd did not become healthy in 30s")
}

var (
	reRate = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	reP50  = regexp.MustCompile(`50% in ([0-9.]+) secs`)
	reP99  = regexp.MustCompile(`99% in ([0-9.]+) secs`)
)

func runEtcd(bin, endpoints string, sh shape) (result, error) {
	args := append([]string{"--endpoints", endpoints, "--clients", strconv.Itoa(sh.clients), "--conns", strconv.Itoa(sh.clients),
		"--total", strconv.Itoa(sh.total)}, sh.etcd...)
	out, err := exec.Command(bin, args...).CombinedOutput()
	if err != nil {
		return result{}, fmt.Errorf("%v: %s", err, lastLines(out))
	}
	num := func(re *regexp.Regexp) float64 {
		m := re.FindSubmatch(out)
		if m == nil {
			return 0
		}
		f, _ := strconv.ParseFloat(string(m[1]), 64)
		return f
	}
	r := result{OpsPerSec: num(reRate), P50ms: num(reP50) * 1000, P99ms: num(reP99) * 1000}
	if r.OpsPerSec == 0 {
		return r, fmt.Errorf("no Requests/sec in the output: %s", lastLines(out))
	}
	return r, nil
}

func runStore(bin string, sh shape, jsonOut string) (result, error) {
	args := append([]string{"-duration", "0", "-requests", strconv.Itoa(sh.total), "-concurrency", strconv.Itoa(sh.clients),
		"-value-size", "256", "-keys", "10000", "-json", jsonOut}, sh.store...)
	out, err := exec.Command(bin, args...).CombinedOutput()
	if err != nil {
		return result{}, fmt.Errorf("%v: %s", err, lastLines(out))
	}
	var rep struct {
		Throughput float64 `json:"throughput_rps"`
		Requests   int     `json:"requests"`
		Success    int     `json:"success"`
		Latency    struct {
			P50 float64 `json:"p50"`
			P99 float64 `json:"p99"`
		} `json:"latency_ms"`
	}
	b, err := os.ReadFile(jsonOut)
	if err == nil {
		err = json.Unmarshal(b, &rep)
	}
	if err != nil {
		return result{}, err
	}
	if rep.Success != rep.Requests {
		return result{}, fmt.Errorf("%d of %d requests failed", rep.Requests-rep.Success, rep.Requests)
	}
	return result{OpsPerSec: rep.Throughput, P50ms: rep.Latency.P50, P99ms: rep.Latency.P99}, nil
}

func median(rs []result) result {
	pick := func(f func(result) float64) float64 {
		v := make([]float64, len(rs))
		for i, r := range rs {
			v[i] = f(r)
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	return result{
		OpsPerSec: pick(func(r result) float64 { return r.OpsPerSec }),
		P50ms:     pick(func(r result) float64 { return r.P50ms }),
		P99ms:     pick(func(r result) float64 { return r.P99ms }),
	}
}

func lastLines(b []byte) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-5):], "\n")
}
