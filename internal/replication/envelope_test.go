package replication

import (
	"errors"
	"testing"
)

func TestFence_Admit(t *testing.T) {
	tests := []struct {
		name string
		env  envelope
		ok   bool
	}{
		{"first leader", envelope{Epoch: 3, Leader: "store-0"}, true},
		{"same leader again", envelope{Epoch: 3, Leader: "store-0"}, true},
		{"older epoch is fenced", envelope{Epoch: 2, Leader: "store-1"}, false},
		{"another node claiming the same epoch", envelope{Epoch: 3, Leader: "store-2"}, false},
		{"newer leader", envelope{Epoch: 4, Leader: "store-1"}, true},
		{"the superseded leader comes back", envelope{Epoch: 3, Leader: "store-0"}, false},
		{"no epoch", envelope{Leader: "store-1"}, false},
		{"no leader", envelope{Epoch: 9}, false},
	}
	f := newFence(0)
	for _, tt := range tests {
		err := f.Admit(tt.env)
		if tt.ok != (err == nil) || (err != nil && !errors.Is(err, ErrStaleEpoch)) {
			t.Fatalf("%s: Admit(%+v) = %v, want ok=%v", tt.name, tt.env, err, tt.ok)
		}
	}
	if f.Highest() != 4 {
		t.Fatalf("highest = %d, want 4", f.Highest())
	}
	if err := newFence(7).Admit(envelope{Epoch: 6, Leader: "store-0"}); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("a fence restored at 7 admitted epoch 6: %v", err)
	}
}
