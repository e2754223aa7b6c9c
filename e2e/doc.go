// Package e2e holds the end-to-end tests of deploy/: they bring up a real
// single-node Kubernetes (hack/kubecluster) once, apply deploy/ exactly as
// the README's Kubernetes quick start does, disrupt the pods the ways an
// operator does (delete, force-delete, rollout restart, scale, eviction, a
// pod cut off from its peers) under a steady write load, check that every
// acknowledged write is still readable, and tear the cluster down, checking
// that nothing is left on the machine.
//
// The tests are behind the e2e build tag (they need root, and the binaries
// of make kube and make image); `make e2e` runs them, and so does
// `make test`.
package e2e
