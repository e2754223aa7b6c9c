package election

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	rl "k8s.io/client-go/tools/leaderelection/resourcelock"
)

const ns = "default"

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// apiserver is a fake clientset whose Lease calls can be made to fail: all
// of them (down), or the writes of one candidate (cutOff), which is how a
// leader partitioned from the apiserver looks to the others.
type apiserver struct {
	*fake.Clientset
	down   atomic.Bool
	cutOff atomic.Value // string: identity whose Lease writes fail
	// crashed: the identity of a holder that has died. Its renewals fail,
	// and so does the release it could no longer send; only a takeover
	// by another node changes the Lease.
	crashed atomic.Value
	// onUpdate, if set, sees the holder of every Lease update that is let
	// through, before it is applied.
	onUpdate atomic.Pointer[func(holder string)]
}

func newAPIServer() *apiserver {
	a := &apiserver{Clientset: fake.NewClientset()}
	a.cutOff.Store("")
	a.crashed.Store("")
	react := func(action k8stesting.Action) (bool, runtime.Object, error) {
		if a.down.Load() {
			return true, nil, errors.New("apiserver unavailable")
		}
		if w, ok := action.(k8stesting.UpdateAction); ok {
			l := w.GetObject().(*coordinationv1.Lease)
			h := ""
			if l.Spec.HolderIdentity != nil {
				h = *l.Spec.HolderIdentity
			}
			if id := a.cutOff.Load().(string); id != "" && h == id {
				return true, nil, errors.New("partitioned from the apiserver")
			}
			if id := a.crashed.Load().(string); id != "" && (h == id || (h == "" && a.storedHolder() == id)) {
				return true, nil, errors.New("the holder has crashed")
			}
			if f := a.onUpdate.Load(); f != nil {
				(*f)(h)
			}
		}
		return false, nil, nil
	}
	a.PrependReactor("*", "leases", react)
	return a
}

// storedHolder is the holder of the Lease as stored now.
func (a *apiserver) storedHolder() string {
	obj, err := a.Tracker().Get(coordinationv1.SchemeGroupVersion.WithResource("leases"), ns, DefaultLeaseName)
	if err != nil {
		return ""
	}
	if h := obj.(*coordinationv1.Lease).Spec.HolderIdentity; h != nil {
		return *h
	}
	return ""
}

func newElector(t *testing.T, api *apiserver, id string) *Elector {
	t.Helper()
	e, err := New(Config{Client: api, Namespace: ns, Identity: id, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// leaderAndFollower starts store-0, which wins the empty Lease, then store-1,
// and lets both settle. Call inside a synctest bubble.
func leaderAndFollower(t *testing.T, api *apiserver) (a, b *Elector, stopA, stopB func()) {
	t.Helper()
	a, b = newElector(t, api, "store-0"), newElector(t, api, "store-1")
	stopA = run(a)
	time.Sleep(time.Second)
	stopB = run(b)
	time.Sleep(3 * DefaultRetryPeriod)
	return a, b, stopA, stopB
}

// run starts e.Run and returns a stop func that cancels and waits.
func run(e *Elector) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = e.Run(ctx); close(done) }()
	return func() { e.Stop(); cancel(); <-done }
}

func holder(t *testing.T, api *apiserver) (string, int32) {
	t.Helper()
	l, err := api.CoordinationV1().Leases(ns).Get(context.Background(), DefaultLeaseName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	h := ""
	if l.Spec.HolderIdentity != nil {
		h = *l.Spec.HolderIdentity
	}
	return h, *l.Spec.LeaseTransitions
}

func TestElector_OneLeaderWithEpochOthersFollow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		api := newAPIServer()
		a, b, stopA, stopB := leaderAndFollower(t, api)

		if _, open := a.WriteGate(); !open {
			t.Fatal("first candidate is not leader")
		}
		if _, open := b.WriteGate(); open {
			t.Fatal("second candidate's gate is open too")
		}
		for _, e := range []*Elector{a, b} {
			if st := e.Status(); st.Leader != "store-0" || st.Epoch != 1 {
				t.Fatalf("%s sees %+v, want store-0 at epoch 1", e.Identity(), st)
			}
		}
		if h, _ := holder(t, api); h != "store-0" {
			t.Fatalf("Lease holder = %q", h)
		}
		stopB()
		stopA()
	})
}

