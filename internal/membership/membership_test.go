package membership

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"slices"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func sts(replicas int32) *appsv1.StatefulSet {
	return &appsv1.StatefulSet{ObjectMeta: metav1.ObjectMeta{Name: "store", Namespace: "ns"}, Spec: appsv1.StatefulSetSpec{Replicas: &replicas}}
}

func TestMembers(t *testing.T) {
	for _, tc := range []struct {
		replicas int32
		want     []string
		err      error
	}{
		{3, []string{"store-0", "store-1", "store-2"}, nil},
		{1, []string{"store-0"}, nil},
		{0, nil, ErrNoReplicas},
	} {
		got, err := Members(context.Background(), fake.NewClientset(sts(tc.replicas)), "ns", "store")
		if !errors.Is(err, tc.err) || !slices.Equal(got, tc.want) {
			t.Errorf("replicas %d: %v, %v; want %v, %v", tc.replicas, got, err, tc.want, tc.err)
		}
	}
	if _, err := Members(context.Background(), fake.NewClientset(), "ns", "store"); err == nil {
		t.Error("a missing StatefulSet must be an error")
	}
}

func TestFollow_ReportsScaleOnce(t *testing.T) {
	client := fake.NewClientset(sts(3))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	changes := make(chan []string, 10)
	go Follow(ctx, client, "ns", "store", 10*time.Millisecond, Names("store", 3), func(m []string) { changes <- m }, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if _, err := client.AppsV1().StatefulSets("ns").Update(ctx, sts(5), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	select {
	case got := <-changes:
		if !slices.Equal(got, Names("store", 5)) {
			t.Fatalf("change to %v, want store-0..4", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("scale to 5 not reported")
	}
	select {
	case got := <-changes:
		t.Fatalf("reported again without a change: %v", got)
	case <-time.After(100 * time.Millisecond):
	}
}
