package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// storeBinary builds the real store command once per test run, with the
// race detector.
var storeBinary = sync.OnceValues(func() (string, error) { return buildStore("-race") })

// storeBinaryNoRace is the store built as it ships, for measurements the
// race detector would distort (its shadow memory is a multiple of the heap).
var storeBinaryNoRace = sync.OnceValues(func() (string, error) { return buildStore() })

func buildStore(flags ...string) (string, error) {
	dir, err := os.MkdirTemp("", "store-bin-")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "store")
	out, err := exec.Command("go", append(append([]string{"build"}, flags...), "-o", bin, ".")...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go build: %v\n%s", err, out)
	}
	return bin, nil
}

// storeOptions are how a test runs the binary: which build (default
// storeBinary) and extra environment variables (KEY=value).
type storeOptions struct {
	binary func() (string, error)
	env    []string
}

// proc is one running store process.
type proc struct {
	cmd  *exec.Cmd
	addr string // host:port it serves on
	logs *strings.Builder
	mu   *sync.Mutex
	// done is closed when the process has exited; waitErr is then set.
	done    chan struct{}
	waitErr error
}

// startStore runs the binary with args plus --listen 127.0.0.1:0 and waits
// for its "serving" log line, which carries the bound address.
func startStore(t *testing.T, args ...string) *proc {
	t.Helper()
	return startStoreWith(t, storeOptions{}, args...)
}

// startStoreWith is startStore with a chosen build and environment.
func startStoreWith(t *testing.T, o storeOptions, args ...string) *proc {
	t.Helper()
	if o.binary == nil {
		o.binary = storeBinary
	}
	bin, err := o.binary()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, append([]string{"--listen", "127.0.0.1:0", "--log-format", "json"}, args...)...)
	if len(o.env) > 0 {
		cmd.Env = append(os.Environ(), o.env...)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, logs: &strings.Builder{}, mu: &sync.Mutex{}, done: make(chan struct{})}
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			line := sc.Text()
			p.mu.Lock()
			p.logs.WriteString(line + "\n")
			p.mu.Unlock()
			var rec struct{ Msg, Addr string }
			if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "serving" {
				addr <- rec.Addr
			}
		}
	}()
	go func() { p.waitErr = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("store logs:\n%s", p.Logs())
		}
	})
	select {
	case p.addr = <-addr:
	case <-p.done:
		t.Fatalf("store exited before serving: %v\n%s", p.waitErr, p.Logs())
	case <-time.After(60 * time.Second):
		t.Fatalf("store did not start serving in 60s\n%s", p.Logs())
	}
	return p
}

func (p *proc) Logs() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logs.String()
}

func (p *proc) url(path string) string { return "http://" + p.addr + path }

