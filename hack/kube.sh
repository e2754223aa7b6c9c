#!/usr/bin/env bash
# Builds the rest of a single-node Kubernetes, next to the control plane that
# hack/controlplane.sh builds (kube-apiserver + etcd), from the Go module proxy:
#   kubelet, kube-controller-manager, kube-scheduler, kube-proxy, kubectl  hack/kube/go.mod
#   containerd, containerd-shim-runc-v2, ctr                               hack/kube/containerd/go.mod
#   coredns (only the plugins the cluster uses)                            hack/kube/coredns/
#   a pause image built from source (pause-image.tar + pause-image.ref)    hack/kube/pause/
# and installs what Debian ships well enough: runc, the CNI plugins
# (/usr/lib/cni), iptables and conntrack (skipped when already present).
#
# The binaries are cached outside the checkout, keyed by version and by a hash
# of every pin, like the control plane:
#   ${XDG_CACHE_HOME:-~/.cache}/statefulkv/kube/<key>/
#
# Usage: hack/kube.sh          install packages, build if missing, print the folder
#        hack/kube.sh --dir    only print the folder (builds and installs nothing)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mod="$here/kube"
modversion() { awk -v m="$1" '{ for (i = 1; i < NF; i++) if ($i == m && $(i+1) ~ /^v[0-9]/) { print $(i+1); exit } }' "$2"; }
k8s_version="$(modversion k8s.io/kubernetes "$mod/go.mod")"
containerd_version="$(modversion github.com/containerd/containerd/v2 "$mod/containerd/go.mod")"
coredns_version="$(modversion github.com/coredns/coredns "$mod/coredns/go.mod")"
# The key hashes every input of the build, so a change of any pin, of the
# CoreDNS plugin list or of the pause program rebuilds.
sum="$(cd "$mod" && cat go.mod go.sum containerd/go.mod containerd/go.sum coredns/go.mod coredns/go.sum coredns/main.go \
	pause/go.mod pause/cmd/pause/main.go "$here/image/main.go" "$here/kube.sh" | sha256sum | cut -c1-12)"
key="k8s-${k8s_version}_containerd-${containerd_version}_coredns-${coredns_version}_${sum}"
dir="${STATEFULKV_KUBE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/statefulkv/kube/$key}"
pause_ref="statefulkv.local/pause:1"
bins=(kubelet kube-controller-manager kube-scheduler kube-proxy kubectl containerd containerd-shim-runc-v2 ctr coredns pause-image.tar pause-image.ref)

if [[ "${1:-}" == "--dir" ]]; then
	echo "$dir"
	exit 0
fi

# Debian's runc (1.1.5) works with containerd 2.4; its CNI plugins land in
# /usr/lib/cni. One apt-get for whatever is missing, nothing when all is there.
need=()
command -v runc >/dev/null || need+=(runc)
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback && -x /usr/lib/cni/portmap ]] || need+=(containernetworking-plugins)
command -v iptables >/dev/null && command -v ip6tables >/dev/null || need+=(iptables)
command -v conntrack >/dev/null || need+=(conntrack)
if ((${#need[@]})); then
	echo "kube: installing ${need[*]} from Debian" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -q --no-install-recommends "${need[@]}" >&2 ||
		{ apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${need[@]}" >&2; }
fi

complete=1
for b in "${bins[@]}"; do [[ -e "$dir/$b" ]] || complete=0; done
if ((complete)); then
	echo "kube: cached in $dir" >&2
	echo "$dir"
	exit 0
fi

# Build into a sibling folder and rename it into place only when everything
# is built: a cancelled build never leaves a half-populated cache that later
# runs would trust.
mkdir -p "$(dirname "$dir")"
tmp="$(mktemp -d "$(dirname "$dir")/.build-$key.XXXXXX")"
trap 'rm -rf "$tmp"; [[ -n "${ticker:-}" ]] && kill "$ticker" 2>/dev/null || true' EXIT

start=$SECONDS
# A heartbeat so a long, quiet build is visibly alive in CI logs.
( while sleep 60; do echo "kube: still building ($(( (SECONDS - start) / 60 )) min)" >&2; done ) &
ticker=$!

step() { echo "kube: $1 ($(( SECONDS - start ))s)" >&2; }

step "building kubelet, kube-controller-manager, kube-scheduler, kube-proxy, kubectl $k8s_version"
vpkg=k8s.io/component-base/version
major="${k8s_version#v}"; major="${major%%.*}"
minor="${k8s_version#v*.}"; minor="${minor%%.*}"
# The same flags as the kube-apiserver build, so the Go build cache it left
# is reused; without the version the kubelet reports v0.0.0 to the apiserver.
(cd "$mod" && go build -trimpath -o "$tmp/" \
	-ldflags "-s -w -X $vpkg.gitVersion=$k8s_version -X $vpkg.gitMajor=$major -X $vpkg.gitMinor=$minor -X $vpkg.gitTreeState=clean" \
	k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler \
	k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubectl)

step "building containerd, containerd-shim-runc-v2, ctr $containerd_version"
cpkg=github.com/containerd/containerd/v2
(cd "$mod/containerd" && go build -trimpath -tags "no_btrfs no_devmapper no_zfs" -o "$tmp/" \
	-ldflags "-s -w -X $cpkg/version.Version=$containerd_version -X $cpkg/version.Revision=module-proxy" \
	$cpkg/cmd/containerd $cpkg/cmd/containerd-shim-runc-v2 $cpkg/cmd/ctr)

step "building coredns $coredns_version"
(cd "$mod/coredns" && go build -trimpath -ldflags "-s -w" -o "$tmp/coredns" .)

step "building the pause image $pause_ref"
# Packed like the store's image (hack/image): the binary alone, as nobody,
# upstream's pause user.
(cd "$mod/pause" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp/pause" ./cmd/pause) &&
	(cd "$here/image" && go run . -binary "$tmp/pause" -name pause -user 65535:65535 -data=false -port 0 \
		-version "$pause_ref" -tag "$pause_ref" -out "$tmp/pause-image.tar" >/dev/null)
echo "$pause_ref" >"$tmp/pause-image.ref"
rm -f "$tmp/pause"

chmod 755 "$tmp"
rm -rf "$dir"
mv "$tmp" "$dir"
step "built into $dir"
echo "$dir"