// The gate closes exactly RenewDeadline after the start of the last
// successful renewal, without waiting for client-go to give up.
func TestElector_WriteGate_ClosesAtRenewDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		api := newAPIServer()
		var lastRenew atomic.Int64
		api.PrependReactor("update", "leases", func(k8stesting.Action) (bool, runtime.Object, error) {
			if !api.down.Load() {
				lastRenew.Store(time.Now().UnixNano())
			}
			return false, nil, nil
		})
		a := newElector(t, api, "store-0")
		stop := run(a)
		defer stop()
		time.Sleep(5 * DefaultRetryPeriod)
		if _, open := a.WriteGate(); !open {
			t.Fatal("not leader")
		}
		api.down.Store(true)
		renewed := time.Unix(0, lastRenew.Load())
		time.Sleep(time.Until(renewed.Add(DefaultRenewDeadline - time.Millisecond)))
		if _, open := a.WriteGate(); !open {
			t.Fatal("gate closed before the renew deadline")
		}
		time.Sleep(time.Millisecond)
		if _, open := a.WriteGate(); open {
			t.Fatalf("gate still open at last renew + renew deadline")
		}
		if a.Status().IsLeader {
			t.Fatal("Status says leader with the gate closed")
		}
	})
}

// A leader that loses the Lease keeps campaigning (no zombie standby) and
// wins again, under a higher epoch, when the other leader goes away.
func TestElector_LostLease_CampaignsAgainWithHigherEpoch(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		api := newAPIServer()
		a, b, stopA, stopB := leaderAndFollower(t, api)

		// a's renewals fail. (The fake clientset does not check
		// resourceVersions, so this models a's writes failing, not a full
		// partition: when a gives up it may release the Lease, and b takes
		// it then or when the lease runs out.)
		api.cutOff.Store("store-0")
		time.Sleep(DefaultRenewDeadline + time.Second)
		if _, open := a.WriteGate(); open {
			t.Fatal("a still open after losing the apiserver")
		}
		time.Sleep(DefaultLeaseDuration + 3*DefaultRetryPeriod)
		api.cutOff.Store("")
		epochB, openB := b.WriteGate()
		if !openB || epochB != 2 {
			t.Fatalf("b: epoch %d open %v, want leader at epoch 2", epochB, openB)
		}
		if _, open := a.WriteGate(); open {
			t.Fatal("two open gates")
		}
		// b shuts down and releases; a must pick the Lease up again.
		stopB()
		if h, _ := holder(t, api); h != "" {
			t.Fatalf("after release holder = %q, want empty", h)
		}
		time.Sleep(3 * DefaultRetryPeriod)
		if epoch, open := a.WriteGate(); !open || epoch != 3 {
			t.Fatalf("a after b left: epoch %d open %v, want leader at epoch 3", epoch, open)
		}
		stopA()
	})
}

func TestElector_ObserveHigherEpoch_StepsDownAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		api := newAPIServer()
		a := newElector(t, api, "store-0")
		stop := run(a)
		defer stop()
		time.Sleep(2 * DefaultRetryPeriod)
		epoch, open := a.WriteGate()
		if !open {
			t.Fatal("not leader")
		}
		a.ObserveEpoch(epoch) // its own epoch: nothing happens
		if _, open := a.WriteGate(); !open {
			t.Fatal("stepped down on its own epoch")
		}
		a.ObserveEpoch(epoch + 1)
		if _, open := a.WriteGate(); open {
			t.Fatal("gate open after a higher epoch was observed")
		}
		// It keeps campaigning; with nobody else around it leads again, but
		// only under a new term, never the one it stepped down from.
		time.Sleep(3 * DefaultRetryPeriod)
		if e2, open := a.WriteGate(); !open || e2 <= epoch {
			t.Fatalf("after stepping down: epoch %d open %v, want a new term above %d", e2, open, epoch)
		}
	})
}

