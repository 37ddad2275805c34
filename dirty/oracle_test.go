package dirty_test

import (
	"math"
	"math/big"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
)

// The oracle: a map of dirty pages, and range arithmetic done in big
// integers so that it shares no overflow reasoning with the code under test.

type oracle struct {
	span  uint64
	shift uint
	pages map[uint64]bool
}

func (o *oracle) numPages() uint64 {
	ps := new(big.Int).Lsh(big.NewInt(1), o.shift)
	n := new(big.Int).SetUint64(o.span)
	n.Add(n, ps).Sub(n, big.NewInt(1)).Div(n, ps)
	return n.Uint64()
}

// mark returns whether the range is accepted and whether it wraps past 2^64,
// and applies it.
func (o *oracle) mark(addr, length uint64) (ok, wraps bool) {
	if length == 0 {
		return true, false
	}
	end := new(big.Int).SetUint64(addr)
	end.Add(end, new(big.Int).SetUint64(length)) // one past the last byte
	two64 := new(big.Int).Lsh(big.NewInt(1), 64)
	if end.Cmp(two64) > 0 {
		return false, true
	}
	if end.Cmp(new(big.Int).SetUint64(o.span)) > 0 {
		return false, false
	}
	last := new(big.Int).Sub(end, big.NewInt(1))
	first := new(big.Int).Rsh(new(big.Int).SetUint64(addr), o.shift)
	last.Rsh(last, o.shift)
	for p := first.Uint64(); p <= last.Uint64(); p++ {
		o.pages[p] = true
	}
	return true, false
}

