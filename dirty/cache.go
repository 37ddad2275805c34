package dirty

import (
	"math/bits"

	"github.com/vdpakit/vdpakit/internal/guestatomic"
)

// CacheWords is how many log words a Cache holds. The cache is
// direct-mapped: log word w has entry w % CacheWords, so consecutive words
// (the pages of a buffer pool, the used ring) never evict one another, and a
// mark for a word whose entry holds another one applies that one first.
const CacheWords = 16

// Cache collects the marks of one writer (a device queue's goroutine) and
// applies them to its Bitmap at Flush, with one atomic OR per distinct log
// word instead of one per mark. A device that logs a burst of buffers, used
// entries and the used index into a few pages pays the locked instruction
// once per word and burst; a mark into a word already cached is a plain OR.
// On a private bitmap (New without Options.Shared), a one-page mark whose
// bit the bitmap already holds is dropped at once, as Bitmap.Mark would
// skip it, so a steady stream of marks into pages dirty since the last
// harvest leaves nothing to flush.
//
// Ordering: a mark reaches the log at Flush, or earlier when another word
// evicts it. Those atomic ORs are sequentially consistent, so every write
// the goroutine made before them happens before any Harvest swap that
// returns their bits — the guarantee Bitmap.Mark gives, moved to the flush.
// A dropped mark is ordered as a Bitmap.Mark that skipped its OR is: by
// the barrier that ends the harvest taking the bit (see the package doc).
// The owner must therefore Flush after the writes it marked and before the
// log is harvested for the last time (when the device has stopped). A
// pre-copy harvest that runs while marks are still cached is safe: the
// pages are marked by the later Flush and sent in a later round. vring's
// DeviceQueue flushes a Cache given as its WriteLogger at the end of every
// push, and the servers in package vdpa flush it once the handler has
// stopped the queue.
//
// A Cache is not safe for concurrent use: give each queue its own. Many
// Caches (and Bitmap.Mark callers) may share one Bitmap. The zero Cache is
// not usable; make one with Bitmap.NewCache.
type Cache struct {
	b *Bitmap
	// used has bit i set when entry i holds marks: bits[i] (in host
	// order) for log word word[i]. An empty entry has bits[i] == 0 and
	// keeps the word it last held (noWord at first, which no log word
	// matches), so that a burst marking the words of the previous one
	// finds them in place.
	used uint32
	word [CacheWords]uint64
	bits [CacheWords]uint64
}

// noWord is the word of a never-used entry: a log has at most MaxSize/8
// words.
const noWord = ^uint64(0)

// NewCache returns an empty Cache that flushes into b.
func (b *Bitmap) NewCache() *Cache {
	c := &Cache{b: b}
	for i := range c.word {
		c.word[i] = noWord
	}
	return c
}

// Bitmap returns the bitmap the cache flushes into.
func (c *Cache) Bitmap() *Bitmap { return c.b }

// Pending returns the number of log words with cached marks.
func (c *Cache) Pending() int { return bits.OnesCount32(c.used) }

// Mark records that the guest byte range [addr, addr+length) was written,
// with the same range rules and errors as Bitmap.Mark (checked now, so
// Flush cannot fail on a range). The bits reach the log at Flush.
func (c *Cache) Mark(addr, length uint64) error {
	// Fast path: one page inside the span, as in Bitmap.Mark.
	b := c.b
	if addr < b.span && length-1 < b.span-addr {
		sh := b.shift & 63
		p := addr >> sh
		if (addr+length-1)>>sh == p {
			w, bit := p>>6, uint64(1)<<(p&63)
			if b.probe && guestatomic.Load64(&b.words[w])&toLE(bit) != 0 {
				// Set already, and the bitmap allows skipping it (see
				// Bitmap.probe): nothing to cache or flush.
				return nil
			}
			if i := w & (CacheWords - 1); c.word[i] == w {
				c.bits[i] |= bit
				c.used |= 1 << i
				return nil
			}
			c.add(w, bit)
			return nil
		}
	}
	return c.markSlow(addr, length)
}

// add puts bit for word w into w's entry, applying the marks of the word
// the entry held, if any. It is kept out of line: Mark's hit path is
// shorter without it.
//
//go:noinline
func (c *Cache) add(w, bit uint64) {
	i := w & (CacheWords - 1)
	if c.used&(1<<i) != 0 {
		if c.word[i] == w { // Mark checks this; markSlow does not
			c.bits[i] |= bit
			return
		}
		// Ordering: sequentially consistent, as in Bitmap.Mark.
		guestatomic.Or64(&c.b.words[c.word[i]], toLE(c.bits[i]))
	}
	c.word[i], c.bits[i] = w, bit
	c.used |= 1 << i
}

// markSlow is Mark for zero-length, multi-page and rejected ranges.
// Ranges of up to four words go through the cache; longer ones (bulk
// writes, where one atomic per word is cheap next to the write) are ORed
// into the log directly, which is as ordered as a flush.
//
//go:noinline
func (c *Cache) markSlow(addr, length uint64) error {
	if length == 0 {
		return nil
	}
	b := c.b
	last := addr + length - 1
	if last < addr || last >= b.span {
		if b.closed {
			return ErrClosed
		}
		return &RangeError{Addr: addr, Len: length, Span: b.span}
	}
	first, lastPage := addr>>b.shift, last>>b.shift
	w0, w1 := first>>6, lastPage>>6
	if w1-w0 >= 4 {
		b.markPages(first, lastPage)
		return nil
	}
	for w := w0; w <= w1; w++ {
		m := ^uint64(0)
		if w == w0 {
			m &= ^uint64(0) << (first & 63)
		}
		if w == w1 {
			m &= ^uint64(0) >> (63 - lastPage&63)
		}
		c.add(w, m)
	}
	return nil
}

// LogWrite is Mark under vring's WriteLogger name, so a Cache can be a
// device queue's logger. On a nil *Cache it reports ErrClosed, as
// Bitmap.LogWrite does.
func (c *Cache) LogWrite(addr, length uint64) error {
	if c == nil {
		return ErrClosed
	}
	return c.Mark(addr, length)
}

// Flush ORs every cached mark into the bitmap and empties the cache. It
// returns ErrClosed, dropping the marks, if the bitmap has been closed.
func (c *Cache) Flush() error {
	if c.used == 0 {
		return nil
	}
	if c.b.closed {
		c.empty()
		return ErrClosed
	}
	ws := c.b.words
	for m := c.used; m != 0; m &= m - 1 {
		i := bits.TrailingZeros32(m) & (CacheWords - 1)
		// Ordering: sequentially consistent, as in Bitmap.Mark. The word
		// was checked against the span when it was cached, and a bitmap's
		// words do not change until Close.
		guestatomic.Or64(&ws[c.word[i]], toLE(c.bits[i]))
		c.bits[i] = 0
	}
	c.used = 0
	return nil
}

// empty drops every cached mark.
func (c *Cache) empty() {
	clear(c.bits[:])
	c.used = 0
}

// FlushLog is Flush under the name vring's LogFlusher interface uses. On a
// nil *Cache it reports ErrClosed.
func (c *Cache) FlushLog() error {
	if c == nil {
		return ErrClosed
	}
	return c.Flush()
}