func TestElector_StopReleasesLease(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		api := newAPIServer()
		a := newElector(t, api, "store-0")
		stop := run(a)
		time.Sleep(2 * DefaultRetryPeriod)
		stop()
		if h, _ := holder(t, api); h != "" {
			t.Fatalf("holder after shutdown = %q, want released", h)
		}
		if _, open := a.WriteGate(); open {
			t.Fatal("gate open after Stop")
		}
	})
}

func TestNew_InvalidConfig(t *testing.T) {
	api := newAPIServer()
	base := Config{Client: api, Namespace: ns, Identity: "store-0"}
	tests := []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"no namespace", func(c *Config) { c.Namespace = "" }, "POD_NAMESPACE"},
		{"no identity", func(c *Config) { c.Identity = "" }, "POD_NAME"},
		{"renew >= lease", func(c *Config) { c.LeaseDuration, c.RenewDeadline = 10*time.Second, 10*time.Second }, "--renew-deadline"},
		{"retry too close to renew", func(c *Config) { c.RenewDeadline, c.RetryPeriod = 3*time.Second, 3*time.Second }, "--retry-period"},
		{"sub-second lease", func(c *Config) { c.LeaseDuration = 1500 * time.Millisecond }, "--lease-duration"},
		{"negative retry", func(c *Config) { c.RetryPeriod = -time.Second }, "--retry-period"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := base
			tt.mod(&c)
			_, err := New(c)
			if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want ErrInvalidConfig naming %s", err, tt.want)
			}
		})
	}
	if _, err := New(base); err != nil {
		t.Fatalf("defaults rejected: %v", err)
	}
}

// A node that has admitted term 7 and finds no Lease (deleted, or a fresh
// control plane) starts the new term above it, not at 1.
func TestElector_CreatedLeaseStartsAboveTheEpochFloor(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		api := newAPIServer()
		e, err := New(Config{Client: api, Namespace: ns, Identity: "store-0", Logger: quiet(), EpochFloor: func() uint64 { return 7 }})
		if err != nil {
			t.Fatal(err)
		}
		stop := run(e)
		defer stop()
		time.Sleep(2 * DefaultRetryPeriod)
		if epoch, open := e.WriteGate(); !open || epoch != 8 {
			t.Fatalf("epoch %d open %v, want leader at epoch 8", epoch, open)
		}
	})
}

// A follower nudged after the leader released the Lease takes over at once,
// not at its next retry period.
func TestElector_Nudge_TakesAReleasedLeaseAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		api := newAPIServer()
		a, b, stopA, stopB := leaderAndFollower(t, api)
		defer stopB()
		if _, open := a.WriteGate(); !open {
			t.Fatal("a is not leader")
		}
		stopA() // releases the Lease
		released := time.Now()
		b.Nudge()
		synctest.Wait()
		if _, open := b.WriteGate(); !open {
			t.Fatalf("b did not take the released Lease at once (%s after the release)", time.Since(released))
		}
		if time.Since(released) != 0 {
			t.Fatalf("takeover took %s of (fake) time, want none", time.Since(released))
		}
	})
}

func TestElector_HintLeader_AdoptsOnlyNewerTerms(t *testing.T) {
	e := newElector(t, newAPIServer(), "store-0")
	e.HintLeader("store-2", 4)
	if id, ep := e.Leader(); id != "store-2" || ep != 4 {
		t.Fatalf("after a hint: %s %d", id, ep)
	}
	e.HintLeader("store-1", 3) // older: ignored
	e.HintLeader("store-0", 9) // itself: only the Lease makes it leader
	if id, ep := e.Leader(); id != "store-2" || ep != 4 {
		t.Fatalf("after stale hints: %s %d", id, ep)
	}
	if _, open := e.WriteGate(); open {
		t.Fatal("a hint opened the write gate")
	}
}

