package dirty_test

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/internal/abbench"
)

const tib = 1 << 40

// newTouched returns a clean bitmap whose memory has been written once, so
// that the benchmarks read real pages (as a log the kernel or a peer wrote
// is), not the kernel's shared zero page that never-touched anonymous
// memory reads from.
func newTouched(b *testing.B, span uint64) *dirty.Bitmap {
	bm, err := dirty.New(span, nil)
	require.NoError(b, err)
	require.NoError(b, bm.Mark(0, span))
	require.NoError(b, bm.Clear())
	return bm
}

// BenchmarkMarkPage marks one page per call (the same page, with the word
// in cache: on a bitmap from New, a load that finds the bit set; see
// BenchmarkMarkPageClean for the atomic OR).
func BenchmarkMarkPage(b *testing.B) {
	bm, err := dirty.New(1<<30, nil)
	require.NoError(b, err)
	b.ReportAllocs()
	for b.Loop() {
		if err := bm.Mark(0x12345678, 8); err != nil {
			b.Fatal(err)
		}
	}
}

// emptyMark has Mark's signature and does nothing. It is not inlined, as
// Mark is not (it is over the inliner's budget, and devices call it through
// vring's WriteLogger interface): calling it is the floor under Mark's cost.
//
//go:noinline
func emptyMark(b *dirty.Bitmap, addr, length uint64) error { return nil }

