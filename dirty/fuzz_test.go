package dirty_test

import (
	"testing"
)

// FuzzMarkHarvest decodes its input into a bitmap geometry (page size, span,
// possibly reaching 2^64) and a sequence of operations — Mark with ranges
// biased to span edges, page edges and 2^64, Harvest, HarvestWords, harvest
// and put back, Union, Clear, PageDirty — and checks every step against the
// map-of-pages oracle. Seeds live in testdata/fuzz/FuzzMarkHarvest.
func FuzzMarkHarvest(f *testing.F) {
	f.Add([]byte{0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		runOps(t, &opReader{data: data}, heapBitmap(t))
	})
}
