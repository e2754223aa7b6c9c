package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// config is everything the store reads at startup. Every field has a flag
// and an environment variable; the flag wins when both are set.
type config struct {
	// listen is the HTTP address, host:port.
	listen string
	// dataDir holds the bbolt file.
	dataDir string
	// maxValueBytes bounds one JSON value.
	maxValueBytes int64
	// maxInflightBytes bounds the request bodies held at once
	// (api.Config.MaxInflightBytes).
	maxInflightBytes int64
	// nodeID names this node (the pod name in Kubernetes).
	nodeID string
	// logLevel and logFormat shape the slog output.
	logLevel  slog.Level
	logFormat string
	// shutdownDelay keeps serving after readiness turns off on SIGTERM, so
	// endpoints stop sending new clients before the listener closes.
	shutdownDelay time.Duration
	// shutdownTimeout bounds the HTTP drain on SIGTERM.
	shutdownTimeout time.Duration
	// showVersion prints the version and exits.
	showVersion bool

	// Cluster mode. kubeconfig (or in-cluster config) switches it on.
	kubeconfig    string
	namespace     string
	leaseName     string
	leaseDuration time.Duration
	renewDeadline time.Duration
	retryPeriod   time.Duration
	peerTemplate  string
	// debugListen serves net/http/pprof when set (off by default: it is
	// an operator's tool, never on the client port).
	debugListen string
	// replicationQueueBytes caps what waits in memory for one follower.
	replicationQueueBytes int64
	// tombstoneTTL is how old a tombstone (or a copy a member no longer
	// owns) must be before the leader collects it.
	tombstoneTTL time.Duration
	// peerCarrier is how calls to other nodes travel: "stream" (one
	// multiplexed connection per peer, internal/peerhttp) or "h2c"
	// (unencrypted HTTP/2 from net/http), kept to measure one against the
	// other.
	peerCarrier string
	// members are the identities of every node of the cluster: the ring
	// places keys on them, a new leader catches up from them, and they are
	// told when the leader changes. In cluster mode they come from here
	// (fixed) or from statefulSet (followed as it scales).
	members []string
	// statefulSet names the StatefulSet whose pods are the members.
	statefulSet string
	// peerToken is the cluster secret: from --peer-token-file, else the
	// STORE_PEER_TOKEN variable (never a flag value, which ps would show).
	peerToken string
	// replicationFactor is R, the owners of each key.
	replicationFactor int
	// replicationTimeout bounds a write's wait for its ack level.
	replicationTimeout time.Duration

	// requestIDBytes bounds the request-id records kept for recognising
	// retried writes (storage.Options.MaxRequestBytes).
	requestIDBytes int64
	// compactFreeRatio, when above 0, compacts the data file before it is
	// opened if at least this fraction of it is free (and at least
	// compactMinFreeBytes), as `store compact` does offline.
	compactFreeRatio    float64
	compactMinFreeBytes int64
}

// errUsage marks errors that are the operator's to fix (bad flag or env);
// main exits 2 on them, as flag.ExitOnError would.
var errUsage = errors.New("invalid configuration")

// defaultMaxInflightBytes is --max-inflight-bytes when it is 0 and
// --max-value-bytes is smaller.
const defaultMaxInflightBytes = 16 << 20

// envFor maps each flag to its environment fallback.
var envFor = map[string]string{
	"listen":                  "STORE_LISTEN",
	"data-dir":                "STORE_DATA_DIR",
	"max-value-bytes":         "STORE_MAX_VALUE_BYTES",
	"max-inflight-bytes":      "STORE_MAX_INFLIGHT_BYTES",
	"node-id":                 "POD_NAME",
	"log-level":               "STORE_LOG_LEVEL",
	"log-format":              "STORE_LOG_FORMAT",
	"shutdown-timeout":        "STORE_SHUTDOWN_TIMEOUT",
	"kubeconfig":              "KUBECONFIG",
	"namespace":               "POD_NAMESPACE",
	"lease-name":              "STORE_LEASE_NAME",
	"lease-duration":          "STORE_LEASE_DURATION",
	"renew-deadline":          "STORE_RENEW_DEADLINE",
	"retry-period":            "STORE_RETRY_PERIOD",
	"peer-address-template":   "STORE_PEER_ADDRESS_TEMPLATE",
	"peer-token-file":         "STORE_PEER_TOKEN_FILE",
	"members":                 "STORE_MEMBERS",
	"statefulset":             "STORE_STATEFULSET",
	"debug-listen":            "STORE_DEBUG_LISTEN",
	"peer-carrier":            "STORE_PEER_CARRIER",
	"replication-queue-bytes": "STORE_REPLICATION_QUEUE_BYTES",
	"tombstone-ttl":           "STORE_TOMBSTONE_TTL",
	"shutdown-delay":          "STORE_SHUTDOWN_DELAY",
	"replication-factor":      "STORE_REPLICATION_FACTOR",
	"replication-timeout":     "STORE_REPLICATION_TIMEOUT",
	"request-id-bytes":        "STORE_REQUEST_ID_BYTES",

	"compact-at-start-free-ratio":     "STORE_COMPACT_AT_START_FREE_RATIO",
	"compact-at-start-min-free-bytes": "STORE_COMPACT_AT_START_MIN_FREE_BYTES",
}

