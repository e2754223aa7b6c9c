package replication

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/statefulkv/store/internal/storage"
	"github.com/statefulkv/store/internal/transport"
)

// bulk is more than a page of versions (long keys) and of values (about
// 1 MiB each, as JSON with escapes), so every transfer of it needs pages.
type bulk struct{ entries []storage.Entry }

func newBulk() bulk {
	var b bulk
	seq := uint64(0)
	// 2700 keys of 4000 bytes: their versions alone are past a whole
	// message, so a listing that is not paged fails.
	for i := range 2700 {
		seq++
		key := fmt.Sprintf("%04d-%s", i, strings.Repeat("k", 3995))
		b.entries = append(b.entries, storage.Entry{Key: key, Value: []byte(fmt.Sprint(i)), Version: storage.Version{Epoch: 1, Seq: seq}})
	}
	value := []byte(`"` + strings.Repeat(`<\"\u0001>`, (1<<20)/12) + `"`)
	for i := range 24 {
		seq++
		b.entries = append(b.entries, storage.Entry{Key: fmt.Sprintf("big%02d", i), Value: value, Version: storage.Version{Epoch: 1, Seq: seq}})
	}
	// A deleted key travels as a tombstone.
	seq++
	b.entries = append(b.entries, storage.Entry{Key: "gone", Deleted: true, Version: storage.Version{Epoch: 1, Seq: seq}})
	return b
}

// load writes the entries into db as replicated entries of term 1, in
// batches, without the write path (which is not what is under test).
func (b bulk) load(t *testing.T, db *storage.DB) {
	t.Helper()
	for i := 0; i < len(b.entries); i += 256 {
		if _, err := db.ApplyReplicated(context.Background(), 1, b.entries[i:min(i+256, len(b.entries))]); err != nil {
			t.Fatal(err)
		}
	}
}

// check fails unless nd holds every entry for which want says so, with
// the same version and the same bytes.
func (b bulk) check(t *testing.T, nd *testNode, want func(key string) bool) {
	t.Helper()
	missing := 0
	for _, e := range b.entries {
		if !want(e.Key) {
			continue
		}
		got, found, err := nd.db.Lookup(e.Key)
		if err != nil || !found || got.Version != e.Version || got.Deleted != e.Deleted || string(got.Value) != string(e.Value) {
			missing++
		}
	}
	if missing > 0 {
		t.Fatalf("%s lacks %d of the entries it should hold, or holds them differently", nd.id, missing)
	}
}

// messageLimit is what a real receiver accepts with 1 MiB values.
var messageLimit = transport.MaxMessageBytes(1 << 20)

// A leaving leader's hand-off of more than a page of versions and values
// goes in pages, every message within what the receivers accept.
func TestPaging_HandOff_MoreThanAPage_EveryMessageWithinTheLimit(t *testing.T) {
	nodes := newTestCluster(t, 3, 2)
	nodes[0].net.SetLimit(messageLimit)
	leader := nodes[0]
	awaitGate(t, leader)
	// Only the hand-off may bring the followers level.
	leader.c.repl.Close()
	for _, nd := range nodes[1:] {
		nd.c.cancel()
	}
	b := newBulk()
	b.load(t, leader.db)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := leader.c.HandOff(ctx); err != nil {
		t.Fatal(err)
	}
	for _, nd := range nodes[1:] {
		b.check(t, nd, func(key string) bool { return leader.c.isOwner(nd.id, leader.c.cfg.Ring.Partition(key)) })
	}
	if got := leader.net.Largest(); got > messageLimit {
		t.Fatalf("largest message %d bytes, limit %d", got, messageLimit)
	}
	t.Logf("largest message %d bytes (limit %d)", leader.net.Largest(), messageLimit)
}

// A new leader's catch-up of more than a page of versions and values from
// a member pulls it in pages, every message within the limit, and ends
// holding all of it.
func TestPaging_CatchUp_MoreThanAPage_EveryMessageWithinTheLimit(t *testing.T) {
	nodes := newTestCluster(t, 3, 2)
	nodes[0].net.SetLimit(messageLimit)
	awaitGate(t, nodes[0])
	b := newBulk()
	b.load(t, nodes[1].db)
	nodes[0].down.Store(true)
	elect(nodes, "node-3", 2)
	awaitCaughtUp(t, nodes[2])
	b.check(t, nodes[2], func(string) bool { return true })
	if got := nodes[0].net.Largest(); got > messageLimit {
		t.Fatalf("largest message %d bytes, limit %d", got, messageLimit)
	}
	t.Logf("largest message %d bytes (limit %d)", nodes[0].net.Largest(), messageLimit)
}
