package kubetest

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

// The real apiserver enforces optimistic concurrency on Leases: this is the
// property leader election rests on, so prove it end to end.
func TestControlPlane_Lease_CreateConflictReadBack(t *testing.T) {
	cp := Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	leases := cp.Client.CoordinationV1().Leases("default")

	created, err := leases.Create(ctx, &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: "store-leader"},
		Spec: coordinationv1.LeaseSpec{
			HolderIdentity:       ptr.To("store-0"),
			LeaseDurationSeconds: ptr.To[int32](15),
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create lease: %v", err)
	}

	// store-1 takes the lease with the current resourceVersion.
	taken := created.DeepCopy()
	taken.Spec.HolderIdentity = ptr.To("store-1")
	taken.Spec.LeaseTransitions = ptr.To[int32](1)
	updated, err := leases.Update(ctx, taken, metav1.UpdateOptions{})
	if err != nil {
		t.Fatalf("update with current resourceVersion: %v", err)
	}
	if updated.ResourceVersion == created.ResourceVersion {
		t.Fatal("resourceVersion did not change on update")
	}

	// store-2 still holds the old resourceVersion: the apiserver must refuse.
	stale := created.DeepCopy()
	stale.Spec.HolderIdentity = ptr.To("store-2")
	if _, err := leases.Update(ctx, stale, metav1.UpdateOptions{}); !apierrors.IsConflict(err) {
		t.Fatalf("update with stale resourceVersion: err = %v, want a conflict", err)
	}

	got, err := leases.Get(ctx, "store-leader", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("read back: %v", err)
	}
	if *got.Spec.HolderIdentity != "store-1" || *got.Spec.LeaseTransitions != 1 || got.ResourceVersion != updated.ResourceVersion {
		t.Fatalf("read back holder=%s transitions=%d rv=%s; want store-1, 1, %s",
			*got.Spec.HolderIdentity, *got.Spec.LeaseTransitions, got.ResourceVersion, updated.ResourceVersion)
	}
}

func TestStartControlPlane_MissingBinariesSaysRunMakeControlplane(t *testing.T) {
	t.Setenv(DirEnv, t.TempDir())
	_, err := StartControlPlane()
	if !errors.Is(err, ErrMissingBinaries) || !strings.Contains(err.Error(), "run make controlplane") {
		t.Fatalf("err = %v, want one that says to run make controlplane", err)
	}
}
