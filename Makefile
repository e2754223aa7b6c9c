# Two commands matter: `go run ./cmd/store` runs the store, `make test` runs
# every test. Everything else here is a convenience around them.
SHELL := /usr/bin/env bash
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)

.PHONY: all build run test unit chaos controlplane kube kube-up kube-down e2e cluster cluster-down image fuzz bench bench-failover bench-compare bench-ab bench-memory vet clean

all: build

build:
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/store ./cmd/store

run:
	$(GO) run ./cmd/store

# Builds kube-apiserver and etcd from the Go module proxy once (15 min or so on
# two cores) and caches them under ~/.cache/statefulkv; later runs are instant.
controlplane:
	bash hack/controlplane.sh >/dev/null

# The rest of a single-node Kubernetes (kubelet, kube-proxy, controller-manager,
# scheduler, kubectl, containerd, CoreDNS, a pause image) from the module proxy,
# cached by version under ~/.cache/statefulkv/kube; installs runc, the CNI
# plugins, iptables and conntrack from Debian when missing.
kube: controlplane
	bash hack/kube.sh >/dev/null

KUBE_STATE ?= .kube-local
KUBECLUSTER = bin/kubecluster -state $(KUBE_STATE) -controlplane "$$(bash hack/controlplane.sh --dir)" -kube "$$(bash hack/kube.sh --dir)"