func TestElector_OnElected_CalledWithTheNewTerm(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		got := make(chan uint64, 1)
		e, err := New(Config{Client: newAPIServer(), Namespace: ns, Identity: "store-0", Logger: quiet(), OnElected: func(ep uint64) { got <- ep }})
		if err != nil {
			t.Fatal(err)
		}
		stop := run(e)
		defer stop()
		time.Sleep(DefaultRetryPeriod)
		select {
		case ep := <-got:
			if ep != 1 {
				t.Fatalf("OnElected(%d), want 1", ep)
			}
		default:
			t.Fatal("OnElected not called")
		}
	})
}

// client-go's release re-reads the Lease but decides from the record it saw
// before; after a long pause (SIGSTOP) that record can be stale and the
// release would clear a successor's Lease. The lock refuses a release unless
// the fresh read names this node.
func TestObservingLock_ReleaseOnlyWhatTheFreshReadSaysWeHold(t *testing.T) {
	ctx := context.Background()
	for _, tt := range []struct {
		holder  string
		release bool
	}{
		{"store-1", false}, // a successor holds it: refuse
		{"store-0", true},  // still ours: release
	} {
		api := newAPIServer()
		if _, err := api.CoordinationV1().Leases(ns).Create(ctx, &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: DefaultLeaseName, Namespace: ns},
			Spec:       coordinationv1.LeaseSpec{HolderIdentity: &tt.holder, LeaseTransitions: new(int32)},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		e := newElector(t, api, "store-0")
		if _, _, err := e.lock.Get(ctx); err != nil {
			t.Fatal(err)
		}
		err := e.lock.Update(ctx, rl.LeaderElectionRecord{LeaseDurationSeconds: 1})
		if tt.release != (err == nil) || (err != nil && !errors.Is(err, errNotHolder)) {
			t.Fatalf("Lease held by %s: release err = %v, want released=%v", tt.holder, err, tt.release)
		}
		want := tt.holder
		if tt.release {
			want = ""
		}
		if h, _ := holder(t, api); h != want {
			t.Fatalf("holder after the release attempt = %q, want %q", h, want)
		}
	}
}

// A leader that stops renewing (crashed, or cut off from the apiserver) is
// replaced the moment its Lease expires by the follower's own observation,
// the same rule client-go applies, instead of at the follower's next
// jittered poll: never earlier, and not later.
func TestElector_SilentLeader_TakenOverTheMomentItsLeaseExpires(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		api := newAPIServer()
		a, b, stopA, stopB := leaderAndFollower(t, api)
		defer stopB()
		defer stopA()
		if _, open := a.WriteGate(); !open {
			t.Fatal("a is not leader")
		}
		expiry := crashAndExpiry(t, api, b, "store-0", DefaultLeaseDuration)
		took := awaitGate(t, b, expiry.Add(6*DefaultRetryPeriod), "b never took over")
		if took.Before(expiry) {
			t.Fatalf("b took over %s before the Lease expired by its own observation", expiry.Sub(took))
		}
		if late := took.Sub(expiry); late > time.Millisecond {
			t.Fatalf("b took over %s after the Lease expired, want at once", late)
		}
		if h, transitions := holder(t, api); h != "store-1" || transitions != 1 {
			t.Fatalf("Lease held by %q with %d transitions, want store-1 with 1", h, transitions)
		}
		if epoch, _ := b.WriteGate(); epoch != 2 {
			t.Fatalf("b leads epoch %d, want 2", epoch)
		}
		if _, open := a.WriteGate(); open {
			t.Fatal("a's gate is still open")
		}
		if n := testutil.ToFloat64(b.metrics.expiryTakeovers); n != 1 {
			t.Fatalf("b counted %v expiry takeovers, want 1", n)
		}
		// b keeps the Lease: client-go's next campaign renews it.
		time.Sleep(3 * DefaultRetryPeriod)
		if _, open := b.WriteGate(); !open {
			t.Fatal("b lost the Lease it took over")
		}
	})
}

