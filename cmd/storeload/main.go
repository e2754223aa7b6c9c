// Command storeload drives a store (one node or many) with a PUT/GET mix and
// reports throughput, status codes and latency quantiles.
//
// It uses vegeta as a library: -rate > 0 is an open-loop constant rate (no
// coordinated omission: latency counts from when a request was due),
// -rate 0 is a closed loop of -concurrency workers. Latencies go into HDR
// histograms. Only loopback or port-forwarded URLs belong here: it sends as
// much traffic as it is told to.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	vegeta "github.com/tsenart/vegeta/v12/lib"
	"github.com/tsenart/vegeta/v12/lib/plot"
)

type config struct {
	targets     []string
	rate        int
	concurrency int
	duration    time.Duration
	requests    uint64
	putRatio    float64
	deleteRatio float64
	keys        int
	dist        string
	zipfS       float64
	valueSize   int
	keyPrefix   string
	ack         string
	consistency string
	prefill     bool
	timeout     time.Duration
	seed        int64
	jsonOut     string
	htmlOut     string
	row         string
}

var errUsage = errors.New("usage")

func parseFlags(args []string, stderr io.Writer) (config, error) {
	fs := flag.NewFlagSet("storeload", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var c config
	var targets string
	fs.StringVar(&targets, "targets", "http://127.0.0.1:8080", "comma-separated base URLs; requests rotate over them")
	fs.IntVar(&c.rate, "rate", 0, "requests per second (open loop); 0 runs a closed loop of -concurrency workers")
	fs.IntVar(&c.concurrency, "concurrency", 16, "closed-loop workers, or the cap on workers at a fixed -rate")
	fs.DurationVar(&c.duration, "duration", 10*time.Second, "how long to run (0 with -requests: until that many)")
	fs.Uint64Var(&c.requests, "requests", 0, "stop after this many requests (0: no limit)")
	fs.Float64Var(&c.putRatio, "put-ratio", 0.5, "fraction of requests that are PUTs (0 = all GET, 1 = all PUT)")
	fs.Float64Var(&c.deleteRatio, "delete-ratio", 0, "fraction of requests that are DELETEs of a random key; -put-ratio + -delete-ratio <= 1, the rest are GETs. With deletes, a 404 (a key deleted already) counts as a success")
	fs.IntVar(&c.keys, "keys", 10000, "size of the key space")
	fs.StringVar(&c.dist, "dist", "uniform", "key distribution: uniform or zipf")
	fs.Float64Var(&c.zipfS, "zipf-s", 1.1, "zipf skew (> 1)")
	fs.IntVar(&c.valueSize, "value-size", 256, "bytes per JSON value")
	fs.StringVar(&c.keyPrefix, "key-prefix", "load/", "prefix of every key")
	fs.StringVar(&c.ack, "ack", "", "ack= level sent with PUTs (leader, quorum, all); empty sends none")
	fs.StringVar(&c.consistency, "consistency", "", "consistency= level sent with GETs (stale, strong); empty sends none")
	fs.BoolVar(&c.prefill, "prefill", true, "write every key once before the run when it includes GETs")
	fs.DurationVar(&c.timeout, "timeout", 30*time.Second, "per-request timeout")
	fs.Int64Var(&c.seed, "seed", 1, "random seed for keys and the mix")
	fs.StringVar(&c.jsonOut, "json", "", "write the report as JSON to this file")
	fs.StringVar(&c.htmlOut, "html", "", "write an HTML latency plot to this file")
	fs.StringVar(&c.row, "markdown-row", "", "also print the result as one markdown table row with this label")
	if err := fs.Parse(args); err != nil {
		return c, fmt.Errorf("%w: %w", errUsage, err)
	}
	bad := func(format string, a ...any) (config, error) {
		return c, fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, a...))
	}
	for _, t := range strings.Split(targets, ",") {
		u, err := url.Parse(strings.TrimSpace(t))
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return bad("-targets: %q is not an http(s) URL", t)
		}
		c.targets = append(c.targets, strings.TrimRight(u.String(), "/"))
	}
	switch {
	case c.rate < 0:
		return bad("-rate must be >= 0")
	case c.concurrency < 1:
		return bad("-concurrency must be >= 1")
	case c.duration <= 0 && c.requests == 0:
		return bad("give -duration or -requests")
	case c.putRatio < 0 || c.putRatio > 1:
		return bad("-put-ratio must be in [0, 1]")
	case c.deleteRatio < 0 || c.putRatio+c.deleteRatio > 1:
		return bad("-delete-ratio must be >= 0 and -put-ratio + -delete-ratio <= 1")
	case c.keys < 1:
		return bad("-keys must be >= 1")
	case c.dist != "uniform" && c.dist != "zipf":
		return bad("-dist must be uniform or zipf")
	case c.dist == "zipf" && c.zipfS <= 1:
		return bad("-zipf-s must be > 1")
	case c.valueSize < 2:
		return bad("-value-size must be >= 2 (a JSON string)")
	}
	return c, nil
}

