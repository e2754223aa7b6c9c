package kubecluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// start runs one component detached from the caller's session (so a ^C in
// the terminal that ran `make kube-up` does not stop the cluster), logging to
// logs/<name>.log, and records its pid in run/<name>.pid for teardown.
func (c *Cluster) start(name, bin string, args ...string) error {
	logf, err := os.OpenFile(c.path("logs", name+".log"), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "PATH="+c.searchPath())
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Dir = c.cfg.State
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	// Reap it when it exits while this process lives (the e2e tests), so a
	// dead component never lingers as a zombie that looks alive.
	go func() { _ = cmd.Wait() }()
	c.log.Debug("started", "component", name, "pid", cmd.Process.Pid)
	return os.WriteFile(c.path("run", name+".pid"), []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o644)
}

// searchPath puts the cluster's own binaries first: containerd finds its
// shim there, and the kubelet and kube-proxy find iptables in the system.
func (c *Cluster) searchPath() string {
	return strings.Join([]string{c.cfg.KubeBin, c.cfg.ControlPlaneBin,
		"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"}, ":")
}

// alive says whether pid is a live process (a zombie counts as dead).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the command name, which is in parentheses.
	if i := bytes.LastIndexByte(b, ')'); i >= 0 && i+2 < len(b) {
		return b[i+2] != 'Z'
	}
	return true
}

// stopPid sends SIGTERM, waits up to grace for the process to exit, then
// sends SIGKILL and waits again.
func stopPid(pid int, grace time.Duration) error {
	if !alive(pid) {
		return nil
	}
	_ = syscall.Kill(pid, syscall.SIGTERM)
	if waitDead([]int{pid}, grace) {
		return nil
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	if waitDead([]int{pid}, 10*time.Second) {
		return nil
	}
	return fmt.Errorf("pid %d survived SIGKILL for 10s", pid)
}

func waitDead(pids []int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		any := false
		for _, p := range pids {
			if alive(p) {
				any = true
				break
			}
		}
		if !any {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stopComponent stops the component named in run/<name>.pid, if that pid is
// still the binary we started (a pid can be reused after a reboot).
func (c *Cluster) stopComponent(name string, grace time.Duration) error {
	f := c.path("run", name+".pid")
	b, err := os.ReadFile(f)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("stop %s: %w", name, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err == nil && c.ours(pid) {
		if err := stopPid(pid, grace); err != nil {
			return fmt.Errorf("stop %s: %w", name, err)
		}
	}
	return os.Remove(f)
}

// ours says whether pid is a process of this cluster: one of its binaries,
// run in or for its state folder. The binary alone is not enough: the same
// cached kube-apiserver and etcd serve every envtest run on the machine
// (make test, another checkout's tests), and those are not ours to stop.
// Components run with the state folder as their working directory; the
// shims carry containerd's socket, inside it, on their command line.
func (c *Cluster) ours(pid int) bool {
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil {
		return false
	}
	exe = strings.TrimSuffix(exe, " (deleted)")
	binary := false
	for _, dir := range []string{c.cfg.KubeBin, c.cfg.ControlPlaneBin} {
		if dir != "" && filepath.Dir(exe) == filepath.Clean(dir) {
			binary = true
		}
	}
	if !binary {
		return false
	}
	state := filepath.Clean(c.cfg.State)
	if cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid)); err == nil && (cwd == state || strings.HasPrefix(cwd, state+"/")) {
		return true
	}
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return bytes.Contains(cmdline, []byte(state+"/"))
}

// inPodCgroup says whether pid runs in a pod: with the cgroupfs driver every
// container and sandbox lives below /kubepods.
func inPodCgroup(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return false
	}
	return bytes.Contains(b, []byte(":/kubepods"))
}

// leftoverPids lists the live processes of this cluster: its binaries
// (including containerd's shims) and everything in a pod.
func (c *Cluster) leftoverPids() []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	self := os.Getpid()
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		if (c.ours(pid) || inPodCgroup(pid)) && alive(pid) {
			out = append(out, pid)
		}
	}
	return out
}

func describePid(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	cmd := strings.TrimSpace(strings.ReplaceAll(string(b), "\x00", " "))
	if len(cmd) > 120 {
		cmd = cmd[:120] + "…"
	}
	return fmt.Sprintf("pid %d: %s", pid, cmd)
}

// podCgroups lists the kubelet's cgroup folders (every v1 hierarchy and the
// unified one), deepest first, so they can be removed in that order.
func podCgroups() []string {
	var out []string
	roots, _ := filepath.Glob("/sys/fs/cgroup/*/kubepods")
	if exists("/sys/fs/cgroup/kubepods") {
		roots = append(roots, "/sys/fs/cgroup/kubepods")
	}
	for _, r := range roots {
		_ = filepath.WalkDir(r, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				out = append(out, p)
			}
			return nil
		})
	}
	// Deeper paths first.
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out
}

func removeCgroups(ctx context.Context) error {
	var errs []error
	for attempt := 0; ; attempt++ {
		errs = errs[:0]
		for _, cg := range podCgroups() {
			if err := syscall.Rmdir(cg); err != nil && !errors.Is(err, syscall.ENOENT) {
				errs = append(errs, fmt.Errorf("rmdir %s: %w", cg, err))
			}
		}
		if len(errs) == 0 || attempt == 20 {
			return errors.Join(errs...)
		}
		// A cgroup stays busy for a moment after its last task died.
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}
