#!/usr/bin/env bash
# Standard load profile against one store URL, e.g. through
#   kubectl port-forward svc/store 8080:8080
# Usage: scripts/load.sh [URL] [extra storeload flags...]
# Writes load-report.json and load-report.html in the current folder.
set -euo pipefail
url="${1:-http://127.0.0.1:8080}"
shift || true
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec go run ./cmd/storeload \
	-targets "$url" \
	-duration 30s \
	-concurrency 32 \
	-put-ratio 0.5 \
	-keys 10000 \
	-dist uniform \
	-value-size 256 \
	-json load-report.json \
	-html load-report.html \
	"$@"