// parseConfig reads flags from args and fallbacks from getenv, applies
// defaults and validates. Errors name the flag (and its variable).
func parseConfig(args []string, getenv func(string) string, hostname string, stderr io.Writer) (config, error) {
	fs := flag.NewFlagSet("store", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		c               config
		maxValue        string
		level, shutdown string
	)
	fs.StringVar(&c.listen, "listen", ":8080", "HTTP listen address `host:port` (env STORE_LISTEN)")
	fs.StringVar(&c.dataDir, "data-dir", "data", "`directory` for the bbolt file (env STORE_DATA_DIR)")
	fs.StringVar(&maxValue, "max-value-bytes", "1048576", "largest JSON value accepted, in `bytes` (env STORE_MAX_VALUE_BYTES)")
	fs.StringVar(&c.nodeID, "node-id", hostname, "this node's `name`; the pod name in Kubernetes (env POD_NAME)")
	fs.StringVar(&level, "log-level", "info", "debug, info, warn or error; debug logs every request (env STORE_LOG_LEVEL)")
	fs.StringVar(&c.logFormat, "log-format", "json", "json or text (env STORE_LOG_FORMAT)")
	fs.StringVar(&shutdown, "shutdown-timeout", "30s", "how long SIGTERM waits for in-flight requests; cover a forwarded request's deadline (env STORE_SHUTDOWN_TIMEOUT)")
	fs.DurationVar(&c.shutdownDelay, "shutdown-delay", 0, "on SIGTERM, keep serving this long after /readyz turns off, so the Service stops routing here first; 5s in Kubernetes (env STORE_SHUTDOWN_DELAY)")
	fs.BoolVar(&c.showVersion, "version", false, "print the version and exit")
	fs.StringVar(&c.kubeconfig, "kubeconfig", "", "kubeconfig `file` for running outside a pod; inside one the in-cluster config is used (env KUBECONFIG)")
	fs.StringVar(&c.namespace, "namespace", "", "namespace of the leader Lease; the pod's namespace (env POD_NAMESPACE)")
	fs.StringVar(&c.leaseName, "lease-name", "store-leader", "name of the leader Lease (env STORE_LEASE_NAME)")
	fs.DurationVar(&c.leaseDuration, "lease-duration", 15*time.Second, "how long followers wait on a silent leader before taking over (env STORE_LEASE_DURATION)")
	fs.DurationVar(&c.renewDeadline, "renew-deadline", 10*time.Second, "how long a leader may fail to renew before it stops accepting writes (env STORE_RENEW_DEADLINE)")
	fs.DurationVar(&c.retryPeriod, "retry-period", 2*time.Second, "interval between Lease attempts (env STORE_RETRY_PERIOD)")
	var tokenFile, members string
	fs.Int64Var(&c.replicationQueueBytes, "replication-queue-bytes", 32<<20, "bytes of entries the leader keeps in memory for one follower that lags; past it the follower is repaired from disk (env STORE_REPLICATION_QUEUE_BYTES)")
	fs.DurationVar(&c.tombstoneTTL, "tombstone-ttl", 0, "how old a deleted key's tombstone, or a copy a member no longer owns, must be before the leader collects it on every member (a single node collects its own); at least twice --replication-timeout; 0 (the default for now) keeps them: see the README's Limits (env STORE_TOMBSTONE_TTL)")
	fs.StringVar(&c.peerCarrier, "peer-carrier", "stream", "how calls to other nodes travel: stream (one multiplexed connection per peer) or h2c (unencrypted HTTP/2); every node accepts both (env STORE_PEER_CARRIER)")
	fs.StringVar(&c.debugListen, "debug-listen", "", "serve Go profiling (/debug/pprof/) on this `host:port`; off when empty (env STORE_DEBUG_LISTEN)")
	fs.StringVar(&members, "members", "", "fixed member set: comma-separated identities of all nodes, e.g. store-1,store-2,store-3; for clusters outside a StatefulSet (env STORE_MEMBERS)")
	fs.StringVar(&c.statefulSet, "statefulset", "", "`name` of the StatefulSet whose pods <name>-0..<name>-(replicas-1) are the members, followed as it scales (env STORE_STATEFULSET)")
	fs.StringVar(&tokenFile, "peer-token-file", "", "`file` holding the cluster token nodes present to each other; or set STORE_PEER_TOKEN (env STORE_PEER_TOKEN_FILE)")
	fs.IntVar(&c.replicationFactor, "replication-factor", 2, "owners per key, R; ack=quorum waits for the leader and R/2 others (env STORE_REPLICATION_FACTOR)")
	fs.DurationVar(&c.replicationTimeout, "replication-timeout", 5*time.Second, "how long a write waits for its ack level before answering 504 outcome_unknown (env STORE_REPLICATION_TIMEOUT)")
	fs.StringVar(&c.peerTemplate, "peer-address-template", "{id}.store-peers.{namespace}.svc:8080", "host:port of a peer from its `template` with {id}, {namespace}, {ordinal} (env STORE_PEER_ADDRESS_TEMPLATE)")
	fs.Int64Var(&c.maxInflightBytes, "max-inflight-bytes", 0, "bytes of PUT bodies this node holds at once; past it a PUT waits up to 2s, then gets 503 overloaded. 0: 16 MiB, or --max-value-bytes if larger; else at least --max-value-bytes (env STORE_MAX_INFLIGHT_BYTES)")
	fs.Int64Var(&c.requestIDBytes, "request-id-bytes", 64<<20, "bytes of request ids kept to recognise retried writes for 10 minutes; past it the oldest are forgotten early (env STORE_REQUEST_ID_BYTES)")
	fs.Float64Var(&c.compactFreeRatio, "compact-at-start-free-ratio", 0, "compact the data file before opening it when at least this `fraction` of it is free, e.g. 0.5; 0 (the default) never does (env STORE_COMPACT_AT_START_FREE_RATIO)")
	fs.Int64Var(&c.compactMinFreeBytes, "compact-at-start-min-free-bytes", 64<<20, "and only when at least this many `bytes` are free (env STORE_COMPACT_AT_START_MIN_FREE_BYTES)")
	if err := fs.Parse(args); err != nil {
		return config{}, fmt.Errorf("%w: %w", errUsage, err)
	}
	if fs.NArg() > 0 {
		return config{}, fmt.Errorf("%w: unexpected argument %q; every setting is a --flag, and the one subcommand, compact, comes first", errUsage, fs.Arg(0))
	}
	// Environment fallbacks apply only to flags not given on the command line.
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	for name, env := range envFor {
		if v := getenv(env); v != "" && !set[name] {
			if err := fs.Set(name, v); err != nil {
				return config{}, fmt.Errorf("%w: %s=%q: %w", errUsage, env, v, err)
			}
		}
	}

	bad := func(name, format string, a ...any) error {
		return fmt.Errorf("%w: --%s (env %s): %s", errUsage, name, envFor[name], fmt.Sprintf(format, a...))
	}
	if _, port, err := net.SplitHostPort(c.listen); err != nil || port == "" {
		return config{}, bad("listen", "%q is not host:port (e.g. :8080 or 127.0.0.1:8080)", c.listen)
	}
	if strings.TrimSpace(c.dataDir) == "" {
		return config{}, bad("data-dir", "must not be empty")
	}
	n, err := strconv.ParseInt(maxValue, 10, 64)
	if err != nil || n < 1 || n > 64<<20 {
		return config{}, bad("max-value-bytes", "%q must be an integer from 1 to %d (64 MiB)", maxValue, 64<<20)
	}
	c.maxValueBytes = n
	if c.nodeID == "" {
		return config{}, bad("node-id", "must not be empty")
	}
	if err := c.logLevel.UnmarshalText([]byte(level)); err != nil {
		return config{}, bad("log-level", "%q is not one of debug, info, warn, error", level)
	}
	if c.logFormat != "json" && c.logFormat != "text" {
		return config{}, bad("log-format", "%q is not json or text", c.logFormat)
	}
	if c.shutdownTimeout, err = time.ParseDuration(shutdown); err != nil || c.shutdownTimeout <= 0 {
		return config{}, bad("shutdown-timeout", "%q is not a positive duration such as 20s", shutdown)
	}
	if c.replicationQueueBytes < 1<<20 || c.replicationQueueBytes > 4<<30 {
		return config{}, bad("replication-queue-bytes", "%d must be from 1 MiB (1048576) to 4 GiB", c.replicationQueueBytes)
	}
	// A version is collected only once it is older than the TTL; no write
	// may still be on its way to a replica by then (stand-ins are sent
	// within the replication timeout).
	if c.tombstoneTTL != 0 && (c.tombstoneTTL < time.Second || c.tombstoneTTL < 2*c.replicationTimeout) {
		return config{}, bad("tombstone-ttl", "%s must be 0 (keep them) or at least 1s and at least twice --replication-timeout (%s)", c.tombstoneTTL, c.replicationTimeout)
	}
	if c.peerCarrier != "stream" && c.peerCarrier != "h2c" {
		return config{}, bad("peer-carrier", "%q is not stream or h2c", c.peerCarrier)
	}
	if c.debugListen != "" {
		if _, _, err := net.SplitHostPort(c.debugListen); err != nil {
			return config{}, bad("debug-listen", "%q is not host:port (e.g. 127.0.0.1:6060)", c.debugListen)
		}
	}
	for _, m := range strings.Split(members, ",") {
		if m = strings.TrimSpace(m); m != "" {
			c.members = append(c.members, m)
		}
	}
	if len(c.members) > 0 && !slices.Contains(c.members, c.nodeID) {
		return config{}, bad("members", "%q does not list this node (%s)", members, c.nodeID)
	}
	if len(c.members) > 0 && c.statefulSet != "" {
		return config{}, bad("members", "set either --members or --statefulset (env STORE_STATEFULSET), not both")
	}
	if c.replicationFactor < 1 || c.replicationFactor > 7 {
		return config{}, bad("replication-factor", "%d must be from 1 to 7", c.replicationFactor)
	}
	if c.replicationTimeout <= 0 {
		return config{}, bad("replication-timeout", "%s must be a positive duration such as 5s", c.replicationTimeout)
	}
	if c.shutdownDelay < 0 {
		return config{}, bad("shutdown-delay", "%s must not be negative", c.shutdownDelay)
	}
	if c.maxInflightBytes == 0 {
		// The README's memory bound: 16 MiB of bodies per pod keeps a
		// leader within deploy/'s 512 MiB with 1 MiB values at full load.
		c.maxInflightBytes = max(defaultMaxInflightBytes, c.maxValueBytes)
	}
	if c.maxInflightBytes < c.maxValueBytes || c.maxInflightBytes > 16<<30 {
		return config{}, bad("max-inflight-bytes", "%d must be at least --max-value-bytes (%d) and at most 16 GiB", c.maxInflightBytes, c.maxValueBytes)
	}
	if c.requestIDBytes < 1<<20 || c.requestIDBytes > 4<<30 {
		return config{}, bad("request-id-bytes", "%d must be from 1 MiB (1048576) to 4 GiB", c.requestIDBytes)
	}
	// The negated test also refuses NaN.
	if !(c.compactFreeRatio >= 0 && c.compactFreeRatio < 1) {
		return config{}, bad("compact-at-start-free-ratio", "%v must be 0 (off) or a fraction below 1, such as 0.5", c.compactFreeRatio)
	}
	if c.compactMinFreeBytes < 0 {
		return config{}, bad("compact-at-start-min-free-bytes", "%d must not be negative", c.compactMinFreeBytes)
	}
	c.peerToken = getenv("STORE_PEER_TOKEN")
	if tokenFile != "" {
		b, err := os.ReadFile(tokenFile)
		if err != nil {
			return config{}, bad("peer-token-file", "%v", err)
		}
		c.peerToken = strings.TrimSpace(string(b))
	}
	return c, nil
}