bin/kubecluster: $(wildcard hack/kubecluster/*.go hack/kubecluster/cmd/kubecluster/*.go)
	$(GO) build -o bin/kubecluster ./hack/kubecluster/cmd/kubecluster

# A real single-node Kubernetes on the bridge cni0 (10.88.0.1) with the store
# image imported; prints the kubeconfig and the kubectl lines. State in
# .kube-local/. kube-down leaves the machine as kube-up found it.
kube-up: kube image bin/kubecluster
	$(KUBECLUSTER) -store-image bin/store-image.tar up

kube-down: bin/kubecluster
	$(KUBECLUSTER) down

# End-to-end tests of deploy/ in that cluster (e2e/): one bring-up, the
# README's quick start, disruptions under load, teardown checked.
e2e: kube image
	$(GO) test -tags e2e -count=1 -timeout 30m -v ./e2e

# A local 3-node cluster on 127.0.0.1-3:18080 against the real control plane;
# prints curl lines. Logs and data in .cluster/.
cluster: controlplane
	bash hack/cluster.sh up

cluster-down:
	bash hack/cluster.sh down

# The container image as a docker-archive tarball, without a Docker daemon or
# network: a static binary on an empty base, non-root (hack/image).
image:
	CGO_ENABLED=0 GOOS=linux GOARCH=amd64 $(GO) build -trimpath -ldflags "-s -w $(LDFLAGS)" -o bin/store-linux ./cmd/store
	cd hack/image && $(GO) run . -binary ../../bin/store-linux -out ../../bin/store-image.tar -tag statefulkv/store:$(VERSION) -version $(VERSION)

vet:
	bash hack/deps.sh
	$(GO) vet ./...
	$(GO) vet -tags e2e ./e2e
	cd hack/image && $(GO) vet ./...
	cd hack/kube/pause && $(GO) vet ./...
	cd hack/kube/coredns && $(GO) vet ./...

# Every test, including the integration tests against the real control plane
# and the end-to-end tests of deploy/ in a real single-node Kubernetes.
test: controlplane kube image vet
	$(GO) test -race -count=1 -timeout 30m ./...
	cd hack/image && $(GO) test -count=1 ./...
	$(GO) test -tags e2e -count=1 -timeout 30m -v ./e2e

# Fast loop while editing: no control plane, no race detector.
unit:
	$(GO) test -count=1 ./internal/storage ./internal/api ./cmd/store

# The linearizability test (porcupine) for CHAOS_DURATION (default 3m)
# instead of make test's 12 s: rounds of leader SIGKILL + follower SIGSTOP
# under concurrent strong reads and writes.
chaos: controlplane
	set -o pipefail; CHAOS_DURATION=$${CHAOS_DURATION:-3m} $(GO) test -race -count=1 -timeout 60m -run TestLinearizable -v ./cmd/store | grep -E '^(---|ok|FAIL|\s+\S+_test.go)'

# go test -fuzz takes one package and one target at a time, so the fuzzers
# run one after the other, each for FUZZTIME. make test runs their seeds.
fuzz:
	$(GO) test -run='^$$' -fuzz='^FuzzDB_MatchesMapModel$$' -fuzztime=$${FUZZTIME:-60s} ./internal/storage
	$(GO) test -run='^$$' -fuzz='^FuzzServer_Handler$$' -fuzztime=$${FUZZTIME:-60s} ./internal/api

# Storage and HTTP benchmarks; compare runs with benchstat.
bench:
	$(GO) test -run='^$$' -bench=. -benchmem -count=$${COUNT:-5} ./internal/storage ./internal/api

# Leader handoff with the default timings: 5 SIGTERM and 5 SIGKILL rounds on
# a real 3-node cluster holding 1k and then 1M keys (FAILOVER_KEYS=1000,1000000
# overrides); prints a table (takes about 15 minutes).
bench-failover: controlplane
	set -o pipefail; $(GO) test -tags failoverbench -run TestFailoverBench -count=1 -timeout 60m -v ./cmd/store | grep -E '^(\||failover|--- |ok|FAIL)'

# The same load shapes against a 3-member etcd (its own benchmark tool) and a
# 3-node store cluster, alternating; prints medians and store ÷ etcd ratios and
# writes .bench/bench-compare.json. ROUNDS=3 by default.
bench-compare: controlplane
	mkdir -p .bench
	cd hack/etcdbench && $(GO) build -o ../../.bench/etcdbench .
	$(GO) build -o .bench/storeload ./cmd/storeload
	$(GO) build -o .bench/benchcompare ./hack/benchcompare
	bash hack/cluster.sh down >/dev/null; rm -rf .cluster/data
	bash hack/cluster.sh up >/dev/null
	.bench/benchcompare -etcd "$$(bash hack/controlplane.sh --dir)/etcd" -rounds $${ROUNDS:-3}; rc=$$?; bash hack/cluster.sh down >/dev/null; exit $$rc

# This tree against BASE (default 249e9c0, the commit before the node layer
# and the typed transport) and against itself with --peer-carrier=h2c: every
# round starts a fresh local cluster of each in turn (order rotating) and runs
# bench-compare's shapes; prints medians and ratios to BASE. ROUNDS=5.
bench-ab: controlplane
	mkdir -p .bench
	$(GO) build -o .bench/storeload ./cmd/storeload
	$(GO) build -o .bench/benchcompare ./hack/benchcompare
	$(GO) build -trimpath -o .bench/store-new ./cmd/store
	tmp=$$(mktemp -d) && git worktree add --detach "$$tmp/base" $${BASE:-249e9c0} >/dev/null && \
		(cd "$$tmp/base" && $(GO) build -trimpath -o "$(CURDIR)/.bench/store-base" ./cmd/store); rc=$$?; \
		git worktree remove --force "$$tmp/base"; rm -rf "$$tmp"; exit $$rc
	bash hack/cluster.sh down >/dev/null
	.bench/benchcompare -rounds $${ROUNDS:-5} -out .bench/bench-ab.json -variant "base=.bench/store-base" \
		-variant "new=.bench/store-new" -variant "h2c=.bench/store-new --peer-carrier=h2c"; rc=$$?; bash hack/cluster.sh down >/dev/null; exit $$rc

# RSS and file size of each node of a fresh local cluster after KEYS keys and
# every SAMPLE seconds of a SOAK (10m) of steady load; prints a table and the
# files' growth over the soak's second half. MODE=small (1M keys of 256 B,
# 50/50, the default), large (400 keys of 1 MiB) or deletes (1M keys, 30 %
# DELETEs); see scripts/memory-report.sh.
bench-memory: controlplane
	bash hack/cluster.sh down >/dev/null; rm -rf .cluster/data
	bash hack/cluster.sh up >/dev/null
	bash scripts/memory-report.sh; rc=$$?; bash hack/cluster.sh down >/dev/null; exit $$rc

clean: cluster-down kube-down
	rm -rf bin .cluster .bench .kube-local
