package election

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/leaderelection"
	rl "k8s.io/client-go/tools/leaderelection/resourcelock"
)

// Defaults are client-go's core values.
const (
	DefaultLeaseDuration = 15 * time.Second
	DefaultRenewDeadline = 10 * time.Second
	DefaultRetryPeriod   = 2 * time.Second
	DefaultLeaseName     = "store-leader"
)

// ErrInvalidConfig wraps every configuration error New returns. Messages
// name the store's flags, since that is where an operator fixes them.
var ErrInvalidConfig = errors.New("invalid election configuration")

// Config configures an Elector.
type Config struct {
	// Client talks to the apiserver. Build it with NewClient so its HTTP
	// timeout stays below the renew deadline.
	Client kubernetes.Interface
	// Namespace holds the Lease (the pod's namespace).
	Namespace string
	// LeaseName names the Lease. Default DefaultLeaseName.
	LeaseName string
	// Identity is this candidate's name: the pod name.
	Identity string
	// LeaseDuration is how long followers wait after the last observed
	// renewal before taking over. Whole seconds (the Lease stores seconds).
	LeaseDuration time.Duration
	// RenewDeadline is how long the leader keeps trying to renew before it
	// gives up; it is also the write gate's width.
	RenewDeadline time.Duration
	// RetryPeriod is the interval between attempts.
	RetryPeriod time.Duration
	// Logger gets one line per leadership change. Default slog.Default().
	Logger *slog.Logger
	// Registerer receives the election metrics; nil registers nothing.
	Registerer prometheus.Registerer
	// EpochFloor, if set, returns the newest term this node has admitted
	// (storage.DB.FenceEpoch). Whenever this node starts a term (creating
	// the Lease, or taking it over), the term starts above that floor, so a
	// Lease that was deleted and recreated cannot restart terms below the
	// nodes' fences.
	EpochFloor func() uint64
	// OnElected, if set, is called in its own goroutine each time this node
	// starts a term, e.g. to tell the other members at once who leads.
	OnElected func(epoch uint64)
}

// Status is a snapshot of what this node knows about leadership.
type Status struct {
	// Leader is the holder last observed on the Lease; "" if none.
	Leader string
	// Epoch is the term of that leader (leaseTransitions+1); 0 if none.
	Epoch uint64
	// IsLeader reports whether this node may accept writes now: it holds
	// the Lease and its write gate is open.
	IsLeader bool
}

// Elector campaigns for the Lease for as long as Run runs.
//
// Its write gate is the only leadership signal writes may use: it opens on a
// successful create or renew of a Lease naming this node and closes
// RenewDeadline after the start of the last such call, measured on the local
// monotonic clock. Because RenewDeadline < LeaseDuration, and other candidates
// wait a full LeaseDuration after *observing* the renewal (which happens after
// the call started), the gate closes before anyone else can take over, even if
// this process is paused or partitioned from the apiserver.
type Elector struct {
	cfg     Config
	log     *slog.Logger
	lock    rl.Interface
	metrics *metrics

	mu        sync.Mutex
	leader    string    // last observed holder
	epoch     uint64    // last observed holder's epoch
	myEpoch   uint64    // our term's epoch while we hold the Lease
	gateUntil time.Time // write gate closes here (monotonic)
	stopping  bool      // shutdown began: never open the gate again
	resigned  uint64    // a term given up by ObserveEpoch; never reopened
	lastRead  string    // holder in the Lease this node read last
	cancel    context.CancelFunc

	// Takeover at expiry (see takeOverIfExpired): when this node last saw
	// the Lease record change, and the timer that fires when that
	// observation is LeaseDuration old.
	lastRaw     []byte
	changedAt   time.Time
	readAt      time.Time // last successful read of the Lease
	expiry      *time.Timer
	takeoverDue bool
}

// NewClient returns a clientset whose requests time out at half the renew
// deadline, so one hung call cannot eat the whole renew budget.
func NewClient(cfg *rest.Config, renewDeadline time.Duration) (kubernetes.Interface, error) {
	c := rest.CopyConfig(cfg)
	c.Timeout = renewDeadline / 2
	c.UserAgent = "store-election"
	return kubernetes.NewForConfig(c)
}

