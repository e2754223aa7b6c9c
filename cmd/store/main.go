// Command store runs one node of the replicated JSON key-value store.
//
// A request's path: main builds storage.DB (the bbolt file), node.Node
// (internal/node: where each request is served) and api.Server (the HTTP
// routes) and serves it. A PUT goes api.Server.put (parse and validate) →
// node.Node.Write → storage.DB.Apply, which group-commits and fsyncs before
// the response is sent.
//
// Without Kubernetes configuration the store runs as a single node on a
// local bbolt file. With it, main adds election.Elector (the Lease) and
// replication.Cluster: node.Node.Write applies a write on the leader
// (node/write.go: applyLeader, which commits it and replicates it to the
// key's owners through replication.Cluster.Write) and forwards it there
// from any other node over the typed peer calls of internal/transport; a
// read goes to an owner (node/read.go), which confirms it with the leader
// for consistency=strong (replication.Cluster.ReadStrong).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"runtime/debug"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"github.com/statefulkv/store/internal/api"
	"github.com/statefulkv/store/internal/election"
	"github.com/statefulkv/store/internal/membership"
	"github.com/statefulkv/store/internal/node"
	"github.com/statefulkv/store/internal/peerhttp"
	"github.com/statefulkv/store/internal/replication"
	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// version is stamped at build time (-ldflags "-X main.version=v1.2.3");
// buildVersion falls back to the module and VCS data Go records.
var version string

