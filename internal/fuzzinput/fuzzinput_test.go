package fuzzinput

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestReader(t *testing.T) {
	for _, tc := range []struct {
		name string
		data []byte
		want []byte // Next, called len(want) times
	}{
		{"empty", nil, []byte{0, 0}},
		{"in order", []byte{1, 2, 3}, []byte{1, 2, 3}},
		{"zero past the end", []byte{7}, []byte{7, 0, 0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := New(tc.data)
			var got []byte
			for range tc.want {
				assert.Equal(t, len(got) < len(tc.data), r.More(), "More before byte %d", len(got))
				got = append(got, r.Next())
			}
			assert.Equal(t, tc.want, got)
			assert.False(t, r.More())
		})
	}
}
