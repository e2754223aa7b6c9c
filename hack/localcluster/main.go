// Command localcluster runs a local store cluster for people: the real control
// plane (kube-apiserver + etcd from `make controlplane`) and three store nodes
// on 127.0.0.1-3, each acting as the store ServiceAccount with the Role from
// deploy/rbac.yaml, exactly as the cluster tests do.
//
// `make cluster` starts it in the background and waits for the leader;
// `make cluster-down` sends it SIGTERM, on which it stops the nodes
// (gracefully), then the control plane, and exits. Everything lives in the
// state folder (default .cluster/): logs/, data/, kubeconfigs, pid and
// ready files.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/statefulkv/store/internal/kubetest"
)

const namespace = "store"

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "localcluster:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		state = flag.String("state", ".cluster", "folder for logs, data, kubeconfigs and the pid/ready files")
		bin   = flag.String("store", "bin/store", "store binary to run")
		nodes = flag.Int("nodes", 3, "number of nodes (on 127.0.0.1..N)")
		port  = flag.Int("port", 18080, "HTTP port of every node")
		extra = flag.String("store-args", "", "more flags for every node, space-separated (e.g. --peer-carrier=h2c)")
	)
	flag.Parse()
	if *nodes < 1 || *nodes > 9 {
		return fmt.Errorf("--nodes %d: use 1 to 9", *nodes)
	}
	for _, d := range []string{"logs", "data"} {
		if err := os.MkdirAll(filepath.Join(*state, d), 0o750); err != nil {
			return err
		}
	}
	ready := filepath.Join(*state, "ready")
	_ = os.Remove(ready)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	cp, err := kubetest.StartControlPlane()
	if err != nil {
		return err
	}
	defer func() { _ = cp.Stop() }()
	if err := cp.ApplyRBAC(ctx, namespace); err != nil {
		return err
	}
	admin := filepath.Join(*state, "admin.kubeconfig")
	sa := filepath.Join(*state, "store.kubeconfig")
	if err := cp.WriteKubeconfig(admin, "local-admin", "system:masters"); err != nil {
		return err
	}
	if err := cp.WriteKubeconfig(sa, "system:serviceaccount:"+namespace+":store",
		"system:serviceaccounts", "system:serviceaccounts:"+namespace); err != nil {
		return err
	}

	token := filepath.Join(*state, "peer-token")
	if err := os.WriteFile(token, []byte(randomToken()+"\n"), 0o600); err != nil {
		return err
	}

	var members []string
	for i := 1; i <= *nodes; i++ {
		members = append(members, fmt.Sprintf("store-%d", i))
	}

	var procs []*exec.Cmd
	defer func() {
		// Graceful first: each node drains and releases the Lease.
		for _, p := range procs {
			_ = p.Process.Signal(syscall.SIGTERM)
		}
		for _, p := range procs {
			done := make(chan struct{})
			go func() { _ = p.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(30 * time.Second):
				_ = p.Process.Kill()
				<-done
			}
		}
	}()
	for i := 1; i <= *nodes; i++ {
		id := fmt.Sprintf("store-%d", i)
		logf, err := os.Create(filepath.Join(*state, "logs", id+".log"))
		if err != nil {
			return err
		}
		defer logf.Close()
		cmd := exec.Command(*bin,
			"--node-id", id,
			"--listen", fmt.Sprintf("127.0.0.%d:%d", i, *port),
			"--data-dir", filepath.Join(*state, "data", id),
			"--kubeconfig", sa,
			"--namespace", namespace,
			"--peer-address-template", fmt.Sprintf("127.0.0.{ordinal}:%d", *port),
			"--peer-token-file", token,
			"--members", strings.Join(members, ","),
			"--debug-listen", fmt.Sprintf("127.0.0.%d:%d", i, *port+1),
		)
		cmd.Args = append(cmd.Args, strings.Fields(*extra)...)
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("start %s: %w", id, err)
		}
		procs = append(procs, cmd)
	}

	leader, err := waitForLeader(ctx, *nodes, *port)
	if err != nil {
		return err
	}
	printUsage(*state, *nodes, *port, leader, cp.Config.Host)
	if err := os.WriteFile(ready, []byte(leader+"\n"), 0o640); err != nil {
		return err
	}
	<-ctx.Done()
	fmt.Println("localcluster: stopping nodes and the control plane")
	return nil
}

// waitForLeader polls /v1/status until every node names the same leader
// and that leader accepts writes (role "leader": it has caught up with the
// others' data). A cold start waits up to one lease duration (15s) plus a
// retry period, plus the catch-up.
func waitForLeader(ctx context.Context, nodes, port int) (string, error) {
	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		leader, agreed, writable := "", true, false
		for i := 1; i <= nodes; i++ {
			var st struct{ Node, Leader, Role string }
			resp, err := client.Get(fmt.Sprintf("http://127.0.0.%d:%d/v1/status", i, port))
			if err == nil {
				err = json.NewDecoder(resp.Body).Decode(&st)
				resp.Body.Close()
			}
			if err != nil || st.Leader == "" || (leader != "" && st.Leader != leader) {
				agreed = false
				break
			}
			leader = st.Leader
			writable = writable || (st.Node == st.Leader && st.Role == "leader")
		}
		if agreed && writable {
			return leader, nil
		}
		select {
		case <-ctx.Done():
			return "", errors.New("interrupted while waiting for a leader")
		case <-time.After(200 * time.Millisecond):
		}
	}
	return "", errors.New("no leader after 60s; see the node logs")
}

func printUsage(state string, nodes, port int, leader, apiserver string) {
	var b strings.Builder
	fmt.Fprintf(&b, "\nlocal store cluster is up: %d nodes, leader %s\n", nodes, leader)
	for i := 1; i <= nodes; i++ {
		fmt.Fprintf(&b, "  store-%d  http://127.0.0.%d:%d   log %s\n", i, i, port, filepath.Join(state, "logs", fmt.Sprintf("store-%d.log", i)))
	}
	fmt.Fprintf(&b, "  kube-apiserver %s   kubectl --kubeconfig %s -n %s get lease store-leader -o yaml\n\n", apiserver, filepath.Join(state, "admin.kubeconfig"), namespace)
	fmt.Fprintf(&b, "try (any node takes any request):\n")
	fmt.Fprintf(&b, "  curl -X PUT http://127.0.0.1:%d/v1/kv/hello -d '{\"from\":\"curl\"}'\n", port)
	fmt.Fprintf(&b, "  curl http://127.0.0.2:%d/v1/kv/hello\n", port)
	fmt.Fprintf(&b, "  curl http://127.0.0.3:%d/v1/status\n", port)
	fmt.Fprintf(&b, "profiles: go tool pprof http://127.0.0.1:%d/debug/pprof/profile?seconds=10\n", port+1)
	fmt.Fprintf(&b, "stop it with: make cluster-down\n")
	fmt.Print(b.String())
}

func randomToken() string {
	var b [24]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
