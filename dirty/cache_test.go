package dirty_test

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vring"
)

// A Cache is a WriteLogger that a queue flushes.
var _ interface {
	vring.WriteLogger
	vring.LogFlusher
} = (*dirty.Cache)(nil)

// TestCacheMarkRules checks each range rule of Cache.Mark against
// Bitmap.Mark on a second bitmap: the same error, and after Flush the same
// words. Ranges that stay within four log words must not reach the log
// before Flush; longer ones are written through.
func TestCacheMarkRules(t *testing.T) {
	const span = 1 << 30 // 262144 pages, 4096 words
	page := uint64(dirty.DefaultPageSize)
	cases := []struct {
		name        string
		addr, len   uint64
		err         error
		writeThough bool
	}{
		{name: "one byte", addr: 0x1234, len: 1},
		{name: "one page exactly", addr: 5 * page, len: page},
		{name: "zero length", addr: 0x5000, len: 0},
		{name: "two pages in one word", addr: 3*page - 1, len: 2},
		{name: "across a word boundary", addr: 63 * page, len: 2 * page},
		{name: "four words", addr: 10 * page, len: 4*64*page - 20*page},
		{name: "five words, written through", addr: 64 * page, len: 5 * 64 * page, writeThough: true},
		{name: "last byte of the span", addr: span - 1, len: 1},
		{name: "whole span", addr: 0, len: span, writeThough: true},
		{name: "starts past the span", addr: span, len: 1, err: dirty.ErrOutOfSpan},
		{name: "ends past the span", addr: span - 1, len: 2, err: dirty.ErrOutOfSpan},
		{name: "wraps past 2^64", addr: ^uint64(0) - 10, len: 100, err: dirty.ErrOutOfSpan},
		{name: "length 2^64-1", addr: 1, len: ^uint64(0), err: dirty.ErrOutOfSpan},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			want, got := mustNew(t, span), mustNew(t, span)
			c := got.NewCache()
			require.Same(t, got, c.Bitmap())
			werr := want.Mark(tc.addr, tc.len)
			err := c.Mark(tc.addr, tc.len)
			if tc.err != nil {
				require.ErrorIs(t, werr, tc.err)
				require.ErrorIs(t, err, tc.err)
				var re *dirty.RangeError
				require.ErrorAs(t, err, &re)
				assert.Equal(t, dirty.RangeError{Addr: tc.addr, Len: tc.len, Span: span}, *re)
			} else {
				require.NoError(t, werr)
				require.NoError(t, err)
			}
			if !tc.writeThough {
				assert.Zero(t, got.Count(), "marks reached the log before Flush")
			}
			require.NoError(t, c.Flush())
			assert.Zero(t, c.Pending())
			assert.Equal(t, collect(want), collect(got))
			assert.Equal(t, want.Count(), got.Count())
		})
	}
}

// TestCacheSameWordMerges marks pages of one word and of a second word in
// turn: the cache holds one entry per word, whatever the order.
func TestCacheSameWordMerges(t *testing.T) {
	b := mustNew(t, 1<<30)
	c := b.NewCache()
	page := uint64(dirty.DefaultPageSize)
	for i := range uint64(64) {
		require.NoError(t, c.Mark(i*page, 8))         // word 0
		require.NoError(t, c.Mark((640+i)*page+7, 9)) // word 10
	}
	assert.Equal(t, 2, c.Pending())
	assert.Zero(t, b.Count())
	require.NoError(t, c.Flush())
	assert.Equal(t, uint64(128), b.Count())
	for i := range uint64(64) {
		assert.True(t, b.PageDirty(i))
		assert.True(t, b.PageDirty(640+i))
	}
}