// New validates cfg and returns an Elector that is not yet campaigning.
func New(cfg Config) (*Elector, error) {
	if cfg.LeaseDuration == 0 {
		cfg.LeaseDuration = DefaultLeaseDuration
	}
	if cfg.RenewDeadline == 0 {
		cfg.RenewDeadline = DefaultRenewDeadline
	}
	if cfg.RetryPeriod == 0 {
		cfg.RetryPeriod = DefaultRetryPeriod
	}
	if cfg.LeaseName == "" {
		cfg.LeaseName = DefaultLeaseName
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if err := validate(cfg); err != nil {
		return nil, err
	}
	e := &Elector{
		cfg:     cfg,
		log:     cfg.Logger.With("component", "election", "lease", cfg.Namespace+"/"+cfg.LeaseName),
		metrics: newMetrics(cfg.Registerer),
	}
	e.lock = &observingLock{
		Interface: &rl.LeaseLock{
			LeaseMeta:  metav1.ObjectMeta{Namespace: cfg.Namespace, Name: cfg.LeaseName},
			Client:     cfg.Client.CoordinationV1(),
			LockConfig: rl.ResourceLockConfig{Identity: cfg.Identity},
		},
		e: e,
	}
	return e, nil
}

func validate(c Config) error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalidConfig, fmt.Sprintf(format, a...))
	}
	switch {
	case c.Client == nil:
		return bad("no Kubernetes client")
	case c.Namespace == "":
		return bad("namespace is empty; set POD_NAMESPACE (the downward API provides it) or --namespace")
	case c.Identity == "":
		return bad("identity is empty; set POD_NAME (the downward API provides it) or --node-id")
	case c.LeaseDuration < time.Second || c.LeaseDuration%time.Second != 0:
		return bad("--lease-duration %s must be a whole number of seconds, at least 1s (the Lease stores seconds)", c.LeaseDuration)
	case c.RenewDeadline <= 0 || c.RetryPeriod <= 0:
		return bad("--renew-deadline %s and --retry-period %s must be positive", c.RenewDeadline, c.RetryPeriod)
	case c.RenewDeadline >= c.LeaseDuration:
		return bad("--renew-deadline %s must be shorter than --lease-duration %s, or a paused leader could still write after another took over", c.RenewDeadline, c.LeaseDuration)
	case float64(c.RenewDeadline) <= leaderelection.JitterFactor*float64(c.RetryPeriod):
		return bad("--renew-deadline %s must exceed %.1f × --retry-period %s so a renewal can be retried", c.RenewDeadline, leaderelection.JitterFactor, c.RetryPeriod)
	}
	return nil
}

// Run campaigns until ctx is cancelled. Losing the Lease never ends Run: the
// node goes back to campaigning, so it cannot become a standby that never
// runs for leader again. On cancel it releases the Lease (if held) so a
// successor takes over within about one retry period; the caller must stop
// leader-only work (drain writes) before cancelling ctx.
func (e *Elector) Run(ctx context.Context) error {
	defer func() {
		e.mu.Lock()
		if e.expiry != nil {
			e.expiry.Stop()
		}
		e.mu.Unlock()
	}()
	for ctx.Err() == nil {
		campaign, cancel := context.WithCancel(ctx)
		e.mu.Lock()
		e.cancel = cancel
		if e.takeoverDue {
			// The expiry fired between campaigns: go straight to the
			// takeover below instead of campaigning first.
			cancel()
		}
		e.mu.Unlock()
		le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
			Lock:            e.lock,
			LeaseDuration:   e.cfg.LeaseDuration,
			RenewDeadline:   e.cfg.RenewDeadline,
			RetryPeriod:     e.cfg.RetryPeriod,
			ReleaseOnCancel: true,
			Name:            e.cfg.LeaseName,
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: func(context.Context) {},
				OnStoppedLeading: e.stoppedLeading,
			},
		})
		if err != nil {
			cancel()
			return fmt.Errorf("election: %w", err)
		}
		le.Run(campaign)
		cancel()
		e.takeOverIfExpired(ctx)
	}
	return nil
}

// Takeover at expiry. client-go's candidates look at the Lease every
// RetryPeriod × (1 to 2.2), and count a holder's LeaseDuration from the
// poll at which they first saw its last renewal. After a leader crashes
// they then notice the expiry only at a later poll: with the default 15 s
// / 2 s timings the write gap had a median of 17.35 s, above the 17 s
// mark (make bench-failover). This
// node instead keeps the same observation itself (observingLock.Get sees
// every read), and when the Lease has gone unchanged for LeaseDuration
// since it saw it change — exactly client-go's own rule — it takes the
// Lease over at once with an update that carries the read's
// resourceVersion, so of two nodes doing this only one wins. The old
// leader's write gate closed RenewDeadline after its last renewal started,
// which is before this node saw that renewal, so the takeover is as safe
// as client-go's own.