// A node configured with a shorter lease than the holder wrote (mid rolling
// change of the timings) waits out the holder's lease, as client-go does:
// the holder's gate may be open until then.
func TestElector_SilentLeader_HoldersLongerLeaseIsWaitedOut(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		api := newAPIServer()
		a := newElector(t, api, "store-0") // 15 s lease
		b, err := New(Config{Client: api, Namespace: ns, Identity: "store-1", Logger: quiet(),
			LeaseDuration: 5 * time.Second, RenewDeadline: 4 * time.Second, RetryPeriod: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		stopA := run(a)
		defer stopA()
		time.Sleep(time.Second)
		stopB := run(b)
		defer stopB()
		time.Sleep(3 * DefaultRetryPeriod)
		expiry := crashAndExpiry(t, api, b, "store-0", DefaultLeaseDuration) // the holder's lease
		if took := awaitGate(t, b, expiry.Add(time.Minute), "b never took over"); took.Before(expiry) {
			t.Fatalf("b took over %s before the holder's 15 s lease ran out (its own is 5 s)", expiry.Sub(took))
		}
	})
}

// A takeover the apiserver refuses (down at the moment of expiry) is tried
// again every retry period, not after a whole new lease.
func TestElector_TakeoverWhileAPIServerDown_RetriedEachRetryPeriod(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		api := newAPIServer()
		_, b, stopA, stopB := leaderAndFollower(t, api)
		defer stopB()
		defer stopA()
		expiry := crashAndExpiry(t, api, b, "store-0", DefaultLeaseDuration)
		time.Sleep(time.Until(expiry) - time.Millisecond)
		api.down.Store(true)
		time.Sleep(3 * DefaultRetryPeriod)
		back := time.Now()
		api.down.Store(false)
		took := awaitGate(t, b, back.Add(DefaultLeaseDuration), "b did not take over within a lease of the apiserver's return")
		if d := took.Sub(back); d > DefaultRetryPeriod {
			t.Fatalf("b took over %s after the apiserver came back, want within one retry period (%s)", d, DefaultRetryPeriod)
		}
	})
}

// crashAndExpiry makes a's writes fail as if it had crashed, lets b poll
// the Lease, and returns when b counts a's Lease as expired by its own
// observation (of a's last renewal). Call inside a synctest bubble.
func crashAndExpiry(t *testing.T, api *apiserver, b *Elector, crashed string, lease time.Duration) time.Time {
	t.Helper()
	api.crashed.Store(crashed)         // neither renews nor releases from now on
	time.Sleep(3 * DefaultRetryPeriod) // b has polled since the last renewal
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.changedAt.Add(lease)
}

// awaitGate returns the (bubble) time at which e's write gate opened,
// failing the test if it is still shut at giveUp.
func awaitGate(t *testing.T, e *Elector, giveUp time.Time, what string) time.Time {
	t.Helper()
	for {
		if _, open := e.WriteGate(); open {
			return time.Now()
		}
		if time.Now().After(giveUp) {
			t.Fatal(what)
		}
		time.Sleep(time.Millisecond)
	}
}

// Shutdown that begins while the takeover's write is in flight: the node
// gives the Lease straight back instead of holding it with nobody renewing.
func TestElector_StopDuringTakeover_LeaseReleased(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		api := newAPIServer()
		_, b, stopA, stopB := leaderAndFollower(t, api)
		defer stopA()
		var (
			mu      sync.Mutex
			holders []string // holders written after the crash, in order
		)
		hook := func(h string) {
			if h == "store-0" {
				return // a's last renewals, before its crash
			}
			mu.Lock()
			holders = append(holders, h)
			first := len(holders) == 1
			mu.Unlock()
			if first && h == "store-1" {
				b.Stop() // shutdown begins while the takeover is on its way
			}
		}
		api.onUpdate.Store(&hook)
		expiry := crashAndExpiry(t, api, b, "store-0", DefaultLeaseDuration)
		time.Sleep(time.Until(expiry) + time.Millisecond)
		synctest.Wait()
		stopB()
		mu.Lock()
		defer mu.Unlock()
		if len(holders) < 2 || holders[0] != "store-1" || holders[1] != "" {
			t.Fatalf("Lease writes after the crash: %q, want the takeover and then its release", holders)
		}
		if _, open := b.WriteGate(); open {
			t.Fatal("b opened its write gate while stopping")
		}
	})
}
