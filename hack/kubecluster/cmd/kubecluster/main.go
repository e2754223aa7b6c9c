// Command kubecluster is `make kube-up` and `make kube-down`: a real
// single-node Kubernetes on this machine (see package kubecluster), for
// trying deploy/ as a user would.
//
//	kubecluster -controlplane DIR -kube DIR [-state .kube-local] [-store-image bin/store-image.tar] up|down|leftovers
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/statefulkv/store/hack/kubecluster"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "kubecluster:", err)
		os.Exit(1)
	}
}

func run() error {
	var cfg kubecluster.Config
	flag.StringVar(&cfg.State, "state", ".kube-local", "folder for PKI, configs, logs and data")
	flag.StringVar(&cfg.ControlPlaneBin, "controlplane", "", "folder with kube-apiserver and etcd (hack/controlplane.sh --dir)")
	flag.StringVar(&cfg.KubeBin, "kube", "", "folder with the kubelet, containerd, … (hack/kube.sh --dir)")
	flag.StringVar(&cfg.StoreImage, "store-image", "", "docker-archive tarball of the store image to import (make image)")
	verbose := flag.Bool("v", false, "debug logs")
	flag.Parse()
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	cfg.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	c, err := kubecluster.New(cfg)
	if err != nil {
		return err
	}
	switch flag.Arg(0) {
	case "up":
		if err := c.Up(ctx); err != nil {
			return err
		}
		printUsage(c)
		return nil
	case "down":
		return c.Down(ctx)
	case "leftovers":
		left := c.Leftovers(ctx)
		if len(left) > 0 {
			return fmt.Errorf("left behind:\n  %s", strings.Join(left, "\n  "))
		}
		fmt.Println("nothing left behind")
		return nil
	default:
		return fmt.Errorf("usage: kubecluster [flags] up|down|leftovers")
	}
}

func printUsage(c *kubecluster.Cluster) {
	fmt.Printf(`
A local single-node Kubernetes is up (node %s, apiserver %s).
Logs and data are in %s; make kube-down removes it all.

  export KUBECONFIG=%s
  alias kubectl=%s      # the kubectl built with the cluster; any recent one works

Then the README's quick start, as is:

  kubectl create namespace store
  kubectl -n store create secret generic store-peer-token --from-literal=token="$(head -c 32 /dev/urandom | base64)"
  kubectl apply -n store -k deploy/
  kubectl -n store rollout status statefulset/store
  kubectl -n store port-forward svc/store 8080:8080 &
  curl -X PUT localhost:8080/v1/kv/hello -d '{"from":"port-forward"}'
`, kubecluster.NodeName, c.APIServerURL(), c.State(), c.Kubeconfig(), c.Kubectl())
}