// noteRead records a Lease read: when the record changed, the LeaseDuration
// clock restarts and the expiry timer is armed for a holder other than
// this node.
func (e *Elector) noteRead(rec *rl.LeaderElectionRecord, raw []byte) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.lastRead = rec.HolderIdentity
	e.readAt = time.Now()
	if bytes.Equal(raw, e.lastRaw) {
		return
	}
	e.lastRaw = bytes.Clone(raw)
	e.changedAt = time.Now()
	if e.expiry != nil {
		e.expiry.Stop()
	}
	if rec.HolderIdentity == "" || rec.HolderIdentity == e.cfg.Identity {
		return
	}
	at := e.changedAt
	e.expiry = time.AfterFunc(e.leaseFor(rec), func() { e.expired(at) })
}

// leaseFor is how long a record's holder may stay silent before its Lease
// expires: the longer of this node's LeaseDuration and the one the holder
// wrote. client-go trusts the record's; taking the longer also keeps a node
// configured with a shorter lease (mid rolling change of the timings) from
// deposing a leader whose gate is still open under the longer one.
func (e *Elector) leaseFor(rec *rl.LeaderElectionRecord) time.Duration {
	return max(e.cfg.LeaseDuration, time.Duration(rec.LeaseDurationSeconds)*time.Second)
}

// retryTakeover re-arms the expiry after a takeover that could not be
// tried (the apiserver did not answer): the record has not changed, so no
// read would re-arm it, and the fresh client-go campaign counts its own
// lease from scratch.
func (e *Elector) retryTakeover() {
	e.mu.Lock()
	defer e.mu.Unlock()
	at := e.changedAt
	if e.expiry != nil {
		e.expiry.Stop()
	}
	e.expiry = time.AfterFunc(e.cfg.RetryPeriod, func() { e.expired(at) })
}

// expired ends the current campaign so Run can take the Lease over, if
// the record seen at changedAt is still the last one seen.
func (e *Elector) expired(changedAt time.Time) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.changedAt.Equal(changedAt) || e.myEpoch != 0 || e.stopping || e.cancel == nil {
		return
	}
	e.takeoverDue = true
	e.cancel()
}

// takeOverIfExpired runs between campaigns: if a takeover is due, it reads
// the Lease and, if the record is still the one that expired, writes this
// node in as holder with the next term.
func (e *Elector) takeOverIfExpired(ctx context.Context) {
	e.mu.Lock()
	due := e.takeoverDue && !e.stopping
	e.takeoverDue = false
	e.mu.Unlock()
	if !due || ctx.Err() != nil {
		return
	}
	rctx, cancel := context.WithTimeout(ctx, e.cfg.RenewDeadline)
	defer cancel()
	rec, _, err := e.lock.Get(rctx) // observingLock: restarts the clock if the record changed
	if err != nil {
		e.retryTakeover()
		return
	}
	e.mu.Lock()
	silent := time.Since(e.changedAt)
	stopping := e.stopping
	e.mu.Unlock()
	if stopping || rec.HolderIdentity == "" || rec.HolderIdentity == e.cfg.Identity || silent < e.leaseFor(rec) {
		return
	}
	now := metav1.Now()
	next := rl.LeaderElectionRecord{
		HolderIdentity:       e.cfg.Identity,
		LeaseDurationSeconds: int(e.cfg.LeaseDuration / time.Second),
		AcquireTime:          now,
		RenewTime:            now,
		LeaderTransitions:    rec.LeaderTransitions + 1,
	}
	if err := e.lock.Update(rctx, next); err != nil {
		if apierrors.IsConflict(err) {
			e.log.Info("expired Lease taken by another node first")
		} else {
			e.log.Warn("taking over an expired Lease failed; trying again", "err", err)
			e.retryTakeover()
		}
		return
	}
	e.metrics.expiryTakeovers.Inc()
	e.log.Info("took over the Lease of a silent leader", "previous", rec.HolderIdentity, "silent_for", silent.Round(time.Millisecond))
	e.mu.Lock()
	stopping = e.stopping
	e.mu.Unlock()
	if stopping || ctx.Err() != nil {
		// Shutdown began while the write was in flight: Run is about to
		// return, and no campaign would release what this node now holds.
		// (The write gate stayed shut: observed does not open it while
		// stopping.)
		e.releaseTakenLease()
	}
	// Otherwise the next campaign finds this node holding the Lease and
	// renews it.
}

