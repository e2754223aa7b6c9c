package main

import (
	"fmt"
	"math/rand"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"

	vegeta "github.com/tsenart/vegeta/v12/lib"
)

// workload generates the requests of one run. Its targeter is called
// concurrently by vegeta's workers.
type workload struct {
	targets     []string
	putRatio    float64
	deleteRatio float64
	keys        int
	keyPrefix   string
	value       []byte
	ack         string
	consistency string
	limit       uint64 // 0: unlimited (the duration bounds the run)

	n    atomic.Uint64
	mu   sync.Mutex // guards rng and zipf
	rng  *rand.Rand
	zipf *rand.Zipf
}

func newWorkload(cfg config) (*workload, error) {
	w := &workload{
		targets:     cfg.targets,
		putRatio:    cfg.putRatio,
		deleteRatio: cfg.deleteRatio,
		keys:        cfg.keys,
		keyPrefix:   cfg.keyPrefix,
		value:       jsonValue(cfg.valueSize),
		ack:         cfg.ack,
		consistency: cfg.consistency,
		limit:       cfg.requests,
		rng:         rand.New(rand.NewSource(cfg.seed)),
	}
	if cfg.dist == "zipf" {
		// s > 1 skews towards low key numbers; v = 1 keeps key 0 hottest.
		w.zipf = rand.NewZipf(w.rng, cfg.zipfS, 1, uint64(cfg.keys-1))
	}
	return w, nil
}

// jsonValue is a JSON string of exactly size bytes (quotes included).
func jsonValue(size int) []byte {
	if size < 2 {
		size = 2
	}
	return []byte(`"` + strings.Repeat("v", size-2) + `"`)
}

func (w *workload) key() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.zipf != nil {
		return int(w.zipf.Uint64())
	}
	return w.rng.Intn(w.keys)
}

// op draws the next request's method from the mix.
func (w *workload) op() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	switch x := w.rng.Float64(); {
	case x < w.putRatio:
		return http.MethodPut
	case x < w.putRatio+w.deleteRatio:
		return http.MethodDelete
	}
	return http.MethodGet
}

func (w *workload) url(target string, key int, param, value string) string {
	u := fmt.Sprintf("%s/v1/kv/%s%d", strings.TrimRight(target, "/"), w.keyPrefix, key)
	if value != "" {
		u += "?" + param + "=" + url.QueryEscape(value)
	}
	return u
}

// targeter issues the mixed workload, rotating over the target URLs.
func (w *workload) targeter() vegeta.Targeter {
	hdr := http.Header{"Content-Type": []string{"application/json"}}
	return func(t *vegeta.Target) error {
		i := w.n.Add(1)
		if w.limit > 0 && i > w.limit {
			return vegeta.ErrNoTargets
		}
		target := w.targets[int(i)%len(w.targets)]
		key := w.key()
		switch w.op() {
		case http.MethodPut:
			*t = vegeta.Target{Method: http.MethodPut, URL: w.url(target, key, "ack", w.ack), Body: w.value, Header: hdr}
		case http.MethodDelete:
			*t = vegeta.Target{Method: http.MethodDelete, URL: w.url(target, key, "ack", w.ack)}
		default:
			*t = vegeta.Target{Method: http.MethodGet, URL: w.url(target, key, "consistency", w.consistency)}
		}
		return nil
	}
}

// prefillTargeter writes every key once, so reads of the run find them.
func (w *workload) prefillTargeter() vegeta.Targeter {
	var next atomic.Int64
	hdr := http.Header{"Content-Type": []string{"application/json"}}
	return func(t *vegeta.Target) error {
		k := int(next.Add(1) - 1)
		if k >= w.keys {
			return vegeta.ErrNoTargets
		}
		target := w.targets[k%len(w.targets)]
		*t = vegeta.Target{Method: http.MethodPut, URL: w.url(target, k, "ack", w.ack), Body: w.value, Header: hdr}
		return nil
	}
}
