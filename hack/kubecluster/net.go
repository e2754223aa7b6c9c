package kubecluster

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
)

// ruleComment marks the iptables rules this package adds itself.
const ruleComment = "statefulkv-kube"

// run runs a host command and returns its combined output; the error names
// the command and carries the output, which is what a reader needs.
func run(ctx context.Context, name string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// createBridge makes the pod bridge with the node's address before anything
// starts: the apiserver, the kubelet and CoreDNS bind to that address, and
// the CNI bridge plugin adopts the existing bridge.
func (c *Cluster) createBridge(ctx context.Context) error {
	if _, err := os.Stat("/sys/class/net/" + c.cfg.Bridge); err != nil {
		if _, err := run(ctx, "ip", "link", "add", c.cfg.Bridge, "type", "bridge"); err != nil {
			return err
		}
	}
	if out, _ := run(ctx, "ip", "-o", "addr", "show", "dev", c.cfg.Bridge); !strings.Contains(out, " "+c.cfg.NodeIP+"/") {
		if _, err := run(ctx, "ip", "addr", "add", c.cfg.NodeIP+"/16", "dev", c.cfg.Bridge); err != nil {
			return err
		}
	}
	if _, err := run(ctx, "ip", "link", "set", c.cfg.Bridge, "up"); err != nil {
		return err
	}
	// Service VIPs are on the bridge too: the host then talks to them from
	// the node address, and a VIP without endpoints goes nowhere instead of
	// out of the default route.
	_, err := run(ctx, "ip", "route", "replace", c.cfg.ServiceCIDR, "dev", c.cfg.Bridge, "src", c.cfg.NodeIP)
	return err
}

// fenceRules keep pods on their bridge. Bridged traffic passes FORWARD
// (bridge-nf-call-iptables), and a Docker install sets its policy to DROP,
// so pod-to-pod traffic is accepted explicitly; every packet that would
// leave the bridge, or enter it from elsewhere, is dropped in mangle, which
// runs before the filter rules kube-proxy and the kubelet put first; and a
// pod may open connections to the host only at the node address (apiserver,
// DNS, kubelet); replies to the host's own connections pass.
func (c *Cluster) fenceRules() [][]string {
	br := c.cfg.Bridge
	cm := []string{"-m", "comment", "--comment", ruleComment}
	return [][]string{
		append([]string{"-t", "filter", "FORWARD", "-i", br, "-o", br}, append(cm, "-j", "ACCEPT")...),
		append([]string{"-t", "mangle", "FORWARD", "-i", br, "!", "-o", br}, append(cm, "-j", "DROP")...),
		append([]string{"-t", "mangle", "FORWARD", "!", "-i", br, "-o", br}, append(cm, "-j", "DROP")...),
		append([]string{"-t", "mangle", "INPUT", "-i", br, "!", "-d", c.cfg.NodeIP + "/32", "-m", "conntrack", "!", "--ctstate", "ESTABLISHED,RELATED"}, append(cm, "-j", "DROP")...),
	}
}

// addFence inserts the fence rules at the top of their chains unless there.
func (c *Cluster) addFence(ctx context.Context) error {
	for _, r := range c.fenceRules() {
		table, chain, spec := r[:2], r[2], r[3:]
		check := append(append(append([]string{"-w"}, table...), "-C", chain), spec...)
		if _, err := run(ctx, "iptables", check...); err == nil {
			continue
		}
		ins := append(append(append([]string{"-w"}, table...), "-I", chain, "1"), spec...)
		if _, err := run(ctx, "iptables", ins...); err != nil {
			return fmt.Errorf("fence: %w", err)
		}
	}
	return nil
}

var ipTables = []string{"filter", "nat", "mangle", "raw"}

// ours says whether an iptables chain or rule was made by this cluster:
// kube-proxy's and the kubelet's KUBE-* chains, the CNI plugins' CNI-*
// chains, and the fence.
func ours(s string) bool {
	return strings.Contains(s, "KUBE-") || strings.Contains(s, "CNI-") || strings.Contains(s, ruleComment)
}

// cleanIPTables removes, for IPv4 and IPv6, every rule that jumps to a chain
// of ours or carries our comment, then flushes and deletes our chains.
func cleanIPTables(ctx context.Context) error {
	var errs []error
	for _, bin := range []string{"iptables", "ip6tables"} {
		if _, err := exec.LookPath(bin); err != nil {
			continue // never installed: nothing can have been added
		}
		for _, table := range ipTables {
			out, err := run(ctx, bin, "-w", "-t", table, "-S")
			if err != nil {
				continue // a table this kernel does not have
			}
			var chains []string
			for _, line := range strings.Split(out, "\n") {
				f := shellFields(line)
				if len(f) < 2 {
					continue
				}
				switch {
				case f[0] == "-N" && ours(f[1]):
					chains = append(chains, f[1])
				case f[0] == "-A" && !ours(f[1]) && ours(line):
					if _, err := run(ctx, bin, append([]string{"-w", "-t", table, "-D"}, f[1:]...)...); err != nil {
						errs = append(errs, err)
					}
				}
			}
			for _, ch := range chains {
				if _, err := run(ctx, bin, "-w", "-t", table, "-F", ch); err != nil {
					errs = append(errs, err)
				}
			}
			for _, ch := range chains {
				if _, err := run(ctx, bin, "-w", "-t", table, "-X", ch); err != nil {
					errs = append(errs, err)
				}
			}
		}
	}
	return errors.Join(errs...)
}

// IPTablesRules lists every rule and chain, IPv4 and IPv6, one line each
// prefixed with the family and table, for a before/after comparison.
func IPTablesRules(ctx context.Context) []string {
	var out []string
	for _, bin := range []string{"iptables", "ip6tables"} {
		if _, err := exec.LookPath(bin); err != nil {
			continue
		}
		for _, table := range ipTables {
			s, err := run(ctx, bin, "-w", "-t", table, "-S")
			if err != nil {
				continue
			}
			for _, line := range strings.Split(strings.TrimSpace(s), "\n") {
				// Built-in chains' policies exist as soon as iptables-nft
				// touches a table; they say nothing about what we left.
				if line == "" || (strings.HasPrefix(line, "-P ") && strings.HasSuffix(line, " ACCEPT")) {
					continue
				}
				out = append(out, bin+" "+table+" "+line)
			}
		}
	}
	sort.Strings(out)
	return out
}

// shellFields splits an `iptables -S` line into arguments, honouring the
// double quotes it puts around comments with spaces.
func shellFields(s string) []string {
	var out []string
	var cur strings.Builder
	inQuote, have := false, false
	for i := 0; i < len(s); i++ {
		ch := s[i]
		switch {
		case ch == '\\' && inQuote && i+1 < len(s):
			i++
			cur.WriteByte(s[i])
		case ch == '"':
			inQuote = !inQuote
			have = true
		case (ch == ' ' || ch == '\t') && !inQuote:
			if have {
				out = append(out, cur.String())
				cur.Reset()
				have = false
			}
		default:
			cur.WriteByte(ch)
			have = true
		}
	}
	if have {
		out = append(out, cur.String())
	}
	return out
}

// bridgeLinks lists the bridge and every interface enslaved to it (the
// host ends of the pods' veth pairs).
func bridgeLinks(bridge string) []string {
	var out []string
	if _, err := os.Stat("/sys/class/net/" + bridge); err == nil {
		out = append(out, bridge)
	}
	ents, _ := os.ReadDir("/sys/class/net")
	for _, e := range ents {
		if dst, err := os.Readlink(filepath.Join("/sys/class/net", e.Name(), "master")); err == nil && filepath.Base(dst) == bridge {
			out = append(out, e.Name())
		}
	}
	return out
}

// deleteLinks removes the veths on the bridge, then the bridge.
func deleteLinks(ctx context.Context, bridge string) error {
	var errs []error
	links := bridgeLinks(bridge)
	for i := len(links) - 1; i >= 0; i-- {
		if _, err := run(ctx, "ip", "link", "del", links[i]); err != nil && exists("/sys/class/net/"+links[i]) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// mountsUnder lists mount points at or below any of the prefixes, deepest
// first, from /proc/self/mountinfo.
func mountsUnder(prefixes ...string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		for _, p := range prefixes {
			if mp == p || strings.HasPrefix(mp, strings.TrimSuffix(p, "/")+"/") {
				out = append(out, mp)
				break
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%03o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmountAll unmounts everything below the prefixes, deepest first; a mount
// still busy is detached (MNT_DETACH) so that teardown always finishes.
func unmountAll(prefixes ...string) error {
	var errs []error
	for range 3 { // mounts can be stacked on one point
		mps := mountsUnder(prefixes...)
		if len(mps) == 0 {
			return nil
		}
		for _, mp := range mps {
			if err := syscall.Unmount(mp, 0); err != nil {
				if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
					errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
				}
			}
		}
	}
	if mps := mountsUnder(prefixes...); len(mps) > 0 {
		errs = append(errs, fmt.Errorf("still mounted: %s", strings.Join(mps, ", ")))
	}
	return errors.Join(errs...)
}
