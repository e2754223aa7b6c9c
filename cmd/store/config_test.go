package main

import (
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"
)

func TestParseConfig(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		check   func(config) bool
		wantErr string // substring naming the flag; "" means success
	}{
		{"defaults", nil, nil, func(c config) bool {
			return c.listen == ":8080" && c.dataDir == "data" && c.maxValueBytes == 1<<20 &&
				c.nodeID == "host" && c.logLevel == slog.LevelInfo && c.shutdownTimeout == 30*time.Second && c.shutdownDelay == 0
		}, ""},
		{"env fallback", nil, map[string]string{"STORE_LISTEN": "127.0.0.1:9", "POD_NAME": "store-1", "STORE_MAX_VALUE_BYTES": "10"},
			func(c config) bool {
				return c.listen == "127.0.0.1:9" && c.nodeID == "store-1" && c.maxValueBytes == 10
			}, ""},
		{"flag beats env", []string{"--listen", ":1"}, map[string]string{"STORE_LISTEN": ":2"},
			func(c config) bool { return c.listen == ":1" }, ""},
		{"bad listen", []string{"--listen", "nope"}, nil, nil, "--listen"},
		{"bad listen from env", nil, map[string]string{"STORE_LISTEN": "nope"}, nil, "env STORE_LISTEN"},
		{"max value not a number", []string{"--max-value-bytes", "1MB"}, nil, nil, "--max-value-bytes"},
		{"max value zero", []string{"--max-value-bytes", "0"}, nil, nil, "--max-value-bytes"},
		{"max value huge", []string{"--max-value-bytes", "999999999999"}, nil, nil, "--max-value-bytes"},
		{"empty data dir", []string{"--data-dir", " "}, nil, nil, "--data-dir"},
		{"bad log level", []string{"--log-level", "loud"}, nil, nil, "--log-level"},
		{"bad log format", []string{"--log-format", "xml"}, nil, nil, "--log-format"},
		{"bad shutdown timeout", []string{"--shutdown-timeout", "-1s"}, nil, nil, "--shutdown-timeout"},
		{"unknown flag", []string{"--nope"}, nil, nil, "-nope"},
		{"stray argument", []string{"serve"}, nil, nil, `"serve"`},
		{"peer token from env", nil, map[string]string{"STORE_PEER_TOKEN": "s3cret-s3cret-s3cret"},
			func(c config) bool { return c.peerToken == "s3cret-s3cret-s3cret" }, ""},
		{"members", []string{"--members", "a, host ,c", "--node-id", "host"}, nil,
			func(c config) bool { return len(c.members) == 3 && c.members[1] == "host" }, ""},
		{"members without this node", []string{"--members", "a,b"}, nil, nil, "--members"},
		{"bad debug listen", []string{"--debug-listen", "6060"}, nil, nil, "--debug-listen"},
		{"statefulset from env, replication defaults", nil, map[string]string{"STORE_STATEFULSET": "store"},
			func(c config) bool {
				return c.statefulSet == "store" && c.replicationFactor == 2 && c.replicationTimeout == 5*time.Second
			}, ""},
		{"members and statefulset", []string{"--members", "host", "--statefulset", "store"}, nil, nil, "--statefulset"},
		{"replication factor zero", []string{"--replication-factor", "0"}, nil, nil, "--replication-factor"},
		{"replication factor too big", nil, map[string]string{"STORE_REPLICATION_FACTOR": "9"}, nil, "env STORE_REPLICATION_FACTOR"},
		{"replication timeout zero", []string{"--replication-timeout", "0s"}, nil, nil, "--replication-timeout"},
		{"shutdown delay from env", nil, map[string]string{"STORE_SHUTDOWN_DELAY": "3s"},
			func(c config) bool { return c.shutdownDelay == 3*time.Second }, ""},
		{"missing peer token file", []string{"--peer-token-file", "/nonexistent/token"}, nil, nil, "--peer-token-file"},
		{"queue bytes and carrier defaults", nil, nil,
			func(c config) bool { return c.replicationQueueBytes == 32<<20 && c.peerCarrier == "stream" }, ""},
		{"queue bytes from env, h2c", []string{"--peer-carrier", "h2c"}, map[string]string{"STORE_REPLICATION_QUEUE_BYTES": "8388608"},
			func(c config) bool { return c.replicationQueueBytes == 8<<20 && c.peerCarrier == "h2c" }, ""},
		{"queue bytes too small", []string{"--replication-queue-bytes", "1000"}, nil, nil, "--replication-queue-bytes"},
		{"unknown carrier", []string{"--peer-carrier", "grpc"}, nil, nil, "--peer-carrier"},
		{"tombstone ttl default: keep them", nil, nil, func(c config) bool { return c.tombstoneTTL == 0 }, ""},
		{"tombstone ttl from env", nil, map[string]string{"STORE_TOMBSTONE_TTL": "30s"}, func(c config) bool { return c.tombstoneTTL == 30*time.Second }, ""},
		{"tombstone ttl under twice the replication timeout", []string{"--tombstone-ttl", "9s"}, nil, nil, "--tombstone-ttl"},
		{"disk defaults: 64 MiB of request ids, no compaction at start", nil, nil, func(c config) bool {
			return c.requestIDBytes == 64<<20 && c.compactFreeRatio == 0 && c.compactMinFreeBytes == 64<<20
		}, ""},
		{"compaction at start from env", nil, map[string]string{"STORE_COMPACT_AT_START_FREE_RATIO": "0.5", "STORE_COMPACT_AT_START_MIN_FREE_BYTES": "0"},
			func(c config) bool { return c.compactFreeRatio == 0.5 && c.compactMinFreeBytes == 0 }, ""},
		{"free ratio of 1", []string{"--compact-at-start-free-ratio", "1"}, nil, nil, "--compact-at-start-free-ratio"},
		{"negative free ratio", []string{"--compact-at-start-free-ratio", "-0.1"}, nil, nil, "--compact-at-start-free-ratio"},
		{"free ratio NaN", []string{"--compact-at-start-free-ratio", "NaN"}, nil, nil, "--compact-at-start-free-ratio"},
		{"free ratio not a number", nil, map[string]string{"STORE_COMPACT_AT_START_FREE_RATIO": "half"}, nil, "STORE_COMPACT_AT_START_FREE_RATIO"},
		{"negative min free bytes", []string{"--compact-at-start-min-free-bytes", "-1"}, nil, nil, "--compact-at-start-min-free-bytes"},
		{"request id bytes too small", []string{"--request-id-bytes", "1000"}, nil, nil, "--request-id-bytes"},
		{"in-flight bytes below the value limit", []string{"--max-value-bytes", "4194304", "--max-inflight-bytes", "1048576"}, nil, nil, "--max-inflight-bytes"},
		{"in-flight bytes from the environment", nil, map[string]string{"STORE_MAX_INFLIGHT_BYTES": "-1"}, nil, "--max-inflight-bytes"},
		{"in-flight bytes default: 16 MiB", nil, nil, func(c config) bool { return c.maxInflightBytes == 16<<20 }, ""},
		{"in-flight bytes default follows a larger value limit", []string{"--max-value-bytes", "33554432"}, nil, func(c config) bool { return c.maxInflightBytes == 32<<20 }, ""},
		{"request id bytes from env", nil, map[string]string{"STORE_REQUEST_ID_BYTES": "8388608"},
			func(c config) bool { return c.requestIDBytes == 8<<20 }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			getenv := func(k string) string { return tt.env[k] }
			c, err := parseConfig(tt.args, getenv, "host", io.Discard)
			if tt.wantErr != "" {
				if err == nil || !errors.Is(err, errUsage) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want a usage error naming %s", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !tt.check(c) {
				t.Fatalf("config = %+v", c)
			}
		})
	}
}

