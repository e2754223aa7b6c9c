package main

import (
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
	vegeta "github.com/tsenart/vegeta/v12/lib"
)

// recorder aggregates results into HDR histograms (1µs to 60s, 3
// significant digits) per operation and overall.
type recorder struct {
	started, ended time.Time
	all, put, get  *hdrhistogram.Histogram
	del            *hdrhistogram.Histogram
	codes          map[string]int // "PUT 200", "GET 503", "error: ..." → count
	requests, ok   int
	// deleting: the run deletes keys, so a 404 is the store's right
	// answer to a GET or DELETE of a key deleted already, not a failure.
	deleting bool
}

func newRecorder(deleting bool) *recorder {
	h := func() *hdrhistogram.Histogram { return hdrhistogram.New(1, 60_000_000, 3) }
	return &recorder{all: h(), put: h(), get: h(), del: h(), codes: map[string]int{}, deleting: deleting}
}

func (r *recorder) add(res *vegeta.Result) {
	if res.Method == "" { // the targeter's end-of-requests marker, not a request
		return
	}
	if r.started.IsZero() || res.Timestamp.Before(r.started) {
		r.started = res.Timestamp
	}
	if end := res.End(); end.After(r.ended) {
		r.ended = end
	}
	r.requests++
	us := max(res.Latency.Microseconds(), 1)
	_ = r.all.RecordValue(us)
	switch res.Method {
	case "PUT":
		_ = r.put.RecordValue(us)
	case "DELETE":
		_ = r.del.RecordValue(us)
	default:
		_ = r.get.RecordValue(us)
	}
	switch {
	case res.Code == 0:
		r.codes["error: "+shortError(res.Error)]++
	default:
		r.codes[res.Method+" "+strconv.Itoa(int(res.Code))]++
		if res.Code >= 200 && res.Code < 300 || r.deleting && res.Code == 404 {
			r.ok++
		}
	}
}

func shortError(s string) string {
	if i := strings.LastIndex(s, ": "); i >= 0 {
		s = s[i+2:]
	}
	return s
}

// Report is the machine-readable result of a run (-json).
type Report struct {
	Config      map[string]any `json:"config"`
	Started     time.Time      `json:"started"`
	DurationS   float64        `json:"duration_s"`
	Requests    int            `json:"requests"`
	Success     int            `json:"success"`
	Throughput  float64        `json:"throughput_rps"` // successful requests per second
	StatusCodes map[string]int `json:"status_codes"`
	Latency     Latency        `json:"latency_ms"`
	Put         *Latency       `json:"put_latency_ms,omitempty"`
	Get         *Latency       `json:"get_latency_ms,omitempty"`
	Delete      *Latency       `json:"delete_latency_ms,omitempty"`
}

// Latency quantiles in milliseconds.
type Latency struct {
	Count int64   `json:"count"`
	Mean  float64 `json:"mean"`
	P50   float64 `json:"p50"`
	P90   float64 `json:"p90"`
	P99   float64 `json:"p99"`
	P999  float64 `json:"p99_9"`
	Max   float64 `json:"max"`
}

func latency(h *hdrhistogram.Histogram) Latency {
	ms := func(us int64) float64 { return float64(us) / 1000 }
	return Latency{
		Count: h.TotalCount(),
		Mean:  h.Mean() / 1000,
		P50:   ms(h.ValueAtQuantile(50)),
		P90:   ms(h.ValueAtQuantile(90)),
		P99:   ms(h.ValueAtQuantile(99)),
		P999:  ms(h.ValueAtQuantile(99.9)),
		Max:   ms(h.Max()),
	}
}

func (r *recorder) report(cfg map[string]any) Report {
	d := r.ended.Sub(r.started)
	rep := Report{
		Config:      cfg,
		Started:     r.started,
		DurationS:   d.Seconds(),
		Requests:    r.requests,
		Success:     r.ok,
		StatusCodes: r.codes,
		Latency:     latency(r.all),
	}
	if d > 0 {
		rep.Throughput = float64(r.ok) / d.Seconds()
	}
	if r.put.TotalCount() > 0 {
		l := latency(r.put)
		rep.Put = &l
	}
	if r.get.TotalCount() > 0 {
		l := latency(r.get)
		rep.Get = &l
	}
	if r.del.TotalCount() > 0 {
		l := latency(r.del)
		rep.Delete = &l
	}
	return rep
}

// print writes the human-readable table.
func (rep Report) print(w io.Writer) {
	fmt.Fprintf(w, "requests %d in %.2fs, %d ok: %.0f ok/s\n", rep.Requests, rep.DurationS, rep.Success, rep.Throughput)
	codes := make([]string, 0, len(rep.StatusCodes))
	for c := range rep.StatusCodes {
		codes = append(codes, c)
	}
	sort.Strings(codes)
	fmt.Fprint(w, "status")
	for _, c := range codes {
		fmt.Fprintf(w, "  %s×%d", c, rep.StatusCodes[c])
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "%-8s %8s %9s %9s %9s %9s %9s %9s\n", "latency", "count", "mean ms", "p50", "p90", "p99", "p99.9", "max")
	row := func(name string, l *Latency) {
		if l != nil {
			fmt.Fprintf(w, "%-8s %8d %9.3f %9.3f %9.3f %9.3f %9.3f %9.3f\n", name, l.Count, l.Mean, l.P50, l.P90, l.P99, l.P999, l.Max)
		}
	}
	row("all", &rep.Latency)
	row("put", rep.Put)
	row("get", rep.Get)
}

// MarkdownHeader matches markdownRow's columns.
const MarkdownHeader = "| workload | ok/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | non-2xx |\n|---|---|---|---|---|---|---|---|"

// markdownRow prints one table row (see MarkdownHeader).
func (rep Report) markdownRow(w io.Writer, label string) {
	l := rep.Latency
	fmt.Fprintf(w, "| %s | %.0f | %.2f | %.2f | %.2f | %.2f | %.2f | %d |\n",
		label, rep.Throughput, l.P50, l.P90, l.P99, l.P999, l.Max, rep.Requests-rep.Success)
}
