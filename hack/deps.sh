#!/usr/bin/env bash
# Keeps imports pointing one way (see ../shared/STYLE.md):
#   cmd/* → internal/api → internal/node → internal/replication → internal/storage
#   internal/transport, internal/election, internal/membership and
#   internal/peerhttp import no other package of ours
#   nothing imports internal/api except cmd/*, hack/*; nothing imports cmd/*
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mod=github.com/statefulkv/store
fail=0
only() { # only <import> <allowed...>: succeeds when import is one of allowed
	local imp=$1
	shift
	for a in "$@"; do [[ $imp == "$mod/internal/$a" ]] && return 0; done
	return 1
}
while read -r pkg imports; do
	for imp in $imports; do
		[[ $imp == $mod/* ]] || continue
		rule=""
		case "$pkg" in
		$mod/internal/storage) rule="storage imports nothing of ours" ;;
		$mod/internal/transport) rule="transport imports nothing of ours" ;;
		$mod/internal/election) rule="election imports nothing of ours" ;;
		$mod/internal/membership) rule="membership imports nothing of ours" ;;
		$mod/internal/peerhttp) rule="peerhttp imports nothing of ours" ;;
		$mod/internal/replication) only "$imp" storage transport || rule="replication imports only storage and transport" ;;
		$mod/internal/node) only "$imp" replication storage transport || rule="node imports only replication, storage and transport" ;;
		$mod/internal/api) only "$imp" node replication storage transport peerhttp || rule="api imports only node, replication, storage, transport and peerhttp" ;;
		esac
		[[ $imp == $mod/internal/api && $pkg != $mod/cmd/* && $pkg != $mod/hack/* ]] && rule="only cmd/ and hack/ import api"
		[[ $imp == $mod/cmd/* ]] && rule="nothing imports cmd/"
		[[ -n $rule ]] && { echo "deps: $pkg imports $imp: $rule" >&2; fail=1; }
	done
done < <(go list -f '{{.ImportPath}} {{join .Imports " "}}' ./...)
exit $fail