func main() {
	os.Exit(run(os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

func run(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	// The one subcommand works on a stopped store's files; everything
	// else runs the store.
	if len(args) > 0 && args[0] == "compact" {
		return runCompact(args[1:], getenv, stdout, stderr)
	}
	host, _ := os.Hostname()
	cfg, err := parseConfig(args, getenv, host, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		// Startup errors are one JSON line naming the flag, like every log.
		slog.New(slog.NewJSONHandler(stderr, nil)).Error("startup failed", "err", err.Error())
		return 2
	}
	if cfg.showVersion {
		fmt.Fprintln(stdout, "store", buildVersion())
		return 0
	}
	log := newLogger(cfg, stderr)
	tuneGC(log, getenv, "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := serve(ctx, cfg, getenv, log); err != nil {
		log.Error("store stopped with an error", "err", err.Error())
		if errors.Is(err, errUsage) || errors.Is(err, election.ErrInvalidConfig) {
			return 2
		}
		return 1
	}
	return 0
}

// kubeConfig finds Kubernetes: --kubeconfig, else the in-cluster config when
// running in a pod, else nil (single-node mode).
func kubeConfig(cfg config, getenv func(string) string) (*rest.Config, string, error) {
	switch {
	case cfg.kubeconfig != "":
		rc, err := clientcmd.BuildConfigFromFlags("", cfg.kubeconfig)
		if err != nil {
			return nil, "", fmt.Errorf("%w: --kubeconfig (env KUBECONFIG) %s: %w", errUsage, cfg.kubeconfig, err)
		}
		return rc, "kubeconfig " + cfg.kubeconfig, nil
	case getenv("KUBERNETES_SERVICE_HOST") != "":
		rc, err := rest.InClusterConfig()
		if err != nil {
			return nil, "", fmt.Errorf("in-cluster Kubernetes config: %w", err)
		}
		return rc, "in-cluster config", nil
	}
	return nil, "", nil
}

func newLogger(cfg config, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.logLevel}
	if cfg.logFormat == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// serve runs the node until ctx is cancelled, then shuts down in the one
// order that loses nothing (the list of steps at its end): readiness off →
// HTTP and peer calls drain (every in-flight write finishes its fsync) →
// a leader hands its data to the members → the write gate closes for good
// and the Lease is released → replication, peer connections and storage
// close.
func serve(ctx context.Context, cfg config, getenv func(string) string, log *slog.Logger) error {
	restCfg, source, err := kubeConfig(cfg, getenv)
	if err != nil {
		return err
	}
	if restCfg == nil {
		log.Info("starting single-node store: no Kubernetes configuration, so no election or replication",
			"mode", "single-node", "node", cfg.nodeID, "version", buildVersion(),
			"listen", cfg.listen, "data_dir", cfg.dataDir)
	} else {
		log.Info("starting cluster node: electing a leader over a Kubernetes Lease",
			"mode", "cluster", "kubernetes", source, "node", cfg.nodeID, "namespace", cfg.namespace,
			"lease", cfg.leaseName, "version", buildVersion(), "listen", cfg.listen, "data_dir", cfg.dataDir)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	// In cluster mode the store keeps one digest per ring partition, which
	// replicas compare to find what differs.
	storeOpts := storage.Options{Registerer: reg, MaxRequestBytes: cfg.requestIDBytes}
	var (
		ring   *replication.Ring
		client kubernetes.Interface
	)
	if restCfg != nil {
		if cfg.namespace == "" {
			// In a pod the service account token's folder names the namespace.
			if b, err := os.ReadFile("/var/run/secrets/kubernetes.io/serviceaccount/namespace"); err == nil {
				cfg.namespace = strings.TrimSpace(string(b))
			}
		}
		klog.SetSlogLogger(log.With("component", "client-go"))
		if client, err = election.NewClient(restCfg, cfg.renewDeadline); err != nil {
			return fmt.Errorf("kubernetes client: %w", err)
		}
		if cfg.members, err = clusterMembers(ctx, cfg, client); err != nil {
			return err
		}
		if !slices.Contains(cfg.members, cfg.nodeID) {
			log.Warn("this node is not in the member set: it owns no keys (a pod being scaled away, or --node-id does not match the member names)",
				"node", cfg.nodeID, "members", cfg.members)
		}
		if ring, err = replication.NewRing(replication.RingConfig{}); err != nil {
			return err
		}
		if err := ring.Set(cfg.members); err != nil {
			return fmt.Errorf("%w: member set %v: %w", errUsage, cfg.members, err)
		}
		storeOpts.Partitions, storeOpts.PartitionOf = ring.PartitionCount(), ring.Partition
	}
	if err := compactAtStart(ctx, cfg, log); err != nil {
		return err
	}
	db, err := storage.Open(cfg.dataDir, storeOpts)
	if err != nil {
		return fmt.Errorf("open storage (--data-dir %s): %w", cfg.dataDir, err)
	}
	// undo releases what was built, in reverse, if the node fails to
	// start; once it serves, the shutdown list at the end of serve takes
	// over.
	var undo []func() error
	// stopFollowing ends the StatefulSet watch, if any, and waits for it.
	stopFollowing := func() {}
	serving := false
	defer func() {
		for i := len(undo) - 1; i >= 0 && !serving; i-- {
			_ = undo[i]()
		}
	}()
	undo = append(undo, db.Close)

	var (
		elector  *election.Elector
		cluster  *replication.Cluster
		peerAddr func(string) (string, error)
		peers    *transport.HTTP // forwarded calls and notices
		// replPeers carries replication's calls: batches and the read index
		// are one request at a time per follower, latency-bound, and a
		// plain keep-alive connection answers them sooner than the
		// multiplexed stream, whose writer waits a moment to gather frames
		// (measured: make bench-ab).
		replPeers *transport.HTTP
		nd        *node.Node
		nodeCfg   = node.Config{Self: cfg.nodeID, Store: db, Logger: log}
		apiCfg    = api.Config{
			NodeID:           cfg.nodeID,
			BuildVersion:     buildVersion(),
			Stats:            db,
			MaxValueBytes:    cfg.maxValueBytes,
			MaxInflightBytes: cfg.maxInflightBytes,
			Logger:           log,
			Registerer:       reg,
			Gatherer:         reg,
		}
	)
	if restCfg != nil {
		if len(cfg.peerToken) < 16 {
			return fmt.Errorf("%w: cluster mode needs the peer token, at least 16 bytes: set STORE_PEER_TOKEN (deploy/ fills it from the Secret store-peer-token) or --peer-token-file", errUsage)
		}
		peerAddr, err = api.PeerAddrFromTemplate(cfg.peerTemplate, cfg.namespace)
		if err != nil {
			return fmt.Errorf("%w: --peer-address-template (env STORE_PEER_ADDRESS_TEMPLATE): %w", errUsage, err)
		}
		// Calls to the other nodes (forwarded writes, reads handed to an
		// owner, replication, notices) share one connection per peer: a
		// multiplexed peer stream by default, or unencrypted HTTP/2.
		carrier, replCarrier := peerCarriers(cfg)
		undo = append(undo, closeCarrier(carrier), closeCarrier(replCarrier))
		if peers, err = transport.NewHTTP(transport.HTTPConfig{Addr: peerAddr, Token: cfg.peerToken, RoundTripper: carrier, MaxReplyBytes: transport.MaxMessageBytes(cfg.maxValueBytes)}); err != nil {
			return err
		}
		if replPeers, err = transport.NewHTTP(transport.HTTPConfig{Addr: peerAddr, Token: cfg.peerToken, RoundTripper: replCarrier, MaxReplyBytes: transport.MaxMessageBytes(cfg.maxValueBytes)}); err != nil {
			return err
		}
		elector, err = election.New(election.Config{
			Client:        client,
			Namespace:     cfg.namespace,
			LeaseName:     cfg.leaseName,
			Identity:      cfg.nodeID,
			LeaseDuration: cfg.leaseDuration,
			RenewDeadline: cfg.renewDeadline,
			RetryPeriod:   cfg.retryPeriod,
			Logger:        log,
			Registerer:    reg,
			EpochFloor:    db.FenceEpoch,
			// Tell the other members at once, so they forward to this node
			// now rather than after their next poll of the Lease.
			OnElected: func(epoch uint64) { nd.NotifyLeader(context.Background(), epoch) },
		})
		if err != nil {
			return err
		}
		cluster, err = replication.NewCluster(replication.ClusterConfig{
			Self:              cfg.nodeID,
			Members:           cfg.members,
			ReplicationFactor: cfg.replicationFactor,
			Ring:              ring,
			Local:             db,
			Leadership:        elector,
			Peers:             replPeers,
			QueueBytes:        cfg.replicationQueueBytes,
			TombstoneTTL:      cfg.tombstoneTTL,
			Logger:            log,
			Registerer:        reg,
		})
		if err != nil {
			return fmt.Errorf("%w: %w", errUsage, err)
		}
		if len(cfg.members) < cfg.replicationFactor {
			log.Warn("fewer members than the replication factor; every member owns every key and status reports the factor as not met",
				"members", len(cfg.members), "replication_factor", cfg.replicationFactor)
		}
		undo = append(undo, cluster.Close)
		if cfg.statefulSet != "" {
			followCtx, stopFollow := context.WithCancel(context.Background())
			followed := make(chan struct{})
			go func() {
				defer close(followed)
				membership.Follow(followCtx, client, cfg.namespace, cfg.statefulSet, 2*time.Second, cfg.members, func(m []string) {
					if err := cluster.SetMembers(m); err != nil {
						log.Error("member set refused; keeping the old one", "members", m, "err", err)
					}
				}, log)
			}()
			// Stopped, and waited for, before replication closes: a
			// member change must not reach a closed cluster.
			stopFollowing = func() { stopFollow(); <-followed }
			undo = append(undo, func() error { stopFollowing(); return nil })
		}
	}

	if elector != nil {
		// Writes wait for the new leader's catch-up, not just the Lease.
		nodeCfg.Leadership = caughtUpLeadership{elector, cluster}
		nodeCfg.Replication = cluster
		nodeCfg.Peers = peers
		nodeCfg.ReplicationTimeout = cfg.replicationTimeout
		nodeCfg.ForwardTimeout = forwardTimeout(cfg.leaseDuration, cfg.retryPeriod)
		apiCfg.PeerToken = cfg.peerToken
		apiCfg.PeerAddr = peerAddr
		apiCfg.Replication = cluster
	}
	if nd, err = node.New(nodeCfg); err != nil {
		return err
	}
	apiCfg.Node = nd
	if elector != nil {
		apiCfg.Peers = nd.Service()
	}
	srv, err := api.New(apiCfg)
	if err != nil {
		return err
	}
	// A single node's tombstones guard no replica: past the TTL they only
	// take space (a cluster's leader collects its own, see replication).
	stopCollecting := func() {}
	if restCfg == nil && cfg.tombstoneTTL > 0 {
		_, _, epoch := nd.Role()
		stopCollecting = collectLocally(db, epoch, cfg.tombstoneTTL, log)
		undo = append(undo, func() error { stopCollecting(); return nil })
	}

	// The election runs on its own context, cancelled only after HTTP has
	// drained: releasing the Lease while writes are still in flight would
	// let a successor start before this leader stopped.
	electionCtx, cancelElection := context.WithCancel(context.Background())
	electionDone := make(chan struct{})
	leaveElection := func() error {
		if elector != nil {
			elector.Stop()
		}
		cancelElection()
		<-electionDone
		return nil
	}
	undo = append(undo, leaveElection)
	if elector != nil {
		cluster.Start()
		go func() {
			defer close(electionDone)
			if err := elector.Run(electionCtx); err != nil {
				log.Error("election stopped", "err", err)
			}
		}()
	} else {
		close(electionDone)
	}

	ln, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		return fmt.Errorf("listen (--listen %s): %w", cfg.listen, err)
	}
	// Every node accepts HTTP/1.1 (clients, peer-stream upgrades) and
	// unencrypted HTTP/2 with prior knowledge (peers with
	// --peer-carrier=h2c).
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	httpSrv := &http.Server{
		Protocols:         protocols,
		Handler:           srv,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       60 * time.Second,
		IdleTimeout:       120 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- httpSrv.Serve(ln) }()
	if cfg.debugListen != "" {
		stopDebug, err := serveDebug(cfg.debugListen, log)
		if err != nil {
			return err
		}
		defer stopDebug()
	}
	srv.SetReady(true)
	log.Info("serving", "addr", ln.Addr().String())

	serving = true
	var serveFailed error
	select {
	case err := <-serveErr:
		serveFailed = fmt.Errorf("http server: %w", err)
	case <-ctx.Done():
	}

	// The shutdown order, the one that loses nothing: each step runs after
	// the one before it has finished (or used up its budget).
	steps := []step{
		{"not ready; still serving while endpoints update", cfg.shutdownDelay, func(ctx context.Context) error {
			// Endpoints learn of the failing readiness probe only at its
			// next period; until then new clients still arrive and are
			// served.
			srv.SetReady(false)
			if cfg.shutdownDelay > 0 {
				<-ctx.Done()
			}
			return nil
		}},
		{"drain HTTP", cfg.shutdownTimeout, func(ctx context.Context) error {
			if err := httpSrv.Shutdown(ctx); err != nil {
				_ = httpSrv.Close()
				return fmt.Errorf("closed the connections still open: %w", err)
			}
			return nil
		}},
		// Calls peers sent over their multiplexed connections are not
		// HTTP connections the server tracks; they drain here, with their
		// own budget (a slow HTTP drain must not leave them none: closing
		// them early turns every forwarded write in flight into
		// outcome_unknown).
		{"drain peer streams", cfg.shutdownTimeout, srv.Shutdown},
	}
	if elector != nil {
		steps = append(steps,
			// No write is in flight any more. A leader first brings the
			// other members level with its data, so its successor finds
			// every write it accepted (even if this pod is being scaled
			// away; the successor's catch-up covers acknowledged writes if
			// this is incomplete) ...
			step{"hand off to the members", handOffTimeout, cluster.HandOff},
			// ... then closes the gate for good and releases the Lease ...
			step{"leave the election (release the Lease if held)", 0, func(context.Context) error { return leaveElection() }},
			// ... and tells the members, so one takes over at once
			// instead of at its next retry period.
			step{"tell the members the Lease is free", 0, func(ctx context.Context) error { nd.NotifyLeaseReleased(ctx); return nil }},
			step{"stop following the StatefulSet", 0, func(context.Context) error { stopFollowing(); return nil }},
			step{"stop replication", 0, func(context.Context) error { return cluster.Close() }},
			step{"close peer connections", 0, func(context.Context) error {
				return errors.Join(closeCarrier(peers.RoundTripper())(), closeCarrier(replPeers.RoundTripper())())
			}},
		)
	}
	steps = append(steps,
		step{"stop collecting tombstones", 0, func(context.Context) error { stopCollecting(); return nil }},
		step{"close storage", 0, func(context.Context) error { return db.Close() }})
	shutdown(log, steps)
	if serveFailed != nil {
		return serveFailed
	}
	log.Info("shut down cleanly")
	return nil
}

// peerCarriers are the RoundTrippers calls to other nodes travel over:
// one for the node's forwarded calls (a multiplexed peer stream, which
// gathers the frames of many concurrent forwards into few system calls)
// and one for replication (plain keep-alive HTTP/1.1), or unencrypted
// HTTP/2 for both with --peer-carrier=h2c.
func peerCarriers(cfg config) (calls, replication http.RoundTripper) {
	dial := (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	if cfg.peerCarrier == "h2c" {
		p := new(http.Protocols)
		p.SetUnencryptedHTTP2(true)
		h2c := &http.Transport{
			Proxy:           nil, // peers are never reached through a proxy
			DialContext:     dial,
			Protocols:       p,
			IdleConnTimeout: 90 * time.Second,
		}
		return h2c, h2c
	}
	plain := func() *http.Transport {
		return &http.Transport{
			Proxy:               nil,
			DialContext:         dial,
			MaxIdleConns:        256,
			MaxIdleConnsPerHost: 256,
			IdleConnTimeout:     90 * time.Second,
		}
	}
	streams := &peerhttp.Transport{
		Path:        api.PeerStreamPath,
		Header:      http.Header{transport.TokenHeader: {cfg.peerToken}},
		Fallback:    plain(),
		DialTimeout: 2 * time.Second,
		// The same bound as api's peerhttp.Server: requests of up to
		// two messages ride the stream (bodies above half the bound go
		// through Fallback).
		MaxFrameBytes: int(4 * transport.MaxMessageBytes(cfg.maxValueBytes)),
	}
	return streams, plain()
}

// closeCarrier closes a carrier's connections.
func closeCarrier(rt http.RoundTripper) func() error {
	return func() error {
		switch t := rt.(type) {
		case *peerhttp.Transport:
			return t.Close()
		case *http.Transport:
			t.CloseIdleConnections()
		}
		return nil
	}
}

// handOffTimeout bounds a leaving leader's push to the other members.
const handOffTimeout = 5 * time.Second

// clusterMembers is the member set at start: --members, or the pods of
// --statefulset.
func clusterMembers(ctx context.Context, cfg config, client kubernetes.Interface) ([]string, error) {
	switch {
	case len(cfg.members) > 0:
		return cfg.members, nil
	case cfg.statefulSet != "":
		gctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		members, err := membership.Members(gctx, client, cfg.namespace, cfg.statefulSet)
		if err != nil {
			return nil, fmt.Errorf("--statefulset (env STORE_STATEFULSET) %s: %w", cfg.statefulSet, err)
		}
		return members, nil
	}
	return nil, fmt.Errorf("%w: cluster mode needs its member set: --statefulset (env STORE_STATEFULSET; deploy/ sets it) or --members (env STORE_MEMBERS), e.g. store-1,store-2,store-3", errUsage)
}

// caughtUpLeadership is the elector whose write gate also waits for
// replication's catch-up of the term (replication.Cluster.WriteGate).
type caughtUpLeadership struct {
	*election.Elector
	cluster *replication.Cluster
}

func (l caughtUpLeadership) WriteGate() (uint64, bool) { return l.cluster.WriteGate() }

// serveDebug serves net/http/pprof on its own listener, apart from the API.
func serveDebug(addr string, log *slog.Logger) (stop func(), err error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen (--debug-listen %s): %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	log.Info("serving profiles", "addr", ln.Addr().String())
	return func() { _ = srv.Close() }, nil
}

// forwardTimeout lets a request that needs the leader ride out one leader
// change: a full lease after a crash, a jittered retry period for the
// successor to notice, and slack for the apiserver round trips. Past it the
// client gets a 503 (nothing applied) or outcome_unknown.
func forwardTimeout(lease, retry time.Duration) time.Duration {
	return lease + 2*retry + 5*time.Second
}

func buildVersion() string {
	if version != "" {
		return version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := bi.Main.Version
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			v += "+" + s.Value[:12]
		}
	}
	return v
}

// collectLocally removes a single node's tombstones once they are ttl old,
// every tenth of ttl (at least a second), until the returned stop is called
// (which waits for a round under way).
func collectLocally(db *storage.DB, epoch uint64, ttl time.Duration, log *slog.Logger) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	horizon := storage.NewSeqHorizon(ttl)
	go func() {
		defer close(done)
		t := time.NewTicker(max(ttl/10, time.Second))
		defer t.Stop()
		for {
			horizon.Sample(db.LastSeq())
			if h := horizon.Seq(); h > 0 {
				n, err := db.CollectLocal(ctx, epoch, h)
				switch {
				case err != nil && ctx.Err() == nil:
					log.Warn("tombstone collection failed; retrying next round", "err", err)
				case n > 0:
					log.Info("collected tombstones", "tombstones", n, "horizon_seq", h)
				}
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return func() { cancel(); <-done }
}