// compactConfig is what `store compact` reads.
type compactConfig struct {
	// dataDir holds the bbolt file to compact.
	dataDir string
	// lockTimeout bounds the wait for the file lock; a running store
	// holds it, and then compact fails instead of waiting for it to stop.
	lockTimeout time.Duration
}

// parseCompactConfig reads `store compact`'s flags (args after the word
// compact), with the same environment fallback for --data-dir as the
// store, so it finds the directory the store was given.
func parseCompactConfig(args []string, getenv func(string) string, stderr io.Writer) (compactConfig, error) {
	fs := flag.NewFlagSet("store compact", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var c compactConfig
	fs.StringVar(&c.dataDir, "data-dir", "data", "`directory` holding the bbolt file to compact; the store must not be running on it (env STORE_DATA_DIR)")
	fs.DurationVar(&c.lockTimeout, "lock-timeout", time.Second, "how long to wait for the file lock before failing (a running store holds it)")
	if err := fs.Parse(args); err != nil {
		return compactConfig{}, fmt.Errorf("%w: compact: %w", errUsage, err)
	}
	if fs.NArg() > 0 {
		return compactConfig{}, fmt.Errorf("%w: compact: unexpected argument %q; its settings are --data-dir and --lock-timeout", errUsage, fs.Arg(0))
	}
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == "data-dir" })
	if v := getenv(envFor["data-dir"]); v != "" && !set {
		c.dataDir = v
	}
	if strings.TrimSpace(c.dataDir) == "" {
		return compactConfig{}, fmt.Errorf("%w: compact: --data-dir (env %s): must not be empty", errUsage, envFor["data-dir"])
	}
	if c.lockTimeout <= 0 {
		return compactConfig{}, fmt.Errorf("%w: compact: --lock-timeout: %s must be a positive duration such as 1s", errUsage, c.lockTimeout)
	}
	return c, nil
}
