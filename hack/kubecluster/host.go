package kubecluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// watchedSysctls are the host settings a bring-up may change: the kubelet
// sets the first six at start (kernel panics and memory overcommit, for its
// OOM handling), the CNI bridge turns on forwarding for its gateway, and
// kube-proxy would touch the others if its conntrack and localhost flags
// allowed it. Each is recorded before anything starts and written back at
// teardown.
var watchedSysctls = []string{
	"kernel/panic",
	"kernel/panic_on_oops",
	"vm/overcommit_memory",
	"vm/panic_on_oom",
	"kernel/keys/root_maxkeys",
	"kernel/keys/root_maxbytes",
	"net/ipv4/ip_forward",
	"net/ipv4/conf/all/forwarding",
	"net/ipv4/conf/all/route_localnet",
	"net/ipv6/conf/all/forwarding",
	"net/bridge/bridge-nf-call-iptables",
	"net/bridge/bridge-nf-call-ip6tables",
	"net/netfilter/nf_conntrack_max",
	"net/netfilter/nf_conntrack_tcp_timeout_established",
	"net/netfilter/nf_conntrack_tcp_timeout_close_wait",
}

// hostPaths are folders outside the state folder that containerd, the CNI
// library or the kubelet create when they are missing, whatever they are
// configured with (containerd's shim sockets live under /run/containerd/s,
// libcni caches results in /var/lib/cni, network namespaces are mounted
// in /run/netns). Teardown removes those that did not exist before.
var hostPaths = []string{
	"/run/containerd",
	"/run/netns",
	"/var/lib/cni",
	"/var/log/pods",
	"/var/log/containers",
	"/var/lib/kubelet",
	"/var/lib/containerd",
	"/etc/cni",
	"/opt/cni",
	"/opt/containerd",
	"/run/nri",
}

// Sysctls reads the watched host settings (a missing one is left out).
func Sysctls() map[string]string {
	out := map[string]string{}
	for _, s := range watchedSysctls {
		b, err := os.ReadFile(filepath.Join("/proc/sys", s))
		if err != nil {
			continue
		}
		out[s] = strings.TrimSpace(string(b))
	}
	return out
}

// hostState is the machine as it was before a bring-up, kept in the state
// folder so that a teardown, even after a crashed bring-up or from another
// process, can put it back.
type hostState struct {
	Sysctls map[string]string `json:"sysctls"`
	Missing []string          `json:"missing_paths"`
	// The binary folders the bring-up ran from, so that a teardown finds
	// its processes even if the caches were rebuilt since.
	KubeBin         string `json:"kube_bin"`
	ControlPlaneBin string `json:"controlplane_bin"`
}

func recordHost(file string, cfg Config) (hostState, error) {
	h := hostState{Sysctls: Sysctls(), KubeBin: cfg.KubeBin, ControlPlaneBin: cfg.ControlPlaneBin}
	for _, p := range hostPaths {
		if _, err := os.Lstat(p); errors.Is(err, os.ErrNotExist) {
			h.Missing = append(h.Missing, p)
		}
	}
	b, err := json.MarshalIndent(h, "", "  ")
	if err != nil {
		return h, err
	}
	if err := os.WriteFile(file, b, 0o644); err != nil {
		return h, fmt.Errorf("record host state: %w", err)
	}
	return h, nil
}

func loadHost(file string) (hostState, bool, error) {
	var h hostState
	b, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		return h, false, nil
	}
	if err != nil {
		return h, false, fmt.Errorf("host state: %w", err)
	}
	if err := json.Unmarshal(b, &h); err != nil {
		return h, false, fmt.Errorf("host state %s: %w", file, err)
	}
	return h, true, nil
}

// restoreSysctls writes back every recorded value that changed and returns
// what it restored, for the log.
func restoreSysctls(want map[string]string) ([]string, error) {
	now := Sysctls()
	var restored []string
	var errs []error
	keys := make([]string, 0, len(want))
	for k := range want {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if now[k] == want[k] {
			continue
		}
		if err := os.WriteFile(filepath.Join("/proc/sys", k), []byte(want[k]), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("sysctl %s=%s: %w", k, want[k], err))
			continue
		}
		restored = append(restored, fmt.Sprintf("%s %s->%s", k, now[k], want[k]))
	}
	return restored, errors.Join(errs...)
}
