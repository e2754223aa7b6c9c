#!/usr/bin/env bash
# Memory and disk of each node of the local cluster (make cluster): RSS and
# bbolt file size after KEYS distinct keys, then every SAMPLE seconds during
# a SOAK of steady load over those keys. MODE picks the shape:
#   small   (default) 1,000,000 keys of 256 B, 50 % PUT / 50 % GET
#   large   400 keys of 1 MiB (the default --max-value-bytes), 50/50, 8 workers
#   deletes 1,000,000 keys of 256 B, 40 % PUT / 30 % DELETE / 30 % GET
# KEYS, SOAK (10m), SAMPLE (60) and CONCURRENCY override the mode's values.
# Prints a markdown table, then each file's growth over the soak's second
# half: RSS should stay flat, and the file should plateau (bbolt reuses the
# pages that overwrites and deletes free; its file is mmapped, so the pages
# in use count towards RSS).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
port="${PORT:-18080}"
mode="${MODE:-small}"
case $mode in
small) keys=1000000 size=256 puts=0.5 deletes=0 workers=32 ;;
large) keys=400 size=1048576 puts=0.5 deletes=0 workers=8 ;;
deletes) keys=1000000 size=256 puts=0.4 deletes=0.3 workers=32 ;;
*) echo "MODE must be small, large or deletes" >&2; exit 2 ;;
esac
keys="${KEYS:-$keys}"
workers="${CONCURRENCY:-$workers}"
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
file() { # node → file size in MiB
	echo $(( $(stat -c %s ".cluster/data/$1/store.db") >> 20 ))
}
mid=() # each file's size at the soak's half-way mark, once taken
row() { # label
	local line="| $1 |"
	for i in 1 2 3; do
		line+=" $(rss "store-$i") / $(file "store-$i") |"
	done
	echo "$line"
}

echo "mode $mode; leader $leader; $(nproc) cores; $(date -u +%F); $keys keys of $size B; put $puts, delete $deletes; soak $soak, $workers workers"
echo "| when | store-1 RSS / file MiB | store-2 | store-3 |"
echo "|---|---|---|---|"
row "start"
# -prefill writes every key once (through the leader, ack=quorum), then a
# one-second run.
.cluster/bin/storeload -targets "$lead" -keys "$keys" -value-size "$size" -put-ratio 0.5 -concurrency "$workers" -duration 1s -prefill >/dev/null
row "after $keys keys"
.cluster/bin/storeload -targets "$all" -keys "$keys" -value-size "$size" -put-ratio "$puts" -delete-ratio "$deletes" \
	-concurrency "$workers" -duration "$soak" -prefill=false -json .cluster/soak.json >/dev/null &
load=$!
start=$(date +%s)
case $soak in # seconds, for the half-way mark
*h) soak_s=$(( ${soak%h} * 3600 )) ;;
*m) soak_s=$(( ${soak%m} * 60 )) ;;
*s) soak_s=${soak%s} ;;
*) echo "SOAK must be whole seconds, minutes or hours (90s, 10m, 1h)" >&2; exit 2 ;;
esac
while kill -0 "$load" 2>/dev/null; do
	sleep "$sample"
	kill -0 "$load" 2>/dev/null || break
	row "soak +$(( $(date +%s) - start ))s"
	if [[ -z ${mid[*]:-} && $(( $(date +%s) - start )) -ge $(( soak_s / 2 )) ]]; then
		mid=("$(file store-1)" "$(file store-2)" "$(file store-3)")
	fi
done
wait "$load"
row "after the soak"
echo
echo "soak load: $(sed -n 's/.*"throughput_rps": *\([0-9.]*\).*/\1/p' .cluster/soak.json | head -1) ok/s; status codes: $(tr -d '\n ' < .cluster/soak.json | sed -n 's/.*"status_codes":\({[^}]*}\).*/\1/p')"
if [[ -n ${mid[*]:-} ]]; then
	line="file growth over the soak's second half:"
	for i in 1 2 3; do line+=" store-$i $(( $(file "store-$i") - mid[i-1] )) MiB;"; done
	echo "$line"
fi
