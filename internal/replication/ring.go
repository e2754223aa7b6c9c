package replication

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"

	"github.com/buraksezer/consistent"
	"github.com/cespare/xxhash/v2"
)

// Ring defaults.
const (
	DefaultPartitionCount = 271
	DefaultLoad           = 1.25
	DefaultVirtualNodes   = 20
)

var (
	// ErrInvalidRing wraps every ring configuration error.
	ErrInvalidRing = errors.New("invalid ring configuration")
	// ErrNoMembers means Set was given no usable member.
	ErrNoMembers = errors.New("ring has no members")
	// ErrNoRoom means the member count, partition count and load factor
	// leave no room to place every partition; consistent would panic.
	ErrNoRoom = errors.New("not enough room to place partitions")
)

// RingConfig shapes the hash ring. The zero value takes the defaults.
type RingConfig struct {
	// PartitionCount is the number of partitions keys hash into. It can
	// never change for a cluster's lifetime: data placement depends on it.
	PartitionCount int
	// Load bounds each member's share to Load × the average (≥ 1).
	Load float64
	// VirtualNodes is how many points each member has on the ring (≥ 2).
	VirtualNodes int
}

// Ring maps keys to partitions and partitions to their owners, over
// github.com/buraksezer/consistent (consistent hashing with bounded loads).
//
// consistent panics when its parameters leave no room to place a partition
// (buraksezer/consistent#13) and keeps stale hashes when members are removed
// one by one (PR #33). Ring avoids both by validating its configuration in
// NewRing and rebuilding from the full member list on every Set, so no
// member change can panic.
//
// Safe for concurrent use.
type Ring struct {
	cfg     RingConfig
	mu      sync.RWMutex
	c       *consistent.Consistent
	members []string
}

// NewRing validates cfg. The ring has no members until Set.
func NewRing(cfg RingConfig) (*Ring, error) {
	if cfg.PartitionCount == 0 {
		cfg.PartitionCount = DefaultPartitionCount
	}
	if cfg.Load == 0 {
		cfg.Load = DefaultLoad
	}
	if cfg.VirtualNodes == 0 {
		cfg.VirtualNodes = DefaultVirtualNodes
	}
	switch {
	case cfg.PartitionCount < 1 || cfg.PartitionCount > 1<<16:
		return nil, fmt.Errorf("%w: partition count %d must be 1 to 65536", ErrInvalidRing, cfg.PartitionCount)
	case cfg.Load < 1:
		// Below 1 the members' combined capacity is less than the partition
		// count and placement panics.
		return nil, fmt.Errorf("%w: load factor %g must be at least 1", ErrInvalidRing, cfg.Load)
	case cfg.VirtualNodes < 2:
		// consistent scans all but one ring point for room; with a single
		// point per member a member can be skipped entirely.
		return nil, fmt.Errorf("%w: virtual nodes %d must be at least 2", ErrInvalidRing, cfg.VirtualNodes)
	}
	return &Ring{cfg: cfg}, nil
}

type member string

func (m member) String() string { return string(m) }

type hasher struct{}

func (hasher) Sum64(b []byte) uint64 { return xxhash.Sum64(b) }

// Set replaces the member list (stable pod names). Duplicates and empty
// names are dropped; an empty list is refused and leaves the ring as it was.
func (r *Ring) Set(members []string) error {
	clean := slices.Clone(members)
	slices.Sort(clean)
	clean = slices.Compact(clean)
	clean = slices.DeleteFunc(clean, func(s string) bool { return s == "" })
	if len(clean) == 0 {
		return ErrNoMembers
	}
	// consistent caps each member at ceil(floor(P/M) × load) partitions (its
	// averageLoad divides integers), and panics when the caps sum to less
	// than P. Check the same arithmetic first.
	p, m := r.cfg.PartitionCount, len(clean)
	if capacity := int(math.Ceil(float64(p/m)*r.cfg.Load)) * m; capacity < p {
		return fmt.Errorf("%w: %d members × at most %d partitions each < %d partitions; raise the load factor (%g) or the partition count, or use fewer members",
			ErrNoRoom, m, capacity/m, p, r.cfg.Load)
	}
	ms := make([]consistent.Member, len(clean))
	for i, m := range clean {
		ms[i] = member(m)
	}
	c := consistent.New(ms, consistent.Config{
		PartitionCount:    r.cfg.PartitionCount,
		ReplicationFactor: r.cfg.VirtualNodes,
		Load:              r.cfg.Load,
		Hasher:            hasher{},
	})
	r.mu.Lock()
	r.c, r.members = c, clean
	r.mu.Unlock()
	return nil
}

// Members returns the current members, sorted.
func (r *Ring) Members() []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return slices.Clone(r.members)
}

// PartitionCount is the number of partitions keys hash into.
func (r *Ring) PartitionCount() int { return r.cfg.PartitionCount }

// Partition returns the partition key hashes to.
func (r *Ring) Partition(key string) int {
	return int(xxhash.Sum64String(key) % uint64(r.cfg.PartitionCount))
}

// Owners returns up to n distinct owners of key's partition, the primary
// first. With fewer members than n it returns them all: the caller compares
// len(result) with n to know the replication factor is not met.
func (r *Ring) Owners(key string, n int) ([]string, error) {
	return r.PartitionOwners(r.Partition(key), n)
}

// PartitionOwners is Owners for a partition id.
func (r *Ring) PartitionOwners(part, n int) ([]string, error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if r.c == nil {
		return nil, ErrNoMembers
	}
	n = min(n, len(r.members))
	if n < 1 {
		return nil, fmt.Errorf("owners: n must be at least 1")
	}
	ms, err := r.c.GetClosestNForPartition(part, n)
	if err != nil {
		return nil, fmt.Errorf("owners of partition %d: %w", part, err)
	}
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.String()
	}
	return out, nil
}