func (o *oracle) sorted() []uint64 {
	out := make([]uint64, 0, len(o.pages))
	for p := range o.pages {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

// runsOf turns sorted pages into maximal runs.
func runsOf(pages []uint64) [][2]uint64 {
	var runs [][2]uint64
	for _, p := range pages {
		if n := len(runs); n > 0 && runs[n-1][0]+runs[n-1][1] == p {
			runs[n-1][1]++
			continue
		}
		runs = append(runs, [2]uint64{p, 1})
	}
	return runs
}

func pagesOfWords(words []uint64) []uint64 {
	var out []uint64
	for i, w := range words {
		for b := range 64 {
			if w&(1<<b) != 0 {
				out = append(out, uint64(i)*64+uint64(b))
			}
		}
	}
	return out
}

func runsOfBitmap(b *dirty.Bitmap) [][2]uint64 {
	var runs [][2]uint64
	for f, n := range b.DirtyRuns() {
		runs = append(runs, [2]uint64{f, n})
	}
	return runs
}

// opReader decodes a byte string into a bitmap geometry and a sequence of
// operations. The property test feeds it seeded random bytes, the fuzzer its
// inputs; running out of bytes ends the sequence.
type opReader struct{ data []byte }

func (r *opReader) more() bool { return len(r.data) > 0 }

func (r *opReader) byte() byte {
	if len(r.data) == 0 {
		return 0
	}
	b := r.data[0]
	r.data = r.data[1:]
	return b
}

func (r *opReader) u64() uint64 {
	var v uint64
	for i := range 8 {
		v |= uint64(r.byte()) << (8 * i)
	}
	return v
}

var pageShifts = []uint{12, 0, 3, 9, 16, 21, 40, 52, 57, 63}

// geometry picks a page size and a span of at most a few thousand pages,
// including spans whose last page is partial and spans reaching up to
// 2^64-1.
func (r *opReader) geometry() (span uint64, shift uint) {
	shift = pageShifts[int(r.byte())%len(pageShifts)]
	maxPages := uint64(3000)
	if shift > 52 {
		maxPages = 1 << (64 - shift) // the whole 64-bit space at most
	}
	pages := 1 + (uint64(r.byte())|uint64(r.byte())<<8)%maxPages
	cut := r.u64() & (1<<shift - 1) // bytes short of whole pages
	if pages == 1<<(64-shift) {     // the whole space: cap at 2^64-1
		span = math.MaxUint64 - cut
	} else {
		span = pages<<shift - cut
	}
	if span == 0 {
		span = 1
	}
	return span, shift
}

// addr picks an address, biased to the interesting places.
func (r *opReader) addr(span uint64, shift uint) uint64 {
	v := r.u64()
	ps := uint64(1) << shift
	switch r.byte() % 10 {
	case 0:
		return v % span
	case 1:
		return span - 1 - v%min(span, 16)
	case 2:
		return span + v%16 // just past the span (may wrap near 2^64: fine)
	case 3:
		return math.MaxUint64 - v%32
	case 4:
		return (v%span)&^(ps-1) + ps - 1 // last byte of a page
	case 5:
		return (v % span) &^ (ps - 1) // first byte of a page
	case 6:
		return 0
	case 7:
		return v
	default:
		return v % span
	}
}

// length picks a length for a range starting at addr.
func (r *opReader) length(addr, span uint64, shift uint) uint64 {
	v := r.u64()
	ps := uint64(1) << shift
	switch r.byte() % 12 {
	case 0:
		return 0
	case 1:
		return 1
	case 2:
		return ps - 1 + v%3 // around one page
	case 3:
		return span - addr // exactly to the end of the span (if addr < span)
	case 4:
		return span - addr + 1 // one byte too far
	case 5:
		return -addr // exactly to 2^64 (0 when addr is 0)
	case 6:
		return -addr + 1 + v%4 // wraps past 2^64
	case 7:
		return v
	case 8:
		return v % (3 * ps)
	default:
		return 1 + v%(span/4+1)
	}
}

// runOps executes a decoded operation sequence against the bitmap and the
// oracle, checking them against each other after every operation.
func runOps(t testing.TB, r *opReader, newBitmap func(span uint64, shift uint) *dirty.Bitmap) {
	span, shift := r.geometry()
	b := newBitmap(span, shift)
	o := &oracle{span: span, shift: shift, pages: map[uint64]bool{}}
	require.Equal(t, o.numPages(), b.NumPages(), "span %#x shift %d", span, shift)
	// Pages ever harvested into acc, which accumulates across HarvestWords.
	acc := make([]uint64, b.Words())
	accOracle := map[uint64]bool{}

	check := func(what string) {
		want := o.sorted()
		got := collect(b)
		if len(want) == 0 {
			want = nil
		}
		require.Equal(t, want, got, "%s: dirty pages (span %#x, page shift %d)", what, span, shift)
		require.Equal(t, uint64(len(want)), b.Count(), what)
		require.Equal(t, runsOf(want), runsOfBitmap(b), "%s: runs", what)
	}

	for step := 0; r.more() && step < 200; step++ {
		switch op := r.byte() % 8; op {
		case 0, 1, 2: // mark (most common)
			addr := r.addr(span, shift)
			length := r.length(addr, span, shift)
			ok, wraps := o.mark(addr, length)
			err := b.Mark(addr, length)
			if ok {
				require.NoError(t, err, "Mark(%#x, %#x) span %#x", addr, length, span)
			} else {
				require.ErrorIs(t, err, dirty.ErrOutOfSpan, "Mark(%#x, %#x) span %#x", addr, length, span)
				var re *dirty.RangeError
				require.ErrorAs(t, err, &re)
				require.Equal(t, dirty.RangeError{Addr: addr, Len: length, Span: span}, *re)
				require.Equal(t, wraps, re.Wraps())
			}
			check("after mark")
		case 3: // harvest into a fresh bitmap
			dst, err := dirty.New(span, &dirty.Options{PageSize: 1 << shift})
			require.NoError(t, err)
			n, err := b.Harvest(dst)
			require.NoError(t, err)
			want := o.sorted()
			require.Equal(t, uint64(len(want)), n, "harvest count")
			require.Equal(t, want, append([]uint64{}, collect(dst)...), "harvested pages")
			clear(o.pages)
			check("after harvest")
		case 4: // harvest into the accumulating word slice
			n, err := b.HarvestWords(acc)
			require.NoError(t, err)
			require.Equal(t, uint64(len(o.pages)), n)
			for p := range o.pages {
				accOracle[p] = true
			}
			clear(o.pages)
			got := pagesOfWords(acc)
			require.Equal(t, len(accOracle), len(got), "accumulated harvests")
			for _, p := range got {
				require.True(t, accOracle[p], "page %d accumulated but never marked", p)
			}
			check("after harvest words")
		case 5: // harvest, fail, put back: nothing may be lost
			if r.byte()%2 == 0 {
				dst, err := dirty.New(span, &dirty.Options{PageSize: 1 << shift})
				require.NoError(t, err)
				_, err = b.Harvest(dst)
				require.NoError(t, err)
				require.Zero(t, b.Count())
				require.NoError(t, b.Union(dst))
			} else {
				words := make([]uint64, b.Words())
				_, err := b.HarvestWords(words)
				require.NoError(t, err)
				require.NoError(t, b.UnionWords(words))
			}
			check("after put back")
		case 6: // union with another bitmap's marks
			other, err := dirty.New(span, &dirty.Options{PageSize: 1 << shift})
			require.NoError(t, err)
			for range int(r.byte() % 4) {
				addr := r.addr(span, shift)
				length := r.length(addr, span, shift)
				if ok, _ := o.mark(addr, length); ok {
					require.NoError(t, other.Mark(addr, length))
				}
			}
			require.NoError(t, b.Union(other))
			check("after union")
		case 7:
			if r.byte()%4 == 0 {
				require.NoError(t, b.Clear())
				clear(o.pages)
				check("after clear")
			} else {
				p := r.u64() % (o.numPages() + 2)
				require.Equal(t, o.pages[p], b.PageDirty(p), "PageDirty(%d)", p)
			}
		}
	}
}

func heapBitmap(t testing.TB) func(span uint64, shift uint) *dirty.Bitmap {
	return func(span uint64, shift uint) *dirty.Bitmap {
		b, err := dirty.New(span, &dirty.Options{PageSize: 1 << shift})
		require.NoError(t, err)
		return b
	}
}

// TestMarkHarvestOracle runs random operation sequences (seeded, so failures
// reproduce) against the oracle, on heap- and memfd-backed bitmaps.
func TestMarkHarvestOracle(t *testing.T) {
	iterations := 400
	if testing.Short() {
		iterations = 50
	}
	rng := rand.New(rand.NewPCG(0x5eed, 0xd1e7))
	for i := range iterations {
		data := make([]byte, 64+rng.IntN(2048))
		for j := range data {
			data[j] = byte(rng.Uint32())
		}
		newBitmap := heapBitmap(t)
		if i%4 == 3 {
			newBitmap = func(span uint64, shift uint) *dirty.Bitmap {
				b, err := dirty.New(span, &dirty.Options{PageSize: 1 << shift, Shared: true})
				require.NoError(t, err)
				t.Cleanup(func() { b.Close() })
				return b
			}
		}
		runOps(t, &opReader{data: data}, newBitmap)
	}
}
