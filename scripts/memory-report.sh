#!/usr/bin/env bash
# Memory of each node of the local cluster (make cluster): RSS after KEYS
# distinct keys of 256 B (default 1,000,000), then every SAMPLE (60s) during
# a SOAK (10m) of steady 50/50 load over those keys. Prints a markdown
# table; RSS should stay flat after the load (bbolt's file is mmapped, so
# its pages in use count towards RSS: the file size is printed beside it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
port="${PORT:-18080}"
keys="${KEYS:-1000000}"
soak="${SOAK:-10m}"
sample="${SAMPLE:-60}"
go build -o .cluster/bin/storeload ./cmd/storeload

leader=$(curl -fsS "http://127.0.0.1:$port/v1/status" | sed -n 's/.*"leader":"\([^"]*\)".*/\1/p')
[[ -n $leader ]] || { echo "no leader: is make cluster running?" >&2; exit 1; }
lead="http://127.0.0.${leader##*-}:$port"
all="http://127.0.0.1:$port,http://127.0.0.2:$port,http://127.0.0.3:$port"

rss() { # node → RSS in MiB
	local pid
	pid=$(pgrep -f -- "--node-id $1( |$)" | head -1)
	awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$pid/status"
}
row() { # label
	local line="| $1 |"
	for i in 1 2 3; do
		line+=" $(rss "store-$i") / $(( $(stat -c %s ".cluster/data/store-$i/store.db") >> 20 )) |"
	done
	echo "$line"
}

echo "leader $leader; $(nproc) cores; $(date -u +%F); $keys keys of 256 B; soak $soak"
echo "| when | store-1 RSS / file MiB | store-2 | store-3 |"
echo "|---|---|---|---|"
row "start"
# -prefill writes every key once (through the leader, ack=quorum), then a
# one-second run.
.cluster/bin/storeload -targets "$lead" -keys "$keys" -value-size 256 -put-ratio 0.5 -concurrency 64 -duration 1s -prefill >/dev/null
row "after $keys keys"
.cluster/bin/storeload -targets "$all" -keys "$keys" -value-size 256 -put-ratio 0.5 -concurrency 32 -duration "$soak" -prefill=false -json .cluster/soak.json >/dev/null &
load=$!
start=$(date +%s)
while kill -0 "$load" 2>/dev/null; do
	sleep "$sample"
	kill -0 "$load" 2>/dev/null && row "soak +$(( $(date +%s) - start ))s"
done
wait "$load"
row "after the soak"
echo
echo "soak load: $(sed -n 's/.*"throughput_rps": *\([0-9.]*\).*/\1/p' .cluster/soak.json | head -1) ok/s; status codes: $(tr -d '\n ' < .cluster/soak.json | sed -n 's/.*"status_codes":\({[^}]*}\).*/\1/p')"