// BenchmarkMarkPageVsCall measures BenchmarkMarkPage's Mark (A) against a
// call of emptyMark (B) with abbench.Run, in alternating slices of 65536
// calls each on one locked thread timed by its CPU clock, so that both
// sides see the same state of the machine. Besides each side's median ns
// per call (A-ns/op, B-ns/op) it reports their difference (A-B-ns/op):
// what Mark's own work costs above the call that any non-inlined Mark
// pays.
func BenchmarkMarkPageVsCall(b *testing.B) {
	bm, err := dirty.New(1<<30, nil)
	require.NoError(b, err)
	ma, mb := abbench.Run(b, 1<<16, func(n int) {
		for range n {
			if err := bm.Mark(0x12345678, 8); err != nil {
				b.Fatal(err)
			}
		}
	}, func(n int) {
		for range n {
			if err := emptyMark(bm, 0x12345678, 8); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.ReportMetric(ma-mb, "A-B-ns/op")
}

// BenchmarkMarkPageClean marks pages whose bits are clear: page 0, 1, 2,
// ... of a 1 TiB guest's log, each once until the 268 million pages wrap.
// This is a mark's cost right after a harvest; BenchmarkMarkPage's is the
// cost of marking a page again, which on a bitmap from New skips the
// atomic OR.
func BenchmarkMarkPageClean(b *testing.B) {
	const span = 1 << 40
	bm, err := dirty.New(span, nil)
	require.NoError(b, err)
	b.ReportAllocs()
	var addr uint64
	for b.Loop() {
		if err := bm.Mark(addr, 8); err != nil {
			b.Fatal(err)
		}
		addr = (addr + dirty.DefaultPageSize) & (span - 1)
	}
}

// spread returns a 64 GiB guest's log and 4096 pseudo-random addresses in
// it (a fixed seed: every run marks the same pages).
func spread(b *testing.B) (*dirty.Bitmap, []uint64) {
	const span = 64 << 30
	bm, err := dirty.New(span, nil)
	require.NoError(b, err)
	addrs := make([]uint64, 4096)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range addrs {
		addrs[i] = r.Uint64N(span - 64)
	}
	return bm, addrs
}

// BenchmarkMarkPageSpread marks one page per call at pseudo-random addresses
// of a 64 GiB guest (2 MiB of bitmap: the word is usually not in L1).
func BenchmarkMarkPageSpread(b *testing.B) {
	bm, addrs := spread(b)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if err := bm.Mark(addrs[i&4095], 64); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

// BenchmarkCacheMarkPage is BenchmarkMarkPage through a Cache flushed
// every 32 marks (a device's burst): the mark is a plain OR into the cached
// word and the flush's one atomic OR is shared by the burst.
func BenchmarkCacheMarkPage(b *testing.B) {
	bm, err := dirty.New(1<<30, nil)
	require.NoError(b, err)
	c := bm.NewCache()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if err := c.Mark(0x12345678, 8); err != nil {
			b.Fatal(err)
		}
		if i++; i&31 == 0 {
			_ = c.Flush()
		}
	}
	require.NoError(b, c.Flush())
}

// BenchmarkCacheMarkPageSpread is BenchmarkMarkPageSpread through a Cache
// flushed every 32 marks: with random pages of a 64 GiB guest nearly every
// mark is a word of its own, so this is the cache's worst case (an eviction
// and the same atomic per page).
func BenchmarkCacheMarkPageSpread(b *testing.B) {
	bm, addrs := spread(b)
	c := bm.NewCache()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if err := c.Mark(addrs[i&4095], 64); err != nil {
			b.Fatal(err)
		}
		if i++; i&31 == 0 {
			_ = c.Flush()
		}
	}
	require.NoError(b, c.Flush())
}

// BenchmarkMarkRange64K marks a 64 KiB range (16 pages, unaligned so that it
// touches 17) per call.
func BenchmarkMarkRange64K(b *testing.B) {
	bm, err := dirty.New(1<<30, nil)
	require.NoError(b, err)
	b.ReportAllocs()
	for b.Loop() {
		if err := bm.Mark(0x3f800, 64<<10); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkHarvestClean1TiB harvests a clean bitmap covering a 1 TiB guest
// (32 MiB of log). The reported MB/s is bitmap bytes scanned per second.
func BenchmarkHarvestClean1TiB(b *testing.B) {
	src, dst := newTouched(b, tib), newTouched(b, tib)
	b.ReportAllocs()
	b.SetBytes(int64(src.Size()))
	for b.Loop() {
		n, err := src.Harvest(dst)
		if err != nil || n != 0 {
			b.Fatal(n, err)
		}
	}
}

// BenchmarkHarvestWordsClean1TiB is BenchmarkHarvestClean1TiB into a
// []uint64.
func BenchmarkHarvestWordsClean1TiB(b *testing.B) {
	src := newTouched(b, tib)
	dst := make([]uint64, src.Words())
	b.ReportAllocs()
	b.SetBytes(int64(src.Size()))
	for b.Loop() {
		n, err := src.HarvestWords(dst)
		if err != nil || n != 0 {
			b.Fatal(n, err)
		}
	}
}

// BenchmarkHarvest1TiB1Percent harvests a 1 TiB guest's bitmap with 1% of its
// pages dirty (scattered at random), re-marking them between iterations with
// the timer stopped.
func BenchmarkHarvest1TiB1Percent(b *testing.B) {
	src, dirtyPages := onePercent(b)
	dst := newTouched(b, tib)
	b.ReportAllocs()
	b.SetBytes(int64(src.Size()))
	for b.Loop() {
		b.StopTimer()
		for _, p := range dirtyPages {
			_ = src.Mark(p*dirty.DefaultPageSize, 1)
		}
		b.StartTimer()
		if _, err := src.Harvest(dst); err != nil {
			b.Fatal(err)
		}
	}
}

// onePercent returns a 1 TiB log and 1% of its pages, scattered at random.
func onePercent(b *testing.B) (*dirty.Bitmap, []uint64) {
	src := newTouched(b, tib)
	pages := src.NumPages()
	dirtyPages := make([]uint64, pages/100)
	r := rand.New(rand.NewPCG(3, 4))
	for i := range dirtyPages {
		dirtyPages[i] = r.Uint64N(pages)
	}
	return src, dirtyPages
}

// BenchmarkHarvestWords1TiB1Percent is BenchmarkHarvest1TiB1Percent into a
// []uint64 (plain stores into the destination).
func BenchmarkHarvestWords1TiB1Percent(b *testing.B) {
	src, dirtyPages := onePercent(b)
	dst := make([]uint64, src.Words())
	b.ReportAllocs()
	b.SetBytes(int64(src.Size()))
	for b.Loop() {
		b.StopTimer()
		for _, p := range dirtyPages {
			_ = src.Mark(p*dirty.DefaultPageSize, 1)
		}
		b.StartTimer()
		if _, err := src.HarvestWords(dst); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkIterate1TiB1Percent walks the runs of a 1 TiB log with 1% of its
// pages dirty, as a sender does after a harvest.
func BenchmarkIterate1TiB1Percent(b *testing.B) {
	src, dirtyPages := onePercent(b)
	for _, p := range dirtyPages {
		_ = src.Mark(p*dirty.DefaultPageSize, 1)
	}
	b.ReportAllocs()
	b.SetBytes(int64(src.Size()))
	var sink uint64
	for b.Loop() {
		for first, n := range src.DirtyRuns() {
			sink += first + n
		}
	}
	_ = sink
}

// newSharedTouched is newTouched for a shared (memfd) log: every page of it
// exists, so a scan reads one data run.
func newSharedTouched(b *testing.B, span uint64) *dirty.Bitmap {
	bm, err := dirty.New(span, &dirty.Options{Shared: true})
	require.NoError(b, err)
	b.Cleanup(func() { bm.Close() })
	require.NoError(b, bm.Mark(0, span))
	require.NoError(b, bm.Clear())
	return bm
}

// BenchmarkHarvestCleanShared1TiB is BenchmarkHarvestClean1TiB for a shared
// log whose every page was written once: the cost of asking the memfd for
// its data runs (SEEK_DATA, SEEK_HOLE) on top of the scan.
func BenchmarkHarvestCleanShared1TiB(b *testing.B) {
	src, dst := newSharedTouched(b, tib), newTouched(b, tib)
	b.ReportAllocs()
	b.SetBytes(int64(src.Size()))
	for b.Loop() {
		n, err := src.Harvest(dst)
		if err != nil || n != 0 {
			b.Fatal(n, err)
		}
	}
}

// BenchmarkHarvestSparseShared1TiB harvests a clean shared 1 TiB log of
// which every other page exists (a page of log written, then one never
// written): the worst case for skipping holes, one data run per log page.
func BenchmarkHarvestSparseShared1TiB(b *testing.B) {
	src, err := dirty.New(tib, &dirty.Options{Shared: true})
	require.NoError(b, err)
	b.Cleanup(func() { src.Close() })
	const logPage = 4096 * 8 * dirty.DefaultPageSize // guest bytes per page of log
	for a := uint64(0); a < tib; a += 2 * logPage {
		require.NoError(b, src.Mark(a, 1))
	}
	require.NoError(b, src.Clear())
	dst := newTouched(b, tib)
	b.ReportAllocs()
	b.SetBytes(int64(src.Size()))
	for b.Loop() {
		n, err := src.Harvest(dst)
		if err != nil || n != 0 {
			b.Fatal(n, err)
		}
	}
}
