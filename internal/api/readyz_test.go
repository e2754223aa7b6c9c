package api

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/statefulkv/store/internal/node"
	"github.com/statefulkv/store/internal/storage"
)

// unready is a single node whose node layer says it cannot serve.
type unready struct {
	*node.Node
	err error
}

func (u unready) Ready() error { return u.err }

// /readyz passes the node's verdict on: why it cannot serve, as 503
// not_ready (the rule itself is node.Ready's, tested in internal/node).
func TestReadyz_AnswersTheNodesVerdict(t *testing.T) {
	db, err := storage.Open(t.TempDir(), storage.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	nd, err := node.New(node.Config{Self: "n1", Store: db})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		err    error
		status int
	}{
		{nil, http.StatusOK},
		{fmt.Errorf("%w: the leader (n2) renews its Lease but no message from it for 5s: cut off from it?", node.ErrNotReady), http.StatusServiceUnavailable},
	} {
		srv, err := New(Config{NodeID: "n1", Node: unready{nd, tt.err}, Stats: db})
		if err != nil {
			t.Fatal(err)
		}
		srv.SetReady(true)
		req, _ := http.NewRequestWithContext(context.Background(), http.MethodGet, "/readyz", nil)
		rec := httptest.NewRecorder()
		srv.ServeHTTP(rec, req)
		if rec.Code != tt.status || (tt.err != nil && (!strings.Contains(rec.Body.String(), "not_ready") || !strings.Contains(rec.Body.String(), "cut off from it"))) {
			t.Fatalf("readyz with %v: %d %s", tt.err, rec.Code, rec.Body)
		}
	}
}
