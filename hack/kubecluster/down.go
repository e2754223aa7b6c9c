package kubecluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Down stops everything Up started and puts the host back as host.json
// recorded it. It does not rely on any component cooperating (a crashed
// bring-up, a killed test): pods are killed through their cgroups, mounts
// are found in mountinfo, rules by their chains' names. It is a no-op on a
// machine with nothing to clean, and it returns an error listing whatever
// it could not remove.
func (c *Cluster) Down(ctx context.Context) error {
	begin := time.Now()
	h, recorded, err := loadHost(c.path("host.json"))
	if err != nil {
		return err
	}
	var errs []error
	keep := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	// Users of the apiserver first, so nothing restarts what goes next.
	for _, name := range []string{"kubelet", "kube-scheduler", "kube-controller-manager", "kube-proxy", "coredns"} {
		keep(c.stopComponent(name, 10*time.Second))
	}
	// Pods: SIGKILL everything in the kubelet's cgroups. Their data is test
	// data, and a graceful stop is what the e2e tests exercise, not this.
	keep(killPods())
	keep(c.stopComponent("containerd", 10*time.Second))
	// The shims outlive containerd by design; with their tasks dead they
	// are just processes of ours.
	for _, pid := range c.leftoverPids() {
		if filepath.Base(exeOf(pid)) != "kube-apiserver" && filepath.Base(exeOf(pid)) != "etcd" {
			keep(stopPid(pid, 2*time.Second))
		}
	}
	keep(c.stopComponent("kube-apiserver", 10*time.Second))
	keep(c.stopComponent("etcd", 10*time.Second))
	for _, pid := range c.leftoverPids() {
		keep(stopPid(pid, 2*time.Second))
	}

	keep(unmountAll(c.cfg.State))
	keep(deleteLinks(ctx, c.cfg.Bridge))
	keep(cleanIPTables(ctx))
	keep(removeCgroups(ctx))
	if recorded {
		restored, err := restoreSysctls(h.Sysctls)
		keep(err)
		if len(restored) > 0 {
			c.log.Info("restored sysctls", "changed", restored)
		}
		for _, p := range h.Missing {
			if err := os.RemoveAll(p); err != nil {
				keep(fmt.Errorf("remove %s: %w", p, err))
			}
		}
	}
	// Everything but the PKI and the logs: the next bring-up starts from an
	// empty etcd, fresh volumes and an empty containerd.
	ents, _ := os.ReadDir(c.cfg.State)
	for _, e := range ents {
		if e.Name() == "pki" || e.Name() == "logs" || e.Name() == "host.json" {
			continue
		}
		if err := os.RemoveAll(c.path(e.Name())); err != nil {
			keep(fmt.Errorf("remove %s: %w", c.path(e.Name()), err))
		}
	}
	if left := c.Leftovers(ctx); len(left) > 0 {
		keep(fmt.Errorf("left behind:\n  %s", strings.Join(left, "\n  ")))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("kube down: %w", err)
	}
	// Only a clean teardown forgets the host's original state: a failed one
	// is retried with it.
	if err := os.Remove(c.path("host.json")); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	c.log.Info("down", "took", time.Since(begin).Round(10*time.Millisecond).String())
	return nil
}

func exeOf(pid int) string {
	exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	return strings.TrimSuffix(exe, " (deleted)")
}

// killPods SIGKILLs every process in the kubelet's cgroups until none is
// left (a dying shim can still fork for a moment).
func killPods() error {
	deadline := time.Now().Add(20 * time.Second)
	for {
		var pids []int
		for _, cg := range podCgroups() {
			b, err := os.ReadFile(filepath.Join(cg, "cgroup.procs"))
			if err != nil {
				continue
			}
			for _, f := range strings.Fields(string(b)) {
				var pid int
				if _, err := fmt.Sscan(f, &pid); err == nil {
					pids = append(pids, pid)
				}
			}
		}
		if len(pids) == 0 {
			return nil
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pods: %d processes survive SIGKILL", len(pids))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Leftovers lists whatever of the cluster is still on the machine:
// processes, mounts (state folder, network namespaces), the bridge and its
// veths, iptables rules and chains, the kubelet's cgroups, and sysctls that
// differ from what the bring-up recorded. Empty after a clean Down.
func (c *Cluster) Leftovers(ctx context.Context) []string {
	var out []string
	for _, pid := range c.leftoverPids() {
		out = append(out, "process "+describePid(pid))
	}
	for _, mp := range mountsUnder(c.cfg.State) {
		out = append(out, "mount "+mp)
	}
	for _, l := range bridgeLinks(c.cfg.Bridge) {
		out = append(out, "link "+l)
	}
	for _, r := range IPTablesRules(ctx) {
		if ours(r) || strings.Contains(r, " "+c.cfg.Bridge+" ") {
			out = append(out, "rule "+r)
		}
	}
	for _, cg := range podCgroups() {
		out = append(out, "cgroup "+cg)
	}
	if h, ok, _ := loadHost(c.path("host.json")); ok {
		now := Sysctls()
		for k, v := range h.Sysctls {
			if now[k] != v {
				out = append(out, fmt.Sprintf("sysctl %s=%s (was %s)", k, now[k], v))
			}
		}
		for _, p := range h.Missing {
			if _, err := os.Lstat(p); err == nil {
				out = append(out, "path "+p)
			}
		}
	}
	return out
}
