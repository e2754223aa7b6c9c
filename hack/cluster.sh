#!/usr/bin/env bash
# make cluster / make cluster-down: a local store cluster on 127.0.0.1-3 with
# the real control plane. State (logs, data, kubeconfigs) lives in .cluster/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
state=.cluster
pidfile=$state/pid

down() {
	if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
		pid=$(cat "$pidfile")
		kill -TERM "$pid"
		for _ in $(seq 1 120); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.5
		done
		if kill -0 "$pid" 2>/dev/null; then
			echo "cluster: still running after 60s; killing" >&2
			kill -KILL "$pid"
		fi
		echo "cluster: stopped"
	else
		echo "cluster: not running"
	fi
	rm -f "$pidfile" "$state/ready"
}

up() {
	if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
		echo "cluster: already running (pid $(cat "$pidfile")); make cluster-down first" >&2
		exit 1
	fi
	mkdir -p "$state/logs"
	rm -f "$state/ready"
	go build -ldflags "-X main.version=$(git describe --tags --always --dirty 2>/dev/null || echo dev)" -o "$state/bin/store" ./cmd/store
	go build -o "$state/bin/localcluster" ./hack/localcluster
	nohup "$state/bin/localcluster" --state "$state" --store "$state/bin/store" "$@" \
		>"$state/logs/localcluster.log" 2>&1 &
	echo $! >"$pidfile"
	for _ in $(seq 1 240); do
		if [[ -f $state/ready ]]; then
			sed -n '/local store cluster is up/,$p' "$state/logs/localcluster.log"
			return 0
		fi
		if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
			echo "cluster: failed to start:" >&2
			cat "$state/logs/localcluster.log" >&2
			rm -f "$pidfile"
			exit 1
		fi
		sleep 0.5
	done
	echo "cluster: no leader after 120s; see $state/logs" >&2
	down
	exit 1
}

case "${1:-}" in
up) shift; up "$@" ;;
down) down ;;
*) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