// releaseTakenLease gives back a Lease this node has just taken over, on a
// fresh context (the caller's is cancelled), as client-go's release does:
// read, then clear the holder.
func (e *Elector) releaseTakenLease() {
	ctx, cancel := context.WithTimeout(context.Background(), e.cfg.RenewDeadline)
	defer cancel()
	rec, _, err := e.lock.Get(ctx)
	if err != nil || rec.HolderIdentity != e.cfg.Identity {
		return
	}
	now := metav1.Now()
	if err := e.lock.Update(ctx, rl.LeaderElectionRecord{
		LeaderTransitions:    rec.LeaderTransitions,
		LeaseDurationSeconds: 1,
		AcquireTime:          now,
		RenewTime:            now,
	}); err != nil {
		e.log.Warn("releasing the Lease taken during shutdown failed; it expires on its own", "err", err)
	}
}

// HintLeader records that a peer reports id as leader of term epoch, so
// this node routes to it at once instead of at its next poll of the Lease.
// Only a newer term than the observed one is adopted, and only for routing:
// campaigning and this node's own write gate still follow the Lease alone.
func (e *Elector) HintLeader(id string, epoch uint64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if id == "" || id == e.cfg.Identity || epoch <= e.epoch {
		return
	}
	e.log.Info("leader changed", "leader", id, "epoch", epoch, "me", e.cfg.Identity, "source", "peer")
	e.leader, e.epoch = id, epoch
	e.metrics.transitions.Inc()
	e.metrics.epoch.Set(float64(epoch))
}

// Nudge makes a candidate that is not leading try for the Lease now instead
// of at its next retry period, e.g. because the leader has just released it
// on shutdown. It restarts the campaign, whose first step is an immediate
// attempt. A leader, a stopping node, or one not yet running ignores it.
func (e *Elector) Nudge() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.myEpoch != 0 || e.stopping || e.cancel == nil {
		return
	}
	e.cancel()
}

// Stop closes the write gate for good; Run's caller cancels its context
// afterwards to release the Lease. Shutdown calls it once HTTP has drained.
func (e *Elector) Stop() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.stopping = true
	e.gateUntil = time.Time{}
}

// WriteGate returns the epoch to stamp writes with and whether this node may
// accept a write now.
func (e *Elector) WriteGate() (epoch uint64, open bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.myEpoch, e.gateOpenLocked()
}

func (e *Elector) gateOpenLocked() bool {
	return e.myEpoch != 0 && !e.stopping && time.Now().Before(e.gateUntil)
}

// Status returns what this node currently knows about leadership.
func (e *Elector) Status() Status {
	e.mu.Lock()
	defer e.mu.Unlock()
	return Status{Leader: e.leader, Epoch: e.epoch, IsLeader: e.gateOpenLocked()}
}

// LeaseView is how this node sees the Lease on the monotonic clock: how
// long ago it last read it successfully, and how long ago the record last
// changed (a leader that renews changes it every RetryPeriod). Both are
// huge before the first read. Readiness uses them to tell an election
// (nobody renews) from a leader this node cannot hear.
func (e *Elector) LeaseView() (sinceRead, sinceChange time.Duration) {
	e.mu.Lock()
	defer e.mu.Unlock()
	age := func(t time.Time) time.Duration {
		if t.IsZero() {
			return time.Duration(math.MaxInt64)
		}
		return time.Since(t)
	}
	return age(e.readAt), age(e.changedAt)
}

// Leader returns the holder last observed on the Lease and its epoch.
func (e *Elector) Leader() (id string, epoch uint64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.leader, e.epoch
}

// Identity is this node's candidate name.
func (e *Elector) Identity() string { return e.cfg.Identity }

// ObserveEpoch tells the elector that some node has seen epoch. If that is
// newer than this node's term, the node steps down at once: the gate closes
// and it campaigns again. Nothing else is remembered: the Lease is the only
// source of epochs, so a new term here is again leaseTransitions+1, which is
// above any term that really existed.
func (e *Elector) ObserveEpoch(epoch uint64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.myEpoch != 0 && e.myEpoch < epoch {
		e.log.Warn("stepping down: a newer epoch exists", "my_epoch", e.myEpoch, "seen_epoch", epoch)
		e.resigned = e.myEpoch
		e.gateUntil = time.Time{}
		e.myEpoch = 0
		e.metrics.isLeader.Set(0)
		if e.cancel != nil {
			e.cancel()
		}
	}
}

func (e *Elector) stoppedLeading() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.myEpoch != 0 {
		e.log.Info("stopped leading", "epoch", e.myEpoch)
	}
	e.myEpoch = 0
	e.gateUntil = time.Time{}
	e.metrics.isLeader.Set(0)
}