// TestCacheEviction: CacheWords consecutive words all stay cached; a word
// that maps to an occupied entry applies that entry's marks first.
func TestCacheEviction(t *testing.T) {
	b := mustNew(t, 1<<30)
	c := b.NewCache()
	word := func(w int) uint64 { return uint64(w) * 64 * dirty.DefaultPageSize }
	for w := range dirty.CacheWords {
		require.NoError(t, c.Mark(word(100+w)+100, 1))
	}
	assert.Equal(t, dirty.CacheWords, c.Pending())
	assert.Zero(t, b.Count())
	// Word 100+CacheWords maps to word 100's entry.
	require.NoError(t, c.Mark(word(100+dirty.CacheWords)+100, 1))
	assert.Equal(t, dirty.CacheWords, c.Pending())
	assert.Equal(t, []uint64{100 * 64}, collect(b), "the evicted word was applied")
	// Marking word 100 again evicts the newcomer in turn.
	require.NoError(t, c.Mark(word(100)+4096, 1))
	assert.Equal(t, []uint64{100 * 64, (100 + dirty.CacheWords) * 64}, collect(b))
	require.NoError(t, c.Flush())
	assert.Equal(t, uint64(dirty.CacheWords+2), b.Count())
	assert.True(t, b.PageDirty(100*64+1))
}

// TestCacheAfterClose: a Flush into a closed bitmap reports ErrClosed and
// drops the marks; a Mark after Close reports ErrClosed. Neither touches
// the unmapped words.
func TestCacheAfterClose(t *testing.T) {
	b, err := dirty.New(1<<30, &dirty.Options{Shared: true})
	require.NoError(t, err)
	c := b.NewCache()
	require.NoError(t, c.Mark(0x1000, 8))
	require.NoError(t, b.Close())
	require.ErrorIs(t, c.Flush(), dirty.ErrClosed)
	assert.Zero(t, c.Pending())
	require.ErrorIs(t, c.Mark(0x1000, 8), dirty.ErrClosed)
	require.ErrorIs(t, c.LogWrite(0x1000, 4096*300), dirty.ErrClosed)
	require.NoError(t, c.Flush(), "nothing cached")
}

// TestCacheOracle marks random ranges (biased to word and page edges)
// through a Cache and directly into a second bitmap, flushing at random
// points and harvesting the cached bitmap in between: after each flush the
// union of what was harvested and what is in the log equals the direct
// bitmap.
func TestCacheOracle(t *testing.T) {
	const span = 64 << 20 // 16384 pages, 256 words
	rng := rand.New(rand.NewPCG(0xcac4e, 1))
	for range 200 {
		want, got := mustNew(t, span), mustNew(t, span)
		acc := make([]uint64, got.Words())
		c := got.NewCache()
		for range 1 + rng.IntN(300) {
			var addr, n uint64
			switch rng.IntN(4) {
			case 0: // anywhere, short
				addr, n = rng.Uint64N(span), 1+rng.Uint64N(64)
			case 1: // a few words' worth of pages around a word edge
				addr = rng.Uint64N(256)*64*dirty.DefaultPageSize - rng.Uint64N(3*dirty.DefaultPageSize)
				n = 1 + rng.Uint64N(6*64*dirty.DefaultPageSize)
			case 2: // one of a handful of hot pages
				addr, n = rng.Uint64N(8)*dirty.DefaultPageSize*37, 1
			default: // maybe out of span
				addr, n = span-rng.Uint64N(4*dirty.DefaultPageSize), rng.Uint64N(8*dirty.DefaultPageSize)
			}
			werr, err := want.Mark(addr, n), c.Mark(addr, n)
			if werr != nil {
				require.ErrorIs(t, err, dirty.ErrOutOfSpan)
			} else {
				require.NoError(t, err)
			}
			switch rng.IntN(16) {
			case 0:
				require.NoError(t, c.Flush())
			case 1:
				_, err := got.HarvestWords(acc)
				require.NoError(t, err)
			}
		}
		require.NoError(t, c.Flush())
		require.NoError(t, got.UnionWords(acc))
		require.Equal(t, collect(want), collect(got))
	}
}
