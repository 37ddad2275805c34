package mdev

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vring"
)

// TestRegionPiece: the migration source sends dirty pages region by
// region. A piece ends where its region does, including a region that
// ends at the top of the address space, whose End wraps to 0 (it was not
// found: "dirty page outside guest memory"). Found by a review.
func TestRegionPiece(t *testing.T) {
	top := ^vring.GuestAddr(0) - 0x1fff
	low, err := vring.NewMemfdRegion(0x1000, 0x2000, nil)
	require.NoError(t, err)
	high, err := vring.NewMemfdRegion(top, 0x2000, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(low, high)
	require.NoError(t, err)
	t.Cleanup(func() { _ = mem.Close() })
	for _, tc := range []struct {
		name    string
		addr, n uint64
		want    int
		err     error
	}{
		{"inside a region", 0x1000, 0x1000, 0x1000, nil},
		{"cut at the region's end", 0x2000, 0x5000, 0x1000, nil},
		{"the top region", uint64(top), 0x1000, 0x1000, nil},
		{"the top region to its end", uint64(top) + 0x1000, 0x1000, 0x1000, nil},
		{"the last byte of the address space", ^uint64(0), 1, 1, nil},
		{"more than the top region holds", uint64(top), 0x10000, 0x2000, nil},
		{"outside guest memory", 0x8000, 0x1000, 0, vring.ErrOutOfRange},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := regionPiece(mem, tc.addr, tc.n)
			if tc.err != nil {
				require.ErrorIs(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			assert.Len(t, b, tc.want)
		})
	}
}
