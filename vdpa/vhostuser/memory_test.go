package vhostuser

import (
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vring"
)

// TestMemSpanAtTheTop: the span a dirty log must cover for a memory table
// is one past its highest region; a region that ends at the top of the
// address space (a table vring and the back-end accept) gives the largest
// span, which dirty.New refuses, not the 1 that Region.End's wrap to 0
// made (a one-page log where every write past it failed). Found by a
// review.
func TestMemSpanAtTheTop(t *testing.T) {
	region := func(base vring.GuestAddr, size int) *vring.Region {
		r, err := vring.NewRegion(base, make([]byte, size), nil)
		require.NoError(t, err)
		return r
	}
	for _, tc := range []struct {
		name    string
		regions []*vring.Region
		want    uint64
	}{
		{"no table", nil, 1},
		{"one region", []*vring.Region{region(0, 0x2000)}, 0x2000},
		{"the highest wins", []*vring.Region{region(0x100000, 0x1000), region(0, 0x2000)}, 0x101000},
		{"ending at the top", []*vring.Region{region(0, 0x1000), region(^vring.GuestAddr(0)-0xfff, 0x1000)}, math.MaxUint64},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &session{}
			if tc.regions != nil {
				mem, err := vring.NewMemory(tc.regions...)
				require.NoError(t, err)
				s.mem = &peerMemory{mem: mem}
			}
			assert.Equal(t, tc.want, s.memSpan())
		})
	}
	_, err := dirty.New(math.MaxUint64, nil)
	require.Error(t, err, "no log covers the top region's span")
}
