package vfiouser

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// reportDirtyOracle is the DMA_LOGGING_REPORT loop reportDirty replaced
// (one step per log page of every reported page), kept as the oracle.
func reportDirtyOracle(pending []uint64, logPS, iova, length, ps uint64, out []uint64) {
	pages := length / ps
	if length%ps != 0 {
		pages++
	}
	for p := uint64(0); p < pages; p++ {
		start, end := iova+p*ps, iova+length
		if p+1 < pages {
			end = iova + (p+1)*ps
		}
		for a := start &^ (logPS - 1); a < end; a += logPS {
			bit := a / logPS
			w := bit / 64
			if w >= uint64(len(pending)) {
				break
			}
			if pending[w]&(1<<(bit%64)) != 0 {
				out[p/64] |= 1 << (p % 64)
				pending[w] &^= 1 << (bit % 64)
			}
		}
	}
}

// TestReportDirtyMatchesTheOldLoop: for logs of every density, page sizes
// from the log's to far beyond the log, and ranges inside, across and past
// the log's end, with lengths that are not multiples of the page size, the
// report and what stays pending are bit for bit those of the old loop.
func TestReportDirtyMatchesTheOldLoop(t *testing.T) {
	const logPS = 4096
	rng := rand.New(rand.NewPCG(1, 2))
	cases := 0
	logs := map[string]func(n int) []uint64{
		"empty": func(n int) []uint64 { return make([]uint64, n) },
		"full": func(n int) []uint64 {
			b := make([]uint64, n)
			for i := range b {
				b[i] = ^uint64(0)
			}
			return b
		},
		"sparse": func(n int) []uint64 {
			b := make([]uint64, n)
			for i := range b {
				b[i] = 1 << rng.IntN(64)
				if rng.IntN(3) == 0 {
					b[i] = 0
				}
			}
			return b
		},
		"random": func(n int) []uint64 {
			b := make([]uint64, n)
			for i := range b {
				b[i] = rng.Uint64()
			}
			return b
		},
		"edges": func(n int) []uint64 {
			b := make([]uint64, n)
			b[0], b[n-1] = 1, 1<<63
			return b
		},
	}
	type rangeCase struct{ iovaPages, length uint64 } // iova in ps pages
	for _, words := range []int{1, 3, 17} {
		span := uint64(words) * 64 * logPS
		for name, mk := range logs {
			for _, ps := range []uint64{4096, 8192, 64 << 10, 1 << 20, 2 << 20, 1 << 30, 1 << 40} {
				ranges := []rangeCase{
					{0, 1}, {0, logPS}, {0, ps}, {0, span}, {0, span - 1}, {0, span + 1},
					{0, 3*ps + 1}, {1, ps}, {1, 5*logPS + 7}, {2, 64 * logPS},
					{0, 1 << 40}, {0, ^uint64(0) - 2*ps}, {1, span},
					{span / ps, ps}, {span/ps + 1, 1}, {span / ps / 2, span},
				}
				for _, k := range []uint64{1, 2, 62, 63, 64, 65, 127, 129} {
					ranges = append(ranges, rangeCase{0, k*logPS - 1}, rangeCase{0, k * logPS}, rangeCase{1, k*logPS + 1})
				}
				for i := 0; i < 8; i++ {
					ranges = append(ranges, rangeCase{uint64(rng.IntN(int(span/ps) + 2)), 1 + rng.Uint64N(2*span)})
				}
				for _, rc := range ranges {
					iova := rc.iovaPages * ps
					length := rc.length
					if iova+length < iova {
						continue
					}
					pages := length / ps
					if length%ps != 0 {
						pages++
					}
					if pages > 1<<16 {
						continue // the oracle takes a step per page
					}
					// About 2,300 cases: no subtest each (their -v lines
					// would flood the vmtest console); a failure names its
					// case and stops the test.
					c := fmt.Sprintf("%dw/%s/ps=%#x/%#x+%#x", words, name, ps, iova, length)
					log := mk(words)
					want, wantOut := append([]uint64(nil), log...), make([]uint64, (pages+63)/64)
					reportDirtyOracle(want, logPS, iova, length, ps, wantOut)
					got, gotOut := append([]uint64(nil), log...), make([]uint64, (pages+63)/64)
					visited := reportDirty(got, logPS, iova, length, ps, gotOut)
					require.Equal(t, wantOut, gotOut, "%s: reported pages", c)
					require.Equal(t, want, got, "%s: pages still pending", c)
					require.LessOrEqual(t, visited, words, "%s: words visited", c)
					cases++
				}
			}
		}
	}
	require.Greater(t, cases, 1000, "cases compared")
}

// TestReportDirtyIsBoundedByTheLog: a report of 1 TiB at a 1 TiB page size
// over a 1 TiB log took the old loop 2^28 steps (0.77 s under migMu, per
// 56-byte request); it visits each word of the log once now, and a range
// past the log none.
func TestReportDirtyIsBoundedByTheLog(t *testing.T) {
	const logPS = 4096
	words := int(maxLogSpan / logPS / 64) // a 1 TiB log: 2^22 words
	pending := make([]uint64, words)
	pending[words/2] = 1 << 5
	out := make([]uint64, 1)
	visited := reportDirty(pending, logPS, 0, 1<<40, 1<<40, out)
	assert.Equal(t, words, visited, "words visited")
	assert.Equal(t, []uint64{1}, out, "the one page is dirty")
	assert.Zero(t, pending[words/2], "reported bits are cleared")

	// Past the log: nothing to visit, whatever the length and page size.
	for _, ps := range []uint64{4096, 1 << 40, 1 << 62} {
		out := make([]uint64, 1)
		assert.Zero(t, reportDirty(pending, logPS, ps*(maxLogSpan/ps+1), ps, ps, out))
		assert.Zero(t, out[0])
	}
	// The largest range at the largest page size, from 0.
	out = make([]uint64, 1)
	pending[0] = 1
	assert.Equal(t, words, reportDirty(pending, logPS, 0, ^uint64(0), 1<<63, out))
	assert.Equal(t, []uint64{1}, out)
}

// BenchmarkReportDirtyHugeRange: the whole of a 1 TiB log as one page.
func BenchmarkReportDirtyHugeRange(b *testing.B) {
	pending := make([]uint64, maxLogSpan/4096/64)
	out := make([]uint64, 1)
	for b.Loop() {
		reportDirty(pending, 4096, 0, 1<<40, 1<<40, out)
	}
}
