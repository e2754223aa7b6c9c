package transport

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
)

// held is a body a carrier holds whole, as peerhttp's frames are.
type held struct {
	*bytes.Reader
	b []byte
}

func (h held) Bytes() []byte { return h.b }
func (held) Close() error    { return nil }

// roundTripper answers every call with the reply body it builds.
type roundTripper func() (io.ReadCloser, int64)

func (rt roundTripper) RoundTrip(*http.Request) (*http.Response, error) {
	body, n := rt()
	return &http.Response{StatusCode: http.StatusOK, Header: http.Header{"Content-Type": {contentType}}, Body: body, ContentLength: n}, nil
}

// A read's value crosses the client in the buffer its reply arrived in,
// whatever wraps the body on the way (retryablehttp, http.Client): no copy
// the size of the value when the carrier holds the reply whole.
func TestHTTP_Read_ValueIsNotCopied(t *testing.T) {
	value := bytes.Repeat([]byte(`"<\u2028>"`), 1<<16)
	reply := marshal(&ReadReply{Value: value, Version: Version{1, 2}, ServedBy: "n2"})
	tests := []struct {
		name    string
		body    func() (io.ReadCloser, int64)
		inPlace bool
	}{
		{"held whole by the carrier", func() (io.ReadCloser, int64) { return held{bytes.NewReader(reply), reply}, int64(len(reply)) }, true},
		{"known length", func() (io.ReadCloser, int64) { return io.NopCloser(bytes.NewReader(reply)), int64(len(reply)) }, false},
		{"unknown length", func() (io.ReadCloser, int64) { return io.NopCloser(bytes.NewReader(reply)), -1 }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := NewHTTP(HTTPConfig{Addr: func(string) (string, error) { return "peer:1", nil }, Token: "t", RoundTripper: roundTripper(tt.body)})
			if err != nil {
				t.Fatal(err)
			}
			got, err := c.Read(context.Background(), "n2", Read{Key: "k"})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got.Value, value) || got.ServedBy != "n2" {
				t.Fatalf("got %d bytes served by %q, want the %d sent by n2", len(got.Value), got.ServedBy, len(value))
			}
			if inPlace := &got.Value[0] == &reply[bytes.Index(reply, value)]; inPlace != tt.inPlace {
				t.Errorf("value in the carrier's buffer: %v, want %v", inPlace, tt.inPlace)
			}
		})
	}
}

// A body past the limit is refused before it is read in full, whether its
// length was declared or not.
func TestReadBody_Limit(t *testing.T) {
	tests := []struct {
		name string
		n    int64
	}{{"declared", 11}, {"undeclared", -1}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := readBody(strings.NewReader("01234567890"), tt.n, 10)
			if !errors.Is(err, errBodyTooLarge) {
				t.Fatalf("err %v, want errBodyTooLarge", err)
			}
		})
	}
}

// A body of declared length ends in a buffer of exactly that length (a
// decoded value keeps its buffer, so slack would stay with it), also when
// it arrives in small reads.
func TestReadBody_DeclaredLength_ExactBuffer(t *testing.T) {
	for _, n := range []int{0, 1, 64 << 10, 64<<10 + 1, 1<<20 + 3} {
		want := bytes.Repeat([]byte{'x'}, n)
		got, err := readBody(io.MultiReader(bytes.NewReader(want[:n/2]), bytes.NewReader(want[n/2:])), int64(n), int64(n))
		if err != nil || !bytes.Equal(got, want) || cap(got) != n {
			t.Errorf("%d bytes: got %d (cap %d), %v", n, len(got), cap(got), err)
		}
	}
}
