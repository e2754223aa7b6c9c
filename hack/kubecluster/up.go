package kubecluster

import (
	"archive/tar"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// corednsUser is CoreDNS's identity; its ClusterRole is made at bring-up.
const corednsUser = "statefulkv:coredns"

func (c *Cluster) client() (*kubernetes.Clientset, error) {
	rc, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig())
	if err != nil {
		return nil, fmt.Errorf("admin kubeconfig: %w", err)
	}
	rc.Timeout = 10 * time.Second
	return kubernetes.NewForConfig(rc)
}

// Client is an admin clientset for the cluster.
func (c *Cluster) Client() (*kubernetes.Clientset, error) { return c.client() }

// waitFor polls cond every 100 ms until it holds, ctx ends or timeout
// passes; the error names what was awaited, the last reason cond gave and
// the tail of the component's log.
func (c *Cluster) waitFor(ctx context.Context, timeout time.Duration, what, logName string, cond func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		if last = cond(ctx); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: not within %s: %w\n%s", what, timeout, last, c.logTail(logName, 20))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// logTail is the end of a component's log, for error messages.
func (c *Cluster) logTail(name string, lines int) string {
	if name == "" {
		return ""
	}
	b, err := os.ReadFile(c.path("logs", name+".log"))
	if err != nil {
		return ""
	}
	ls := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(ls) > lines {
		ls = ls[len(ls)-lines:]
	}
	return "--- " + name + ".log (tail) ---\n" + strings.Join(ls, "\n")
}

func (c *Cluster) startControlPlane(ctx context.Context) error {
	cp := c.cfg.ControlPlaneBin
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", etcdClientPort)
	if err := c.start("etcd", filepath.Join(cp, "etcd"),
		"--name", NodeName, "--data-dir", c.path("etcd"),
		"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", etcdPeerPort),
		"--initial-advertise-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", etcdPeerPort),
		"--initial-cluster", fmt.Sprintf("%s=http://127.0.0.1:%d", NodeName, etcdPeerPort),
		"--listen-metrics-urls", "", "--log-level", "warn",
		// Tests churn pods; a fast commit matters more than a fat WAL.
		"--unsafe-no-fsync",
	); err != nil {
		return err
	}
	if err := c.waitFor(ctx, 30*time.Second, "etcd healthy", "etcd", func(ctx context.Context) error {
		if !httpOK(ctx, etcdURL+"/health") {
			return errors.New("no healthy answer")
		}
		return nil
	}); err != nil {
		return err
	}

	p := c.pki
	if err := c.start("kube-apiserver", filepath.Join(cp, "kube-apiserver"),
		"--etcd-servers", etcdURL,
		"--bind-address", c.cfg.NodeIP, "--advertise-address", c.cfg.NodeIP, "--secure-port", strconv.Itoa(apiserverPort),
		"--tls-cert-file", p.crt("apiserver"), "--tls-private-key-file", p.key("apiserver"),
		"--client-ca-file", p.crt("ca"),
		"--service-cluster-ip-range", c.cfg.ServiceCIDR,
		"--authorization-mode", "Node,RBAC",
		"--enable-admission-plugins", "NodeRestriction",
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", filepath.Join(p.dir, "sa.pub"),
		"--service-account-signing-key-file", p.key("sa"),
		"--kubelet-client-certificate", p.crt("apiserver-kubelet-client"),
		"--kubelet-client-key", p.key("apiserver-kubelet-client"),
		"--kubelet-certificate-authority", p.crt("ca"),
		"--kubelet-preferred-address-types", "InternalIP",
		"--allow-privileged=true",
		"--profiling=false",
		"--cert-dir", c.path("run", "apiserver-certs"),
	); err != nil {
		return err
	}
	if err := c.waitFor(ctx, 60*time.Second, "kube-apiserver ready", "kube-apiserver", func(ctx context.Context) error {
		cs, err := c.client()
		if err != nil {
			return err
		}
		_, err = cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err
	}); err != nil {
		return err
	}

	kb := c.cfg.KubeBin
	if err := c.start("kube-controller-manager", filepath.Join(kb, "kube-controller-manager"),
		"--kubeconfig", c.kubeconfigPath("kube-controller-manager"),
		"--authentication-kubeconfig", c.kubeconfigPath("kube-controller-manager"),
		"--authorization-kubeconfig", c.kubeconfigPath("kube-controller-manager"),
		"--leader-elect=false",
		"--service-account-private-key-file", p.key("sa"),
		"--root-ca-file", p.crt("ca"),
		"--use-service-account-credentials",
		"--service-cluster-ip-range", c.cfg.ServiceCIDR,
		"--bind-address", "127.0.0.1", "--secure-port", "10257",
	); err != nil {
		return err
	}
	return c.start("kube-scheduler", filepath.Join(kb, "kube-scheduler"),
		"--kubeconfig", c.kubeconfigPath("kube-scheduler"),
		"--authentication-kubeconfig", c.kubeconfigPath("kube-scheduler"),
		"--authorization-kubeconfig", c.kubeconfigPath("kube-scheduler"),
		"--leader-elect=false",
		"--bind-address", "127.0.0.1", "--secure-port", "10259",
	)
}

