#!/usr/bin/env bash
# Builds the Kubernetes control plane the integration tests run against:
# kube-apiserver from k8s.io/kubernetes and etcd from go.etcd.io/etcd/server/v3,
# both from the Go module proxy (see hack/controlplane/go.mod for the pins).
#
# The binaries are cached outside the checkout, keyed by version, so a fresh
# clone on the same machine (which is what CI gets) reuses them:
#   ${XDG_CACHE_HOME:-~/.cache}/statefulkv/controlplane/<key>/{kube-apiserver,etcd}
#
# Usage: hack/controlplane.sh          build if missing, print the folder
#        hack/controlplane.sh --dir    only print the folder (builds nothing)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mod="$here/controlplane"
# Versions come from go.mod, whether a requirement is in a block or on one line.
modversion() { awk -v m="$1" '{ for (i = 1; i < NF; i++) if ($i == m && $(i+1) ~ /^v[0-9]/) { print $(i+1); exit } }' "$mod/go.mod"; }
k8s_version="$(modversion k8s.io/kubernetes)"
etcd_version="$(modversion go.etcd.io/etcd/server/v3)"
# The key also hashes go.mod/go.sum so a change of any pin rebuilds.
sum="$(cat "$mod/go.mod" "$mod/go.sum" "$mod/etcd/main.go" | sha256sum | cut -c1-12)"
key="k8s-${k8s_version}_etcd-${etcd_version}_${sum}"
dir="${STATEFULKV_CONTROLPLANE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/statefulkv/controlplane/$key}"

if [[ "${1:-}" == "--dir" ]]; then
	echo "$dir"
	exit 0
fi

if [[ -x "$dir/kube-apiserver" && -x "$dir/etcd" ]]; then
	echo "controlplane: cached in $dir" >&2
	echo "$dir"
	exit 0
fi

mkdir -p "$dir"
tmp="$(mktemp -d "$dir/.build.XXXXXX")"
trap 'rm -rf "$tmp"; [[ -n "${ticker:-}" ]] && kill "$ticker" 2>/dev/null || true' EXIT

start=$SECONDS
# A heartbeat so a long, quiet build (kube-apiserver takes 15+ minutes on two
# cores) is visibly alive in CI logs.
( while sleep 60; do echo "controlplane: still building ($(( (SECONDS - start) / 60 )) min)" >&2; done ) &
ticker=$!

cd "$mod"
echo "controlplane: building etcd $etcd_version" >&2
go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" ./etcd

echo "controlplane: building kube-apiserver $k8s_version (slow; cached afterwards)" >&2
vpkg=k8s.io/component-base/version
major="${k8s_version#v}"; major="${major%%.*}"
minor="${k8s_version#v*.}"; minor="${minor%%.*}"
go build -trimpath -o "$tmp/kube-apiserver" \
	-ldflags "-s -w -X $vpkg.gitVersion=$k8s_version -X $vpkg.gitMajor=$major -X $vpkg.gitMinor=$minor -X $vpkg.gitTreeState=clean" \
	k8s.io/kubernetes/cmd/kube-apiserver

# Move into place only when both are built, so a cancelled build never leaves
# a half-populated cache that later runs would trust.
mv "$tmp/etcd" "$dir/etcd"
mv "$tmp/kube-apiserver" "$dir/kube-apiserver"
echo "controlplane: built in $(( SECONDS - start ))s into $dir" >&2
echo "$dir"
