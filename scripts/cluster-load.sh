#!/usr/bin/env bash
# The README's load table: standard shapes against the local cluster that
# `make cluster` runs (127.0.0.1-3:18080). Each shape runs for DURATION
# (default 10s) with 256 B values; prints a markdown table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
port="${PORT:-18080}"
duration="${DURATION:-10s}"
go build -o .cluster/bin/storeload ./cmd/storeload

leader=$(curl -fsS "http://127.0.0.1:$port/v1/status" | sed -n 's/.*"leader":"\([^"]*\)".*/\1/p')
[[ -n $leader ]] || { echo "no leader: is make cluster running?" >&2; exit 1; }
lead="http://127.0.0.${leader##*-}:$port"
for i in 1 2 3; do
	[[ "store-$i" == "$leader" ]] || { follower="http://127.0.0.$i:$port"; break; }
done

run() { # label, then storeload flags
	local label=$1; shift
	.cluster/bin/storeload -duration "$duration" -keys 10000 -value-size 256 -markdown-row "$label" "$@" | grep '^| '
}
echo "leader $leader ($lead), follower $follower; $(nproc) cores; $(date -u +%F)"
echo "| workload | ok/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | non-2xx |"
echo "|---|---|---|---|---|---|---|---|"
run "PUT via a follower, 1 client, ack=quorum" -targets "$follower" -put-ratio 1 -concurrency 1
run "PUT to the leader, 1 client, ack=quorum" -targets "$lead" -put-ratio 1 -concurrency 1
run "PUT via a follower, 64 clients, ack=quorum" -targets "$follower" -put-ratio 1 -concurrency 64
run "PUT to the leader, 64 clients, ack=leader" -targets "$lead" -put-ratio 1 -concurrency 64 -ack leader
run "PUT to the leader, 64 clients, ack=quorum" -targets "$lead" -put-ratio 1 -concurrency 64 -ack quorum
run "PUT to the leader, 64 clients, ack=all" -targets "$lead" -put-ratio 1 -concurrency 64 -ack all
run "GET via a follower, 64 clients, strong" -targets "$follower" -put-ratio 0 -concurrency 64 -consistency strong
run "GET via a follower, 64 clients, stale" -targets "$follower" -put-ratio 0 -concurrency 64 -consistency stale
run "GET via the leader, 64 clients, strong" -targets "$lead" -put-ratio 0 -concurrency 64 -consistency strong
run "GET via all nodes, 64 clients, stale" -targets "http://127.0.0.1:$port,http://127.0.0.2:$port,http://127.0.0.3:$port" -put-ratio 0 -concurrency 64 -consistency stale
run "50/50 via all nodes, 64 clients, quorum/strong" -targets "http://127.0.0.1:$port,http://127.0.0.2:$port,http://127.0.0.3:$port" -put-ratio 0.5 -concurrency 64