func (c *Cluster) startNode(ctx context.Context) error {
	kb := c.cfg.KubeBin
	if err := c.start("containerd", filepath.Join(kb, "containerd"), "--config", c.path("containerd", "config.toml")); err != nil {
		return err
	}
	if err := c.waitFor(ctx, 30*time.Second, "containerd serving", "containerd", func(ctx context.Context) error {
		_, err := c.ctr(ctx, "version")
		return err
	}); err != nil {
		return err
	}
	if err := c.importImage(ctx, filepath.Join(kb, "pause-image.tar"), ""); err != nil {
		return err
	}
	if c.cfg.StoreImage != "" {
		if err := c.importImage(ctx, c.cfg.StoreImage, c.cfg.StoreImageRef); err != nil {
			return err
		}
	}
	if err := c.start("kubelet", filepath.Join(kb, "kubelet"),
		"--config", c.path("kubelet", "config.yaml"),
		"--kubeconfig", c.kubeconfigPath("kubelet"),
		"--root-dir", c.path("kubelet"),
		"--cert-dir", c.path("kubelet", "pki"),
		"--node-ip", c.cfg.NodeIP,
		"--hostname-override", NodeName,
	); err != nil {
		return err
	}
	if err := c.start("kube-proxy", filepath.Join(kb, "kube-proxy"), "--config", c.path("kube-proxy.yaml")); err != nil {
		return err
	}
	return c.start("coredns", filepath.Join(kb, "coredns"), "-conf", c.path("Corefile"))
}

func (c *Cluster) ctr(ctx context.Context, args ...string) (string, error) {
	return run(ctx, c.Ctr(), append(c.CtrArgs(), args...)...)
}

// importImage loads a docker-archive tarball into the kubelet's namespace
// and, when ref is set, names it ref too (make image tags it with the
// version; deploy/ asks for :latest).
func (c *Cluster) importImage(ctx context.Context, tarball, ref string) error {
	tags, err := archiveTags(tarball)
	if err != nil {
		return err
	}
	if _, err := c.ctr(ctx, "images", "import", tarball); err != nil {
		return fmt.Errorf("import %s: %w", tarball, err)
	}
	if ref == "" || slices.Contains(tags, ref) {
		return nil
	}
	if len(tags) == 0 {
		return fmt.Errorf("import %s: the archive names no image to tag as %s", tarball, ref)
	}
	if _, err := c.ctr(ctx, "images", "tag", "--force", tags[0], ref); err != nil {
		return fmt.Errorf("tag %s as %s: %w", tags[0], ref, err)
	}
	return nil
}

// archiveTags reads a docker-archive's manifest.json and returns its
// RepoTags as containerd names them (docker.io/… for a bare name).
func archiveTags(tarball string) ([]string, error) {
	f, err := os.Open(tarball)
	if err != nil {
		return nil, fmt.Errorf("image archive: %w", err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return nil, fmt.Errorf("image archive %s has no manifest.json", tarball)
		}
		if err != nil {
			return nil, fmt.Errorf("image archive %s: %w", tarball, err)
		}
		if hdr.Name != "manifest.json" {
			continue
		}
		var manifest []struct{ RepoTags []string }
		if err := json.NewDecoder(tr).Decode(&manifest); err != nil {
			return nil, fmt.Errorf("image archive %s: manifest.json: %w", tarball, err)
		}
		var out []string
		for _, m := range manifest {
			for _, t := range m.RepoTags {
				out = append(out, normalizeRef(t))
			}
		}
		return out, nil
	}
}

// normalizeRef spells a reference the way containerd stores it.
func normalizeRef(ref string) string {
	first, _, hasSlash := strings.Cut(ref, "/")
	if hasSlash && (strings.ContainsAny(first, ".:") || first == "localhost") {
		return ref
	}
	if !hasSlash {
		ref = "library/" + ref
	}
	return "docker.io/" + ref
}

