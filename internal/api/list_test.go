package api

import (
	"encoding/json"
	"net/http/httptest"
	"strconv"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/statefulkv/store/internal/storage"
)

// writeList streams a page entry by entry; its bytes and Content-Length
// must be exactly what marshalling the whole listBody wrote before.
func TestWriteList_SameBytesAsMarshal(t *testing.T) {
	v := storage.Version{Epoch: 2, Seq: 7}
	tests := []struct {
		name    string
		entries []storage.Entry
		next    string
	}{
		{"empty", nil, ""},
		{"one", []storage.Entry{{Key: "a", Value: []byte(`1`), Version: v}}, ""},
		{"with next", []storage.Entry{{Key: "a", Value: []byte(`{"x":1}`), Version: v}, {Key: "b<&>", Value: []byte(`"b"`), Version: v}}, "b<&>"},
		{"html and whitespace in values", []storage.Entry{{Key: "k", Value: []byte(" { \"a\" : \"<script>&\u2028\" ,\n \"b\": [1, 2] } "), Version: v}}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body := listBody{Items: []listItem{}, Next: tt.next}
			for _, e := range tt.entries {
				body.Items = append(body.Items, listItem{Key: e.Key, Version: e.Version.String(), Value: e.Value})
			}
			want, err := json.Marshal(body)
			if err != nil {
				t.Fatal(err)
			}
			want = append(want, '\n')
			rec := httptest.NewRecorder()
			writeList(rec, tt.entries, tt.next)
			if got := rec.Header().Get("Content-Length"); got != strconv.Itoa(len(want)) {
				t.Errorf("Content-Length %s, want %d", got, len(want))
			}
			if diff := cmp.Diff(string(want), rec.Body.String()); diff != "" {
				t.Errorf("body (-marshal +writeList):\n%s", diff)
			}
		})
	}
}
