#!/usr/bin/env bash
# Keeps imports pointing one way (see ../shared/STYLE.md):
#   cmd/* → internal/api → internal/replication → internal/storage
#   internal/election, internal/membership and internal/peerhttp import no other package of ours
#   nothing imports internal/api except cmd/*, hack/*; nothing imports cmd/*
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mod=github.com/statefulkv/store
fail=0
while read -r pkg imports; do
	for imp in $imports; do
		[[ $imp == $mod/* ]] || continue
		rule=""
		case "$pkg" in
		$mod/internal/storage) [[ $imp == $mod/internal/* ]] && rule="storage imports nothing of ours" ;;
		$mod/internal/replication) [[ $imp == $mod/internal/storage ]] || rule="replication imports only storage" ;;
		$mod/internal/election) rule="election imports nothing of ours" ;;
		$mod/internal/membership) rule="membership imports nothing of ours" ;;
		$mod/internal/peerhttp) rule="peerhttp imports nothing of ours" ;;
		$mod/internal/api) [[ $imp == $mod/internal/storage || $imp == $mod/internal/replication || $imp == $mod/internal/peerhttp ]] || rule="api imports only replication, peerhttp and storage" ;;
		esac
		[[ $imp == $mod/cmd/* ]] && rule="nothing imports cmd/"
		[[ -n $rule ]] && { echo "deps: $pkg imports $imp: $rule" >&2; fail=1; }
	done
done < <(go list -f '{{.ImportPath}} {{join .Imports " "}}' ./...)
exit $fail
