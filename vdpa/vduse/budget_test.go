package vduse

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestIOVABudget: mapLocked maps IOTLB entries only while they stay within
// maxIOTLBEntries and maxIOVAMapped; beyond either, the mapping is refused
// with ErrBadRequest before the entry is mapped.
func TestIOVABudget(t *testing.T) {
	const tib = uint64(1) << 40
	entry := func(start, size uint64) iotlbEntry { return iotlbEntry{Start: start, Last: start + size - 1} }
	for _, tc := range []struct {
		name    string
		entries []iotlbEntry
		refused int // index of the first entry refused, -1 for none
	}{
		{"guest RAM in two blocks", []iotlbEntry{entry(0, 2<<30), entry(4<<30, 6<<30)}, -1},
		{"exactly the byte bound", []iotlbEntry{entry(0, 8*tib), entry(8*tib, 8*tib)}, -1},
		{"a page past the byte bound", []iotlbEntry{entry(0, 8*tib), entry(8*tib, 8*tib), entry(16*tib, 4096)}, 2},
		{"the whole 64-bit space", []iotlbEntry{{Start: 0, Last: ^uint64(0)}}, 0},
		{"inverted range left to mapEntry", []iotlbEntry{{Start: 4096, Last: 0}}, -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b iovaBudget
			got := -1
			for i, e := range tc.entries {
				if err := b.take(e); err != nil {
					require.ErrorIs(t, err, ErrBadRequest)
					got = i
					break
				}
			}
			assert.Equal(t, tc.refused, got)
			assert.LessOrEqual(t, b.bytes, uint64(maxIOVAMapped))
		})
	}
	t.Run("entry count", func(t *testing.T) {
		var b iovaBudget
		for i := 0; i < maxIOTLBEntries; i++ {
			require.NoError(t, b.take(entry(uint64(i)<<12, 4096)))
		}
		err := b.take(entry(uint64(maxIOTLBEntries)<<12, 4096))
		require.ErrorIs(t, err, ErrBadRequest)
		assert.Contains(t, err.Error(), "entries")
		assert.Equal(t, maxIOTLBEntries, b.entries)
	})
}