// applyObjects makes the cluster-level objects a kubeadm cluster would
// have: CoreDNS's read access, and the default StorageClass with its
// static local volumes (the controller-manager's hostPath provisioner makes
// root-owned 0750 folders and the kubelet never applies fsGroup to hostPath;
// the local volume plugin does).
func (c *Cluster) applyObjects(ctx context.Context) error {
	cs, err := c.client()
	if err != nil {
		return err
	}
	create := func(what string, err error) error {
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create %s: %w", what, err)
		}
		return nil
	}
	role := &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: "statefulkv:coredns"},
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{""}, Resources: []string{"endpoints", "services", "pods", "namespaces"}, Verbs: []string{"list", "watch"}},
			{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"list", "watch"}},
		},
	}
	_, err = cs.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{})
	if err := create("CoreDNS ClusterRole", err); err != nil {
		return err
	}
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "statefulkv:coredns"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: role.Name},
		Subjects:   []rbacv1.Subject{{APIGroup: "rbac.authorization.k8s.io", Kind: "User", Name: corednsUser}},
	}
	_, err = cs.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{})
	if err := create("CoreDNS ClusterRoleBinding", err); err != nil {
		return err
	}

	wait := storagev1.VolumeBindingWaitForFirstConsumer
	sc := &storagev1.StorageClass{
		ObjectMeta:        metav1.ObjectMeta{Name: "local", Annotations: map[string]string{"storageclass.kubernetes.io/is-default-class": "true"}},
		Provisioner:       "kubernetes.io/no-provisioner",
		VolumeBindingMode: &wait,
	}
	_, err = cs.StorageV1().StorageClasses().Create(ctx, sc, metav1.CreateOptions{})
	if err := create("StorageClass local", err); err != nil {
		return err
	}
	for i := range c.cfg.Volumes {
		name := fmt.Sprintf("local-%d", i)
		dir := c.path("volumes", name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		pv := &corev1.PersistentVolume{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.PersistentVolumeSpec{
				Capacity:                      corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")},
				AccessModes:                   []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
				PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimRetain,
				StorageClassName:              sc.Name,
				PersistentVolumeSource:        corev1.PersistentVolumeSource{Local: &corev1.LocalVolumeSource{Path: dir}},
				NodeAffinity: &corev1.VolumeNodeAffinity{Required: &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{
					MatchExpressions: []corev1.NodeSelectorRequirement{{Key: "kubernetes.io/hostname", Operator: corev1.NodeSelectorOpIn, Values: []string{NodeName}}},
				}}}},
			},
		}
		_, err = cs.CoreV1().PersistentVolumes().Create(ctx, pv, metav1.CreateOptions{})
		if err := create("PersistentVolume "+name, err); err != nil {
			return err
		}
	}
	return nil
}

func nodeReady(ctx context.Context, cs *kubernetes.Clientset) error {
	n, err := cs.CoreV1().Nodes().Get(ctx, NodeName, metav1.GetOptions{})
	if err != nil {
		return err
	}
	for _, cond := range n.Status.Conditions {
		if cond.Type == corev1.NodeReady {
			if cond.Status == corev1.ConditionTrue {
				return nil
			}
			return fmt.Errorf("node %s: Ready=%s: %s", NodeName, cond.Status, cond.Message)
		}
	}
	return fmt.Errorf("node %s has no Ready condition yet", NodeName)
}

func (c *Cluster) waitNode(ctx context.Context) error {
	cs, err := c.client()
	if err != nil {
		return err
	}
	if err := c.waitFor(ctx, 60*time.Second, "node Ready", "kubelet", func(ctx context.Context) error {
		return nodeReady(ctx, cs)
	}); err != nil {
		return err
	}
	if err := c.waitFor(ctx, 30*time.Second, "CoreDNS ready", "coredns", func(ctx context.Context) error {
		if !httpOK(ctx, "http://127.0.0.1:10181/ready") {
			return errors.New("not ready")
		}
		return nil
	}); err != nil {
		return err
	}
	if err := c.waitFor(ctx, 30*time.Second, "kube-proxy healthy", "kube-proxy", func(ctx context.Context) error {
		if !httpOK(ctx, "http://127.0.0.1:10256/healthz") {
			return errors.New("not healthy")
		}
		return nil
	}); err != nil {
		return err
	}
	// Pods of a new namespace need its default ServiceAccount, which the
	// controller-manager makes; wait for it in "default" as a sign it runs.
	return c.waitFor(ctx, 30*time.Second, "controller-manager running (default ServiceAccount)", "kube-controller-manager", func(ctx context.Context) error {
		_, err := cs.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err
	})
}
