package kubecluster

import (
	"encoding/base64"
	"fmt"
	"os"
)

// The configuration files of containerd, the CNI network, the kubelet,
// kube-proxy and CoreDNS. Each setting that is not a default is there for a
// reason found on a real machine (../shared/REAL-CLUSTER.md), said beside it.

func (c *Cluster) containerdConfig() string {
	return fmt.Sprintf(`version = 3
root = %[1]q
state = %[2]q
# NRI would listen on /var/run/nri; the cluster does not use it.
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = %[3]q

[plugins.'io.containerd.internal.v1.opt']
  path = %[4]q

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    # Built from source by hack/kube.sh and imported at bring-up: never pulled.
    sandbox = %[5]q

[plugins.'io.containerd.cri.v1.runtime']
  # Root here lacks CAP_SYS_RESOURCE: without this every sandbox fails with
  # "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  # Network namespaces under the state folder, not /var/run/netns.
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        # The kubelet uses cgroupfs: there is no systemd to delegate to.
        SystemdCgroup = false
        BinaryName = %[6]q
        Root = %[7]q
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = [%[8]q]
    conf_dir = %[9]q

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
`, c.path("containerd/root"), c.path("containerd/state"), c.ContainerdSocket(), c.path("containerd/opt"),
		c.pauseRef, c.cfg.Runc, c.path("containerd/runc"), c.cfg.CNIBinDir, c.path("cni/net.d"))
}

// cniConfig is the pod network: the bridge made at bring-up, addresses from
// a /24 of it, no masquerade (pods never leave the bridge), hairpin so a
// pod reaches itself through its Service.
func (c *Cluster) cniConfig() string {
	return fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": "statefulkv",
  "plugins": [
    {
      "type": "bridge",
      "bridge": %[1]q,
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": %[2]q,
        "ranges": [[{"subnet": "10.88.0.0/16", "rangeStart": "10.88.1.2", "rangeEnd": "10.88.1.254", "gateway": %[3]q}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
`, c.cfg.Bridge, c.path("cni/ipam"), c.cfg.NodeIP)
}

func (c *Cluster) kubeletConfig() string {
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This kernel mounts cgroup v1 (hybrid); 1.35+ refuses it unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
# Pods never get the host's resolver: only the cluster DNS on the bridge.
resolvConf: ""
clusterDNS: [%[1]q]
clusterDomain: cluster.local
address: %[1]q
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
# Static serving certificate from the cluster's CA: no CSR signing needed.
tlsCertFile: %[2]q
tlsPrivateKeyFile: %[3]q
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: %[4]q}
authorization:
  mode: AlwaysAllow
containerRuntimeEndpoint: %[5]q
podLogsDir: %[6]q
failSwapOn: false
serializeImagePulls: false
# A development disk is often fuller than a node's; evict only when nearly full.
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "2%%"
  nodefs.inodesFree: "2%%"
  imagefs.available: "2%%"
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
`, c.cfg.NodeIP, c.pki.crt("kubelet-serving"), c.pki.key("kubelet-serving"), c.pki.crt("ca"),
		"unix://"+c.ContainerdSocket(), c.path("pod-logs"))
}

func (c *Cluster) kubeProxyConfig() string {
	return fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
hostnameOverride: %[1]q
clientConnection:
  kubeconfig: %[2]q
clusterCIDR: 10.88.0.0/16
bindAddress: %[3]q
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [%[4]q]
# Zeros leave the host's conntrack sysctls alone.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  # true would set net.ipv4.conf.all.route_localnet on the host.
  localhostNodePorts: false
`, NodeName, c.kubeconfigPath("kube-proxy"), c.cfg.NodeIP, c.cfg.NodeIP+"/32")
}

// corefile serves cluster.local from the apiserver and nothing else: there
// is no forward plugin, so no query ever leaves the machine.
func (c *Cluster) corefile() string {
	return fmt.Sprintf(`.:53 {
    bind %[1]s
    errors
    health 127.0.0.1:10054
    ready 127.0.0.1:10181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig %[2]s
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 30
}
`, c.cfg.NodeIP, c.kubeconfigPath("coredns"))
}

// writeKubeconfig writes a kubeconfig for one identity of the PKI.
func (c *Cluster) writeKubeconfig(name string) error {
	read := func(f string) (string, error) {
		b, err := os.ReadFile(f)
		return base64.StdEncoding.EncodeToString(b), err
	}
	ca, err := read(c.pki.crt("ca"))
	if err != nil {
		return fmt.Errorf("kubeconfig %s: %w", name, err)
	}
	crt, err := read(c.pki.crt(name))
	if err != nil {
		return fmt.Errorf("kubeconfig %s: %w", name, err)
	}
	key, err := read(c.pki.key(name))
	if err != nil {
		return fmt.Errorf("kubeconfig %s: %w", name, err)
	}
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: statefulkv-local
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %s
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: statefulkv-local
  context: {cluster: statefulkv-local, user: %s}
current-context: statefulkv-local
`, c.APIServerURL(), ca, name, crt, key, name)
	return os.WriteFile(c.kubeconfigPath(name), []byte(kc), 0o600)
}