func put(client *http.Client, url, body string) (int, error) {
	req, err := http.NewRequest(http.MethodPut, url, strings.NewReader(body))
	if err != nil {
		return 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}

// TestStore_SIGKILLMidLoad_KeepsEveryAcknowledgedWrite writes from several
// clients, kills the process with SIGKILL while writes are in flight, restarts
// it on the same data directory and reads every acknowledged write back.
func TestStore_SIGKILLMidLoad_KeepsEveryAcknowledgedWrite(t *testing.T) {
	dataDir := t.TempDir()
	p := startStore(t, "--data-dir", dataDir)

	const writers = 8
	var (
		acked     [writers][]int // per writer, the indexes acknowledged (in order)
		ackedN    atomic.Int64
		wg        sync.WaitGroup
		stopWrite = make(chan struct{})
	)
	client := &http.Client{Timeout: 10 * time.Second}
	for w := range writers {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stopWrite:
					return
				default:
				}
				body := fmt.Sprintf(`{"writer":%d,"i":%d}`, w, i)
				// Each write goes to a new key and to the writer's counter key.
				code, err := put(client, p.url(fmt.Sprintf("/v1/kv/w%d/%06d", w, i)), body)
				if err != nil {
					return // the process died: outcome unknown, not acknowledged
				}
				if code/100 != 2 {
					t.Errorf("PUT: status %d", code)
					return
				}
				code, err = put(client, p.url(fmt.Sprintf("/v1/kv/counter/%d", w)), fmt.Sprint(i))
				if err != nil {
					return
				}
				if code/100 != 2 {
					t.Errorf("PUT counter: status %d", code)
					return
				}
				acked[w] = append(acked[w], i)
				ackedN.Add(1)
			}
		})
	}
	// Kill once a good amount of load has been acknowledged.
	deadline := time.Now().Add(2 * time.Minute)
	for ackedN.Load() < 400 {
		if time.Now().After(deadline) {
			t.Fatalf("only %d writes acknowledged in 2 minutes", ackedN.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-p.done
	close(stopWrite)
	wg.Wait()

	p2 := startStore(t, "--data-dir", dataDir)
	get := func(path string) (int, string) {
		resp, err := client.Get(p2.url(path))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	total := 0
	for w := range writers {
		for _, i := range acked[w] {
			code, body := get(fmt.Sprintf("/v1/kv/w%d/%06d", w, i))
			if want := fmt.Sprintf(`{"writer":%d,"i":%d}`, w, i); code != 200 || body != want {
				t.Fatalf("acknowledged write w%d/%06d lost: %d %s", w, i, code, body)
			}
			total++
		}
		if n := len(acked[w]); n > 0 {
			// The counter holds the last acknowledged value or the one after
			// it (written but not acknowledged before the kill).
			_, body := get(fmt.Sprintf("/v1/kv/counter/%d", w))
			last := acked[w][n-1]
			if body != fmt.Sprint(last) && body != fmt.Sprint(last+1) {
				t.Fatalf("counter/%d = %s, last acknowledged %d", w, body, last)
			}
		}
	}
	t.Logf("all %d acknowledged writes survived SIGKILL", total)
}

// SIGTERM ends the process cleanly (exit 0, the shutdown log line). Draining
// of requests in flight at SIGTERM is covered by the cluster SIGTERM test,
// whose steady writer is mid-request when the signal arrives.
func TestStore_SIGTERM_ShutsDownCleanly(t *testing.T) {
	p := startStore(t, "--data-dir", t.TempDir())
	if code, err := put(http.DefaultClient, p.url("/v1/kv/k"), `1`); err != nil || code != 201 {
		t.Fatalf("PUT: %d %v", code, err)
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.done:
		if p.waitErr != nil {
			t.Fatalf("exit after SIGTERM: %v\n%s", p.waitErr, p.Logs())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("store did not exit within 30s of SIGTERM")
	}
	if logs := p.Logs(); !strings.Contains(logs, "shut down cleanly") {
		t.Fatalf("no clean-shutdown log line:\n%s", logs)
	}
}

func TestStore_FirstLogLineSaysSingleNode(t *testing.T) {
	p := startStore(t, "--data-dir", t.TempDir())
	first, _, _ := strings.Cut(p.Logs(), "\n")
	var rec struct{ Msg, Mode string }
	if err := json.Unmarshal([]byte(first), &rec); err != nil || rec.Mode != "single-node" {
		t.Fatalf("first log line %q does not say single-node", first)
	}
}

func TestStore_StartupErrors(t *testing.T) {
	bin, err := storeBinary()
	if err != nil {
		t.Fatal(err)
	}
	t.Run("version", func(t *testing.T) {
		out, err := exec.Command(bin, "--version").Output()
		if err != nil || !strings.HasPrefix(string(out), "store ") {
			t.Fatalf("--version = %q, %v", out, err)
		}
	})
	t.Run("bad flag is one JSON line naming it, exit 2", func(t *testing.T) {
		cmd := exec.Command(bin, "--max-value-bytes=lots")
		out, _ := cmd.CombinedOutput()
		var rec struct{ Level, Err string }
		if err := json.Unmarshal(out, &rec); err != nil || rec.Level != "ERROR" || !strings.Contains(rec.Err, "--max-value-bytes") {
			t.Fatalf("output %q is not a JSON error naming the flag", out)
		}
		if cmd.ProcessState.ExitCode() != 2 {
			t.Fatalf("exit code %d, want 2", cmd.ProcessState.ExitCode())
		}
	})
	t.Run("cluster mode without members or a peer token", func(t *testing.T) {
		kc := filepath.Join(t.TempDir(), "kubeconfig")
		if err := os.WriteFile(kc, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`), 0o600); err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct{ env, want string }{
			{"STORE_PEER_TOKEN=", "needs its member set: --statefulset (env STORE_STATEFULSET"},
			{"STORE_MEMBERS=vm,b", "STORE_PEER_TOKEN"},
		} {
			cmd := exec.Command(bin, "--node-id", "vm", "--listen", "127.0.0.1:0", "--data-dir", t.TempDir(), "--kubeconfig", kc, "--namespace", "ns")
			cmd.Env = append(os.Environ(), "STORE_PEER_TOKEN=", tc.env)
			out, _ := cmd.CombinedOutput()
			if cmd.ProcessState.ExitCode() != 2 || !strings.Contains(string(out), tc.want) {
				t.Fatalf("%s: exit %d, want 2 and a message naming %q:\n%s", tc.env, cmd.ProcessState.ExitCode(), tc.want, out)
			}
		}
	})
	t.Run("data dir locked by a running store", func(t *testing.T) {
		dir := t.TempDir()
		startStore(t, "--data-dir", dir)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, "--listen", "127.0.0.1:0", "--data-dir", dir)
		out, _ := cmd.CombinedOutput()
		if cmd.ProcessState.ExitCode() != 1 || !strings.Contains(string(out), "locked by another process") {
			t.Fatalf("second store on the same dir: exit %d\n%s", cmd.ProcessState.ExitCode(), out)
		}
	})
}
