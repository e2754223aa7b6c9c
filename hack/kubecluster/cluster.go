// Package kubecluster brings up and tears down a real single-node
// Kubernetes on this machine, from binaries the project builds
// (hack/controlplane.sh, hack/kube.sh): etcd, kube-apiserver (RBAC + Node
// authorization, NodeRestriction, service accounts, its own PKI),
// kube-controller-manager, kube-scheduler, containerd with runc, the kubelet,
// kube-proxy in iptables mode, CoreDNS on the host and a default StorageClass
// of static local volumes (which honour fsGroup).
//
// Everything listens on loopback or on the node address, which is the pod
// bridge's own address (cni0, 10.88.0.1): pods reach each other, the
// apiserver through its Service, CoreDNS, and nothing beyond the bridge.
//
// What it guarantees: Down leaves the machine as Up found it — no process,
// mount, network namespace, bridge, veth, cgroup, iptables rule or chain of
// the cluster, and the sysctls the kubelet and the CNI bridge change set back
// — even after a crashed Up, because everything it needs is recorded in the
// state folder first. What it does not: it is one node for development and
// tests, not a hardened cluster (the kubelet authorizes every authenticated
// caller, etcd speaks plain HTTP on loopback), and it assumes it is the only
// Kubernetes on the machine (teardown removes every KUBE-* chain and kills
// every process in a /kubepods cgroup) and the only user of the bridge name
// and of the ports it binds.
package kubecluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// NodeName is the one node's name, in its certificates and in the local
// volumes' node affinity.
const NodeName = "statefulkv-node"

// Ports on loopback (etcd) and on the node address (the rest).
const (
	etcdClientPort = 12379
	etcdPeerPort   = 12380
	apiserverPort  = 6443
)

// Config says where things are. Zero values get the defaults in withDefaults.
type Config struct {
	// State is the folder for PKI, configs, logs, data (default .kube-local).
	State string
	// ControlPlaneBin holds kube-apiserver and etcd (hack/controlplane.sh --dir).
	ControlPlaneBin string
	// KubeBin holds what hack/kube.sh builds: kubelet, kube-proxy, containerd, ….
	KubeBin string
	// StoreImage is a docker-archive tarball (make image) to import into
	// containerd and tag as StoreImageRef; empty imports nothing.
	StoreImage string
	// StoreImageRef is the name deploy/statefulset.yaml uses.
	StoreImageRef string
	// Bridge is the pod bridge's name (default cni0).
	Bridge string
	// NodeIP is the bridge's address and the node's (default 10.88.0.1, in 10.88.0.0/16).
	NodeIP string
	// ServiceCIDR is the Service range (default 10.96.0.0/16).
	ServiceCIDR string
	// Runc and CNIBinDir are Debian's runc and CNI plugins.
	Runc, CNIBinDir string
	// Volumes is how many static local PersistentVolumes to make (default 8).
	Volumes int
	// Log receives one line per step.
	Log *slog.Logger
}

