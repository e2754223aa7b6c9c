// Package membership tells a node which nodes make up its cluster: the pods
// of its StatefulSet, <name>-0 … <name>-(replicas-1). A pod that restarts
// keeps its name and the count, so the member set (and the hash ring built
// on it) does not move; scaling the StatefulSet changes the count, so it
// does. Stable names, never IPs: a pod comes back with a new IP.
//
// The desired replica count (spec.replicas) is used rather than the pods
// that exist: a member being created owns its partitions from the start
// (stand-ins and repair cover it until it answers), and a member being
// scaled away stops owning at once, while it still runs and can hand its
// data over.
package membership

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// ErrNoReplicas means the StatefulSet asks for no pods.
var ErrNoReplicas = errors.New("statefulset has no replicas")

// Members returns the member set of StatefulSet name in namespace.
func Members(ctx context.Context, client kubernetes.Interface, namespace, name string) ([]string, error) {
	sts, err := client.AppsV1().StatefulSets(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("membership: get statefulset %s/%s: %w", namespace, name, err)
	}
	n := int32(1) // the API's default when spec.replicas is unset
	if sts.Spec.Replicas != nil {
		n = *sts.Spec.Replicas
	}
	if n < 1 {
		return nil, fmt.Errorf("membership: %s/%s: %w", namespace, name, ErrNoReplicas)
	}
	return Names(name, int(n)), nil
}

// Names lists the pod names of a StatefulSet with n replicas.
func Names(name string, n int) []string {
	out := make([]string, n)
	for i := range n {
		out[i] = fmt.Sprintf("%s-%d", name, i)
	}
	return out
}

// Follow polls the StatefulSet every interval until ctx ends and calls
// onChange with each member set that differs from the last one (starting
// from current). A failed poll is logged and retried; the last known set
// stays in force meanwhile.
func Follow(ctx context.Context, client kubernetes.Interface, namespace, name string, interval time.Duration, current []string, onChange func([]string), log *slog.Logger) {
	t := time.NewTicker(interval)
	defer t.Stop()
	failing := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, interval)
		members, err := Members(pctx, client, namespace, name)
		cancel()
		if err != nil {
			if !failing && ctx.Err() == nil {
				log.Warn("cannot read the member set; keeping the last one", "err", err)
			}
			failing = true
			continue
		}
		failing = false
		if !slices.Equal(members, current) {
			current = members
			onChange(slices.Clone(members))
		}
	}
}