func TestParseCompactConfig(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		want    compactConfig
		wantErr string // substring naming the flag; "" means success
	}{
		{"defaults", nil, nil, compactConfig{dataDir: "data", lockTimeout: time.Second}, ""},
		{"data dir from env", nil, map[string]string{"STORE_DATA_DIR": "/d"}, compactConfig{dataDir: "/d", lockTimeout: time.Second}, ""},
		{"flag beats env", []string{"--data-dir", "/f"}, map[string]string{"STORE_DATA_DIR": "/d"}, compactConfig{dataDir: "/f", lockTimeout: time.Second}, ""},
		{"lock timeout", []string{"--lock-timeout", "5s"}, nil, compactConfig{dataDir: "data", lockTimeout: 5 * time.Second}, ""},
		{"empty data dir", []string{"--data-dir", ""}, nil, compactConfig{}, "--data-dir"},
		{"zero lock timeout", []string{"--lock-timeout", "0s"}, nil, compactConfig{}, "--lock-timeout"},
		{"a store flag", []string{"--listen", ":1"}, nil, compactConfig{}, "-listen"},
		{"stray argument", []string{"now"}, nil, compactConfig{}, `"now"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := parseCompactConfig(tt.args, func(k string) string { return tt.env[k] }, io.Discard)
			if tt.wantErr != "" {
				if err == nil || !errors.Is(err, errUsage) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want a usage error naming %s", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c != tt.want {
				t.Fatalf("config = %+v, want %+v", c, tt.want)
			}
		})
	}
}