func (cfg Config) withDefaults() (Config, error) {
	if cfg.State == "" {
		cfg.State = ".kube-local"
	}
	abs, err := filepath.Abs(cfg.State)
	if err != nil {
		return cfg, fmt.Errorf("state folder: %w", err)
	}
	cfg.State = abs
	if cfg.Bridge == "" {
		cfg.Bridge = "cni0"
	}
	if cfg.NodeIP == "" {
		cfg.NodeIP = "10.88.0.1"
	}
	if cfg.ServiceCIDR == "" {
		cfg.ServiceCIDR = "10.96.0.0/16"
	}
	if cfg.Runc == "" {
		cfg.Runc = "/usr/sbin/runc"
	}
	if cfg.CNIBinDir == "" {
		cfg.CNIBinDir = "/usr/lib/cni"
	}
	if cfg.StoreImageRef == "" {
		cfg.StoreImageRef = "docker.io/statefulkv/store:latest"
	}
	if cfg.Volumes == 0 {
		cfg.Volumes = 8
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if net.ParseIP(cfg.NodeIP).To4() == nil {
		return cfg, fmt.Errorf("node IP %q is not an IPv4 address", cfg.NodeIP)
	}
	return cfg, nil
}

// Cluster is a brought-up (or to be torn down) local cluster.
type Cluster struct {
	cfg      Config
	log      *slog.Logger
	pki      pki
	pauseRef string
}

// New checks cfg and returns a handle; it starts nothing.
func New(cfg Config) (*Cluster, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	c := &Cluster{cfg: cfg, log: cfg.Log.With("component", "kubecluster"), pki: pki{dir: filepath.Join(cfg.State, "pki")}}
	// A teardown run with other binary folders (a rebuilt cache) must still
	// find the processes the bring-up started: it recorded its folders.
	if h, ok, _ := loadHost(c.path("host.json")); ok {
		if c.cfg.KubeBin == "" {
			c.cfg.KubeBin = h.KubeBin
		}
		if c.cfg.ControlPlaneBin == "" {
			c.cfg.ControlPlaneBin = h.ControlPlaneBin
		}
	}
	return c, nil
}

func (c *Cluster) path(elem ...string) string {
	return filepath.Join(append([]string{c.cfg.State}, elem...)...)
}

// Kubeconfig is the admin kubeconfig (system:masters).
func (c *Cluster) Kubeconfig() string { return c.kubeconfigPath("admin") }

// Kubectl is the kubectl built with the cluster.
func (c *Cluster) Kubectl() string { return filepath.Join(c.cfg.KubeBin, "kubectl") }

// Ctr is containerd's ctr, with CtrArgs to reach the cluster's containerd.
func (c *Cluster) Ctr() string { return filepath.Join(c.cfg.KubeBin, "ctr") }

// CtrArgs are the arguments that point ctr at the cluster's containerd and
// the kubelet's namespace.
func (c *Cluster) CtrArgs() []string { return []string{"-a", c.ContainerdSocket(), "-n", "k8s.io"} }

// ContainerdSocket is containerd's socket (ctr wants it absolute).
func (c *Cluster) ContainerdSocket() string { return c.path("containerd", "containerd.sock") }

// APIServerURL is where the apiserver listens.
func (c *Cluster) APIServerURL() string {
	return fmt.Sprintf("https://%s:%d", c.cfg.NodeIP, apiserverPort)
}

// State is the state folder.
func (c *Cluster) State() string { return c.cfg.State }

func (c *Cluster) kubeconfigPath(name string) string { return c.path(name + ".kubeconfig") }

func (c *Cluster) identities() []identity {
	node := net.ParseIP(c.cfg.NodeIP)
	_, svc, _ := net.ParseCIDR(c.cfg.ServiceCIDR)
	svcIP := make(net.IP, 4)
	copy(svcIP, svc.IP.To4())
	svcIP[3]++ // the kubernetes Service takes the range's first address
	return []identity{
		{file: "apiserver", cn: "kube-apiserver", server: true, ips: []net.IP{node, svcIP, net.IPv4(127, 0, 0, 1)},
			dns: []string{"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "localhost"}},
		{file: "apiserver-kubelet-client", cn: "kube-apiserver-kubelet-client", orgs: []string{"system:masters"}, client: true},
		{file: "admin", cn: "statefulkv-admin", orgs: []string{"system:masters"}, client: true},
		{file: "kube-controller-manager", cn: "system:kube-controller-manager", client: true},
		{file: "kube-scheduler", cn: "system:kube-scheduler", client: true},
		{file: "kube-proxy", cn: "system:kube-proxy", client: true},
		{file: "kubelet", cn: "system:node:" + NodeName, orgs: []string{"system:nodes"}, client: true},
		{file: "kubelet-serving", cn: "system:node:" + NodeName, server: true, ips: []net.IP{node}, dns: []string{NodeName}},
		{file: "coredns", cn: corednsUser, client: true},
	}
}

// Up brings the cluster up and returns once the node is Ready, CoreDNS
// answers and the images are imported. A cluster that is already up and
// healthy is left as it is; the leftovers of one that is not (a crash, a
// reboot) are torn down first.
func (c *Cluster) Up(ctx context.Context) error {
	begin := time.Now()
	if err := c.preflight(); err != nil {
		return err
	}
	_, recorded, _ := loadHost(c.path("host.json"))
	if !recorded && exists("/sys/class/net/"+c.cfg.Bridge) {
		return fmt.Errorf("the bridge %s exists but %s recorded no bring-up: another local cluster (another checkout's state folder?) is up; run its make kube-down, or ip link del %s if it is a leftover",
			c.cfg.Bridge, c.cfg.State, c.cfg.Bridge)
	}
	if recorded {
		if c.healthy(ctx) {
			c.log.Info("already up")
			return nil
		}
		c.log.Info("tearing down the leftovers of an earlier bring-up")
		if err := c.Down(ctx); err != nil {
			return fmt.Errorf("leftovers of an earlier bring-up: %w", err)
		}
	}
	for _, d := range []string{"logs", "run", "cni/net.d", "cni/ipam", "containerd", "kubelet", "pod-logs", "etcd", "volumes"} {
		if err := os.MkdirAll(c.path(d), 0o755); err != nil {
			return err
		}
	}
	h, err := recordHost(c.path("host.json"), c.cfg)
	if err != nil {
		return err
	}
	c.log.Debug("recorded host state", "sysctls", len(h.Sysctls), "missing", h.Missing)

	step := func(what string) { c.log.Info(what, "at", time.Since(begin).Round(10*time.Millisecond).String()) }

	if err := c.pki.ensure(c.identities()); err != nil {
		return err
	}
	for _, name := range []string{"admin", "kube-controller-manager", "kube-scheduler", "kube-proxy", "kubelet", "coredns"} {
		if err := c.writeKubeconfig(name); err != nil {
			return err
		}
	}
	ref, err := os.ReadFile(filepath.Join(c.cfg.KubeBin, "pause-image.ref"))
	if err != nil {
		return fmt.Errorf("pause image: %w (run make kube)", err)
	}
	c.pauseRef = strings.TrimSpace(string(ref))
	files := map[string]string{
		"containerd/config.toml":           c.containerdConfig(),
		"cni/net.d/10-statefulkv.conflist": c.cniConfig(),
		"kubelet/config.yaml":              c.kubeletConfig(),
		"kube-proxy.yaml":                  c.kubeProxyConfig(),
		"Corefile":                         c.corefile(),
	}
	for f, body := range files {
		if err := os.WriteFile(c.path(f), []byte(body), 0o644); err != nil {
			return err
		}
	}

	if err := c.createBridge(ctx); err != nil {
		return err
	}
	if err := c.addFence(ctx); err != nil {
		return err
	}
	step("bridge and fence ready")

	if err := c.startControlPlane(ctx); err != nil {
		return err
	}
	step("apiserver ready")
	if err := c.startNode(ctx); err != nil {
		return err
	}
	step("containerd ready, images imported")
	if err := c.applyObjects(ctx); err != nil {
		return err
	}
	if err := c.waitNode(ctx); err != nil {
		return err
	}
	step("node Ready, CoreDNS and kube-proxy serving")
	return nil
}

func (c *Cluster) preflight() error {
	if os.Geteuid() != 0 {
		return errors.New("the local cluster needs root (network namespaces, iptables, mounts)")
	}
	var missing []string
	for _, b := range []string{
		filepath.Join(c.cfg.ControlPlaneBin, "kube-apiserver"), filepath.Join(c.cfg.ControlPlaneBin, "etcd"),
		filepath.Join(c.cfg.KubeBin, "kubelet"), filepath.Join(c.cfg.KubeBin, "containerd"), filepath.Join(c.cfg.KubeBin, "coredns"),
		c.cfg.Runc, filepath.Join(c.cfg.CNIBinDir, "bridge"),
	} {
		if !exists(b) {
			missing = append(missing, b)
		}
	}
	for _, b := range []string{"iptables", "ip6tables", "ip"} {
		if _, err := exec.LookPath(b); err != nil {
			missing = append(missing, b)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing %s: run make kube (hack/kube.sh builds and installs them)", strings.Join(missing, ", "))
	}
	return nil
}

// healthy says whether a cluster from an earlier Up still serves.
func (c *Cluster) healthy(ctx context.Context) bool {
	cs, err := c.client()
	if err != nil {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if _, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx); err != nil {
		return false
	}
	return nodeReady(ctx, cs) == nil && httpOK(ctx, "http://127.0.0.1:10181/ready") && httpOK(ctx, "http://127.0.0.1:10256/healthz")
}

func httpOK(ctx context.Context, url string) bool {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return false
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}