// observed records a Lease record read from or written to the apiserver.
// start is when the write began (zero for reads).
func (e *Elector) observed(rec *rl.LeaderElectionRecord, wrote bool, start time.Time) {
	e.mu.Lock()
	defer e.mu.Unlock()
	holder := rec.HolderIdentity
	epoch := uint64(0)
	if holder != "" {
		epoch = uint64(rec.LeaderTransitions) + 1
	}
	if holder != e.leader || epoch != e.epoch {
		if holder != e.leader {
			e.metrics.transitions.Inc()
		}
		e.log.Info("leader changed", "leader", holder, "epoch", epoch, "me", e.cfg.Identity)
		e.leader, e.epoch = holder, epoch
		e.metrics.epoch.Set(float64(epoch))
	}
	switch {
	case holder == e.cfg.Identity && wrote && !e.stopping && epoch != e.resigned:
		// (A renewal already in flight when this node resigned its term must
		// not reopen the gate for that term.)
		if e.myEpoch != epoch {
			e.log.Info("became leader", "epoch", epoch)
			if f := e.cfg.OnElected; f != nil {
				go f(epoch)
			}
		}
		e.myEpoch = epoch
		e.gateUntil = start.Add(e.cfg.RenewDeadline)
		e.metrics.isLeader.Set(1)
	case holder != e.cfg.Identity:
		// Someone else (or nobody, after a release) holds the Lease.
		e.myEpoch = 0
		e.gateUntil = time.Time{}
		e.metrics.isLeader.Set(0)
	}
}

// observingLock wraps the LeaseLock to learn every record the elector reads
// or successfully writes: that is where the epoch and the write gate come
// from, rather than from callbacks that fire later.
type observingLock struct {
	rl.Interface
	e *Elector
}

func (l *observingLock) Get(ctx context.Context) (*rl.LeaderElectionRecord, []byte, error) {
	rec, raw, err := l.Interface.Get(ctx)
	if err == nil {
		l.e.observed(rec, false, time.Time{})
		l.e.noteRead(rec, raw)
	}
	return rec, raw, err
}

// errNotHolder refuses a release of a Lease this node no longer holds.
var errNotHolder = errors.New("election: not releasing a Lease another node holds")

// termRecord fixes the transitions count of a record this node is about to
// write for itself: a renewal keeps its term's count (client-go would write
// back the count it last observed, which is stale once it has been raised),
// and an acquisition starts at least at the epoch floor.
func (e *Elector) termRecord(rec *rl.LeaderElectionRecord) {
	if rec.HolderIdentity != e.cfg.Identity {
		return
	}
	e.mu.Lock()
	mine := e.myEpoch
	e.mu.Unlock()
	if mine != 0 {
		rec.LeaderTransitions = int(mine - 1)
		return
	}
	if floor := e.cfg.EpochFloor; floor != nil {
		if f := floor(); uint64(rec.LeaderTransitions) < f && f < math.MaxInt32 {
			rec.LeaderTransitions = int(f) // epoch = transitions+1 = floor+1
		}
	}
}

func (l *observingLock) Create(ctx context.Context, rec rl.LeaderElectionRecord) error {
	l.e.termRecord(&rec)
	start := time.Now()
	err := l.Interface.Create(ctx, rec)
	if err == nil {
		l.e.observed(&rec, true, start)
	}
	return err
}

func (l *observingLock) Update(ctx context.Context, rec rl.LeaderElectionRecord) error {
	if rec.HolderIdentity == "" {
		// A release. client-go's tryRelease re-reads the Lease but decides
		// from the record it observed before; after a long pause that can be
		// a successor's Lease, and clearing it would hand a second node the
		// lock while the successor's gate is still open. Release only what
		// the fresh read says this node holds.
		l.e.mu.Lock()
		holder := l.e.lastRead
		l.e.mu.Unlock()
		if holder != l.e.cfg.Identity {
			return fmt.Errorf("%w: the Lease names %q", errNotHolder, holder)
		}
	}
	l.e.termRecord(&rec)
	start := time.Now()
	err := l.Interface.Update(ctx, rec)
	switch {
	case err == nil:
		l.e.observed(&rec, true, start)
	case apierrors.IsConflict(err):
		// Someone else wrote the Lease first (typically: two candidates
		// racing for a just-released Lease). Read it now, so this node
		// learns the winner at once instead of a retry period later and
		// forwards writes to it.
		if got, _, gerr := l.Interface.Get(ctx); gerr == nil {
			l.e.observed(got, false, time.Time{})
		}
	}
	return err
}
