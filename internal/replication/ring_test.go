package replication

import (
	"errors"
	"fmt"
	"testing"

	"github.com/buraksezer/consistent"
)

func members(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("store-%d", i)
	}
	return out
}

func TestNewRing_RejectsConfigsThatWouldPanic(t *testing.T) {
	for _, cfg := range []RingConfig{
		{PartitionCount: -1},
		{PartitionCount: 1 << 20},
		{Load: 0.9},
		{VirtualNodes: 1},
	} {
		if _, err := NewRing(cfg); !errors.Is(err, ErrInvalidRing) {
			t.Errorf("NewRing(%+v) = %v, want ErrInvalidRing", cfg, err)
		}
	}
}

// Grow one member at a time from 1 to 7 and shrink back, under several
// configurations near the edges: no panic, and owners always valid.
func TestRing_Membership1To7To1_NoPanic(t *testing.T) {
	for _, cfg := range []RingConfig{
		{},
		{PartitionCount: 7, Load: 2, VirtualNodes: 2},
		{PartitionCount: 13, Load: 1.5, VirtualNodes: 2},
		{PartitionCount: 1024, Load: 1.05, VirtualNodes: 3},
	} {
		t.Run(fmt.Sprintf("%+v", cfg), func(t *testing.T) {
			r, err := NewRing(cfg)
			if err != nil {
				t.Fatal(err)
			}
			sizes := []int{1, 2, 3, 4, 5, 6, 7, 6, 5, 4, 3, 2, 1}
			for _, n := range sizes {
				if err := r.Set(members(n)); err != nil {
					t.Fatal(err)
				}
				for k := range 200 {
					owners, err := r.Owners(fmt.Sprintf("key-%d", k), 3)
					if err != nil {
						t.Fatal(err)
					}
					if want := min(3, n); len(owners) != want {
						t.Fatalf("%d members: %d owners, want %d", n, len(owners), want)
					}
					seen := map[string]bool{}
					for _, o := range owners {
						if seen[o] {
							t.Fatalf("owner %s listed twice: %v", o, owners)
						}
						seen[o] = true
					}
				}
			}
		})
	}
}

func TestRing_Set_IgnoresDuplicatesAndRefusesEmpty(t *testing.T) {
	r, _ := NewRing(RingConfig{})
	if _, err := r.Owners("k", 1); !errors.Is(err, ErrNoMembers) {
		t.Fatalf("owners before Set: %v", err)
	}
	if err := r.Set([]string{"b", "a", "b", "", "a"}); err != nil {
		t.Fatal(err)
	}
	if got := r.Members(); fmt.Sprint(got) != "[a b]" {
		t.Fatalf("members = %v", got)
	}
	if err := r.Set(nil); !errors.Is(err, ErrNoMembers) {
		t.Fatalf("Set(nil) = %v", err)
	}
	if got := r.Members(); fmt.Sprint(got) != "[a b]" {
		t.Fatalf("a refused Set changed the members: %v", got)
	}
}

// Placement depends only on the member set, not on the order members were
// added (every node computes the same ring), and a restart that re-adds the
// same names changes nothing.
func TestRing_PlacementIsAFunctionOfTheMemberSet(t *testing.T) {
	a, _ := NewRing(RingConfig{})
	b, _ := NewRing(RingConfig{})
	_ = a.Set([]string{"store-0", "store-1", "store-2"})
	_ = b.Set([]string{"store-2", "store-0", "store-1", "store-1"})
	for k := range 500 {
		key := fmt.Sprintf("k%d", k)
		oa, _ := a.Owners(key, 2)
		ob, _ := b.Owners(key, 2)
		if fmt.Sprint(oa) != fmt.Sprint(ob) {
			t.Fatalf("%s: %v vs %v", key, oa, ob)
		}
	}
}

// Adding a fourth member to three moves roughly a quarter of the primaries,
// not a reshuffle.
func TestRing_ScaleUpMovesAFraction(t *testing.T) {
	r, _ := NewRing(RingConfig{})
	_ = r.Set(members(3))
	before := map[int]string{}
	for p := range DefaultPartitionCount {
		o, _ := r.PartitionOwners(p, 1)
		before[p] = o[0]
	}
	_ = r.Set(members(4))
	moved := 0
	for p := range DefaultPartitionCount {
		o, _ := r.PartitionOwners(p, 1)
		if o[0] != before[p] {
			moved++
		}
	}
	frac := float64(moved) / DefaultPartitionCount
	t.Logf("3→4 members moved %d of %d primaries (%.0f%%)", moved, DefaultPartitionCount, 100*frac)
	if frac > 0.5 {
		t.Fatalf("adding one member to three moved %.0f%% of partitions", 100*frac)
	}
}

// Combinations consistent cannot place are refused with ErrNoRoom, never a
// panic, and the ring keeps its previous members.
func TestRing_Set_NoRoomIsAnErrorNotAPanic(t *testing.T) {
	tests := []struct {
		cfg    RingConfig
		n      int
		noRoom bool
	}{
		{RingConfig{PartitionCount: 7, Load: 1, VirtualNodes: 2}, 3, true},     // floor(7/3)=2, 3×2 < 7
		{RingConfig{PartitionCount: 3, Load: 1.25, VirtualNodes: 2}, 4, true},  // more members than partitions
		{RingConfig{PartitionCount: 10, Load: 1.1, VirtualNodes: 2}, 7, false}, // ceil(1×1.1)=2, 7×2 ≥ 10
		{RingConfig{}, 7, false},
	}
	for _, tt := range tests {
		r, err := NewRing(tt.cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Set(members(1)); err != nil {
			t.Fatal(err)
		}
		err = r.Set(members(tt.n))
		if tt.noRoom != errors.Is(err, ErrNoRoom) || (!tt.noRoom && err != nil) {
			t.Errorf("%+v with %d members: err = %v, want no room = %v", tt.cfg, tt.n, err, tt.noRoom)
		}
		if tt.noRoom && len(r.Members()) != 1 {
			t.Errorf("a refused Set changed the members")
		}
	}
}

// Across a grid of small configurations, Set either places every partition
// or returns ErrNoRoom: the guard matches consistent's own arithmetic, so it
// neither lets a panic through nor refuses a placeable ring.
func TestRing_Set_GuardIsExact(t *testing.T) {
	for p := 1; p <= 30; p++ {
		for _, load := range []float64{1, 1.1, 1.25, 1.5, 2} {
			r, err := NewRing(RingConfig{PartitionCount: p, Load: load, VirtualNodes: 2})
			if err != nil {
				t.Fatal(err)
			}
			for m := 1; m <= 35; m++ {
				func() {
					defer func() {
						if v := recover(); v != nil {
							t.Fatalf("P=%d load=%g M=%d: panic %v", p, load, m, v)
						}
					}()
					err := r.Set(members(m))
					if err != nil && !errors.Is(err, ErrNoRoom) {
						t.Fatalf("P=%d load=%g M=%d: %v", p, load, m, err)
					}
					if err != nil && !consistentPanics(p, load, m) {
						t.Fatalf("P=%d load=%g M=%d: refused, but consistent places it", p, load, m)
					}
				}()
			}
		}
	}
}

func consistentPanics(p int, load float64, m int) (panicked bool) {
	defer func() { panicked = recover() != nil }()
	ms := make([]consistent.Member, m)
	for i := range ms {
		ms[i] = member(fmt.Sprintf("store-%d", i))
	}
	consistent.New(ms, consistent.Config{PartitionCount: p, ReplicationFactor: 2, Load: load, Hasher: hasher{}})
	return false
}