func main() {
	cfg, err := parseFlags(os.Args[1:], os.Stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "storeload:", err)
		os.Exit(2)
	}
	rep, err := run(cfg, os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "storeload:", err)
		os.Exit(1)
	}
	if rep.Success == 0 {
		os.Exit(1)
	}
}

func newAttacker(cfg config) *vegeta.Attacker {
	return vegeta.NewAttacker(
		vegeta.Workers(uint64(cfg.concurrency)),
		vegeta.MaxWorkers(uint64(cfg.concurrency)),
		vegeta.Connections(cfg.concurrency),
		vegeta.MaxConnections(cfg.concurrency),
		vegeta.Timeout(cfg.timeout),
		vegeta.KeepAlive(true),
		vegeta.Redirects(vegeta.NoFollow),
		vegeta.MaxBody(4096),
	)
}

// run performs the optional prefill and the measured run, prints the report
// and writes the JSON/HTML outputs.
func run(cfg config, out io.Writer) (Report, error) {
	w, err := newWorkload(cfg)
	if err != nil {
		return Report{}, err
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sig)

	if cfg.prefill && cfg.putRatio < 1 {
		fmt.Fprintf(out, "prefilling %d keys...\n", cfg.keys)
		fill := newRecorder(false)
		atk := newAttacker(cfg)
		for res := range atk.Attack(w.prefillTargeter(), vegeta.Rate{}, 0, "prefill") {
			fill.add(res)
		}
		if fill.ok != fill.requests {
			rep := fill.report(nil)
			return Report{}, fmt.Errorf("prefill: %d of %d writes failed: %v", fill.requests-fill.ok, fill.requests, rep.StatusCodes)
		}
	}

	rate := vegeta.Rate{Freq: cfg.rate, Per: time.Second}
	mode := fmt.Sprintf("closed loop, %d workers", cfg.concurrency)
	if cfg.rate == 0 {
		rate = vegeta.Rate{}
	} else {
		mode = fmt.Sprintf("%d req/s (open loop, up to %d workers)", cfg.rate, cfg.concurrency)
	}
	fmt.Fprintf(out, "load: %s, %s, put ratio %.2f, delete ratio %.2f, %d keys (%s), %d B values, targets %s\n",
		mode, limitText(cfg), cfg.putRatio, cfg.deleteRatio, cfg.keys, cfg.dist, cfg.valueSize, strings.Join(cfg.targets, ","))

	rec := newRecorder(cfg.deleteRatio > 0)
	var p *plot.Plot
	if cfg.htmlOut != "" {
		p = plot.New(plot.Title("storeload latency"))
	}
	atk := newAttacker(cfg)
	results := atk.Attack(w.targeter(), rate, cfg.duration, "run")
	for {
		select {
		case res, ok := <-results:
			if !ok {
				return finish(cfg, rec, p, out)
			}
			rec.add(res)
			if p != nil && res.Method != "" {
				_ = p.Add(res)
			}
		case <-sig:
			atk.Stop() // results drain, then the report is written
		}
	}
}

func limitText(cfg config) string {
	switch {
	case cfg.requests > 0 && cfg.duration > 0:
		return fmt.Sprintf("%d requests or %s", cfg.requests, cfg.duration)
	case cfg.requests > 0:
		return fmt.Sprintf("%d requests", cfg.requests)
	}
	return cfg.duration.String()
}

func finish(cfg config, rec *recorder, p *plot.Plot, out io.Writer) (Report, error) {
	rep := rec.report(map[string]any{
		"targets": cfg.targets, "rate": cfg.rate, "concurrency": cfg.concurrency,
		"duration": cfg.duration.String(), "requests": cfg.requests, "put_ratio": cfg.putRatio, "delete_ratio": cfg.deleteRatio,
		"keys": cfg.keys, "dist": cfg.dist, "value_size": cfg.valueSize, "ack": cfg.ack,
		"consistency": cfg.consistency,
	})
	rep.print(out)
	if cfg.row != "" {
		rep.markdownRow(out, cfg.row)
	}
	if cfg.jsonOut != "" {
		b, _ := json.MarshalIndent(rep, "", "  ")
		if err := os.WriteFile(cfg.jsonOut, append(b, '\n'), 0o644); err != nil {
			return rep, err
		}
	}
	if p != nil {
		p.Close()
		f, err := os.Create(cfg.htmlOut)
		if err != nil {
			return rep, err
		}
		defer f.Close()
		if _, err := p.WriteTo(f); err != nil {
			return rep, err
		}
	}
	return rep, nil
}
