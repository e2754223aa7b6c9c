package main

import (
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
)

// kvInput and kvOutput are one operation of the history: a PUT of a unique
// value, or a consistency=strong GET.
type kvInput struct {
	put   bool
	key   string
	value string
}

type kvOutput struct {
	value   string // "" when not found
	unknown bool   // a PUT whose outcome the store said is unknown (or never answered)
}

// registerModel is a map of registers, checked one key at a time.
var registerModel = porcupine.Model{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		byKey := map[string][]porcupine.Operation{}
		for _, op := range history {
			k := op.Input.(kvInput).key
			byKey[k] = append(byKey[k], op)
		}
		var out [][]porcupine.Operation
		for _, ops := range byKey {
			out = append(out, ops)
		}
		return out
	},
	Init: func() any { return "" },
	Step: func(state, input, output any) (bool, any) {
		in, out := input.(kvInput), output.(kvOutput)
		if in.put {
			return true, in.value
		}
		return out.value == state.(string), state
	},
	DescribeOperation: func(input, output any) string {
		in, out := input.(kvInput), output.(kvOutput)
		if in.put {
			if out.unknown {
				return fmt.Sprintf("put(%s, %s) -> ?", in.key, in.value)
			}
			return fmt.Sprintf("put(%s, %s)", in.key, in.value)
		}
		return fmt.Sprintf("get(%s) -> %q", in.key, out.value)
	},
}

// chaosDuration is how long the history runs: short in `make test`,
// CHAOS_DURATION (e.g. 3m, from `make chaos`) for a long run.
func chaosDuration(t *testing.T) time.Duration {
	if s := os.Getenv("CHAOS_DURATION"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatalf("CHAOS_DURATION=%q: %v", s, err)
		}
		return d
	}
	return 12 * time.Second
}

// While clients write and read a few keys through every node, the leader is
// killed (and later restarted) and a follower is paused (and resumed),
// round after round. The history must be linearizable.
func TestLinearizable_StrongReadsAndWrites_LeaderKilled_FollowerPaused(t *testing.T) {
	c := startCluster(t, 3)
	leader := c.leader(30 * time.Second)
	c.awaitLeaderKnown(leader, c.ids()...)
	duration := chaosDuration(t)

	start := time.Now()
	var (
		mu  sync.Mutex
		ops []porcupine.Operation
	)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	const clients = 4
	keys := []string{"lin/a", "lin/b", "lin/c"}
	for cl := range clients {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(cl), 7))
			// Longer than a node's own wait for a leader (forwardTimeout), so
			// the store, not the client, decides what a slow call meant.
			client := &http.Client{Timeout: forwardTimeout(testLease, testRetry) + 10*time.Second}
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				via := c.memberIDs[rng.IntN(len(c.memberIDs))] // not c.nodes: restarts write it
				in := kvInput{key: keys[rng.IntN(len(keys))], put: rng.IntN(2) == 0}
				if in.put {
					in.value = fmt.Sprintf(`"c%d-%d"`, cl, i)
				}
				call := time.Since(start).Nanoseconds()
				out, keep := c.linOp(client, via, in)
				ret := time.Since(start).Nanoseconds()
				if !keep {
					time.Sleep(20 * time.Millisecond)
					continue
				}
				if out.unknown {
					ret = math.MaxInt64 // it may take effect at any later time
				}
				mu.Lock()
				ops = append(ops, porcupine.Operation{ClientId: cl, Input: in, Call: call, Output: out, Return: ret})
				mu.Unlock()
			}
		})
	}

	// Faults, round after round until the duration is spent.
	for round := 0; time.Since(start) < duration; round++ {
		time.Sleep(time.Second)
		leader := c.leader(testLease + 15*time.Second)
		if err := c.nodes[leader].cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		<-c.nodes[leader].done
		rest := c.except(leader)
		next := c.leader(testLease+15*time.Second, rest...)
		paused := rest[0]
		if paused == next {
			paused = rest[1]
		}
		c.start(leader) // back as a follower while another is paused
		if err := c.nodes[paused].cmd.Process.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Second)
		if err := c.nodes[paused].cmd.Process.Signal(syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		t.Logf("round %d: killed leader %s, %s took over, paused %s for 2s", round, leader, next, paused)
	}
	time.Sleep(time.Second)
	close(stop)
	wg.Wait()

	var puts, gets, unknown int
	for _, op := range ops {
		if op.Input.(kvInput).put {
			puts++
			if op.Output.(kvOutput).unknown {
				unknown++
			}
		} else {
			gets++
		}
	}
	res, info := porcupine.CheckOperationsVerbose(registerModel, ops, time.Minute)
	t.Logf("history: %d puts (%d with unknown outcome), %d strong gets over %s: %s", puts, unknown, gets, time.Since(start).Round(time.Second), res)
	if gets < 20 || puts-unknown < 20 {
		t.Fatalf("too few completed operations to mean anything: %d gets, %d puts", gets, puts-unknown)
	}
	if res != porcupine.Ok {
		path := filepath.Join(t.TempDir(), "history.html")
		if err := porcupine.VisualizePath(registerModel, info, path); err == nil {
			t.Logf("visualization: %s", path)
		}
		for _, op := range ops {
			t.Logf("client %d [%d, %d] %s", op.ClientId, op.Call, op.Return, registerModel.DescribeOperation(op.Input, op.Output))
		}
		t.Fatalf("history is not linearizable (%s)", res)
	}
}

// linOp performs one operation. keep is false for operations that
// certainly had no effect (a refused write, a failed read): they are left
// out of the history.
func (c *cluster) linOp(client *http.Client, via string, in kvInput) (out kvOutput, keep bool) {
	method, body := http.MethodGet, io.Reader(nil)
	if in.put {
		method, body = http.MethodPut, strings.NewReader(in.value)
	}
	req, err := http.NewRequest(method, "http://"+c.addr(via)+"/v1/kv/"+in.key, body)
	if err != nil {
		return out, false
	}
	resp, err := client.Do(req)
	if err != nil {
		// The node may have applied or forwarded the write before it died.
		return kvOutput{unknown: true}, in.put
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	switch {
	case in.put && resp.StatusCode/100 == 2:
		return kvOutput{}, true
	case in.put && resp.StatusCode >= 500 && resp.StatusCode != http.StatusServiceUnavailable:
		// 502/504 outcome_unknown (and, to be safe, any other 5xx but 503).
		return kvOutput{unknown: true}, true
	case in.put:
		// 503 (and 4xx) promise nothing was applied.
		return out, false
	case resp.StatusCode == http.StatusOK:
		return kvOutput{value: string(b)}, true
	case resp.StatusCode == http.StatusNotFound:
		return kvOutput{}, true
	}
	return out, false
}
