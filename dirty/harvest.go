package dirty

import (
	"iter"
	"math/bits"

	"github.com/vdpakit/vdpakit/internal/guestatomic"
)

// Harvesting and the whole-bitmap operations scan the log in blocks of
// scanBlock words (two cache lines, 1024 pages). A block is first read with
// atomic loads OR-ed together; only a block with a bit set is looked at word
// by word, and only a non-zero word is swapped. A clean log is therefore read
// once, at close to memory speed, and never written.
//
// Memory ordering: Mark sets bits with an atomic OR and harvesting takes
// them with an atomic swap (sequentially consistent under the Go memory
// model). In each word's modification order a given OR comes either before
// the swap — then the swap returns its bit, and everything the marker wrote
// before marking happens before the harvester's later reads — or after it,
// and the bit stays in the word for the next harvest. No bit is lost and
// none is taken twice. The skip test's loads may miss a bit set an instant
// later; that bit is simply left for the next harvest. A mark that found
// its bit set and skipped the OR (Bitmap.probe) has no store in that
// order; for it, every operation that takes bits out of the log (Harvest,
// HarvestWords, Clear) ends with a process-wide barrier (harvested).
const scanBlock = 16

// nextBlock returns the index of the first block at or after i (a multiple
// of scanBlock) holding a non-zero word, or, when there is none, the index
// where the trailing partial block starts (len(ws) rounded down to
// scanBlock, which may be len(ws) itself). Callers then go through the
// block's words one by one. The loads are atomic (the words are shared with
// markers) and OR-ed in four independent chains so that they issue in
// parallel: this loop is what a harvest of a clean log costs.
func nextBlock(ws []uint64, i int) int {
	for ; i+scanBlock <= len(ws); i += scanBlock {
		s := ws[i : i+scanBlock : i+scanBlock]
		a := guestatomic.Load64(&s[0]) | guestatomic.Load64(&s[1]) |
			guestatomic.Load64(&s[2]) | guestatomic.Load64(&s[3])
		b := guestatomic.Load64(&s[4]) | guestatomic.Load64(&s[5]) |
			guestatomic.Load64(&s[6]) | guestatomic.Load64(&s[7])
		c := guestatomic.Load64(&s[8]) | guestatomic.Load64(&s[9]) |
			guestatomic.Load64(&s[10]) | guestatomic.Load64(&s[11])
		d := guestatomic.Load64(&s[12]) | guestatomic.Load64(&s[13]) |
			guestatomic.Load64(&s[14]) | guestatomic.Load64(&s[15])
		if a|b|c|d != 0 {
			return i
		}
	}
	return i
}

// dataWords returns the first run [lo, hi) of words at or after word i
// that can hold set bits, or lo == hi == Words() when none can. For a
// bitmap in ordinary memory that is every word from i on. For one mapped
// from a file (a shared New, AttachFd) it is the next run of file pages
// that hold data: a page of the file that no one ever wrote (a hole) holds
// only zero bits, and reading it through the mapping would allocate it
// (shmem gives a read fault on a hole a fresh page), so a harvest of a
// large clean log would bring the whole log into memory. Each run costs
// two lseek calls (SEEK_DATA, SEEK_HOLE); a log written densely is one
// run.
//
// Ordering: a bit set by a Mark (here or in a peer) that completed before
// the scan started is in a page that existed before it, so the scan
// visits it; a page that appears during the scan holds bits set during
// the scan, which a harvest may leave for the next one anyway.
func (b *Bitmap) dataWords(i int) (lo, hi int) {
	n := len(b.words)
	if i >= n {
		return n, n
	}
	if !b.sparse {
		return i, n
	}
	start, end, ok := seekData(b.fd, int64(b.fdOffset+uint64(i)*8))
	if !ok {
		return n, n
	}
	// Word w is the 8 bytes at fdOffset+8w; round outwards so a word that
	// straddles a run's edge is kept (they do not: runs are page-aligned
	// and words 8-aligned).
	// Compared before it is made an int: the peer may have grown the file
	// and written far past the log, beyond what an int holds on 32-bit.
	w := (uint64(start) - b.fdOffset) / 8
	if w >= uint64(n) {
		return n, n
	}
	lo = max(i, int(w))
	hi = n
	if end >= 0 {
		if e := (uint64(end) - b.fdOffset + 7) / 8; e < uint64(n) {
			hi = int(e)
		}
	}
	return lo, hi
}

// lastMask returns the mask of the last word's bits that belong to pages
// (all ones when NumPages is a multiple of 64).
func (b *Bitmap) lastMask() uint64 {
	if r := b.pages % 64; r != 0 {
		return 1<<r - 1
	}
	return ^uint64(0)
}

// checkOpen reports ErrClosed for a closed (or nil) bitmap.
func (b *Bitmap) checkOpen() error {
	if b == nil || b.closed {
		return ErrClosed
	}
	return nil
}

// Harvest atomically takes every set bit out of b — each non-zero word is
// swapped with zero — and ORs it into dst, returning the number of bits
// taken. Bits set concurrently are either taken by this call or left for
// the next (see the package doc), never lost. dst must have b's page size and
// cover at least b's pages; it is not cleared first, so harvests accumulate
// (Clear dst when it has been consumed). dst must not be b. Harvest
// allocates nothing.
func (b *Bitmap) Harvest(dst *Bitmap) (uint64, error) {
	if err := b.checkOpen(); err != nil {
		return 0, err
	}
	if err := dst.checkOpen(); err != nil {
		return 0, err
	}
	if dst == b {
		return 0, &GeometryError{Op: "harvest", Reason: "destination is the source"}
	}
	if dst.shift != b.shift || dst.pages < b.pages {
		return 0, geometryMismatch("harvest", b, dst)
	}
	n := len(b.words)
	var taken uint64
	for lo, hi := b.dataWords(0); lo < hi; lo, hi = b.dataWords(hi) {
		m := min(hi, n-1)
		taken += harvestIntoAtomic(b.words[lo:m], dst.words[lo:m])
		// The last word: bits past NumPages name no page; they are
		// cleared with the rest of the word and dropped.
		if hi == n && guestatomic.Load64(&b.words[n-1]) != 0 {
			if w := toLE(guestatomic.Swap64(&b.words[n-1], 0)) & b.lastMask(); w != 0 {
				guestatomic.Or64(&dst.words[n-1], toLE(w))
				taken += uint64(bits.OnesCount64(w))
			}
		}
	}
	return taken, b.harvested(taken)
}

// HarvestWords is Harvest into a plain word slice: it atomically takes every
// set bit out of b and ORs it into dst, which must hold at least Words()
// words, returning the number of bits taken. dst holds the words as
// integers (bit b of dst[w] is page 64w+b) whatever the host's byte order,
// and is not cleared first. dst is caller-owned and written with plain
// stores. HarvestWords allocates nothing.
func (b *Bitmap) HarvestWords(dst []uint64) (uint64, error) {
	if err := b.checkOpen(); err != nil {
		return 0, err
	}
	n := len(b.words)
	if len(dst) < n {
		return 0, &GeometryError{Op: "harvest", Reason: "destination slice shorter than the bitmap"}
	}
	var taken uint64
	for lo, hi := b.dataWords(0); lo < hi; lo, hi = b.dataWords(hi) {
		m := min(hi, n-1)
		taken += harvestIntoSlice(b.words[lo:m], dst[lo:m])
		if hi == n && guestatomic.Load64(&b.words[n-1]) != 0 {
			if w := toLE(guestatomic.Swap64(&b.words[n-1], 0)) & b.lastMask(); w != 0 {
				dst[n-1] |= w
				taken += uint64(bits.OnesCount64(w))
			}
		}
	}
	return taken, b.harvested(taken)
}

// harvested ends a harvest (or a Clear) that took taken bits. On a bitmap
// whose marks may skip their atomic OR (b.probe), it runs the
// process-wide barrier that orders every write a skipped mark recorded
// before the caller's reads of the harvested pages. Its error, which a
// kernel that accepted the registration does not return, leaves a
// harvest's bits in its destination: the caller can put them back with
// Union.
func (b *Bitmap) harvested(taken uint64) error {
	if taken == 0 || !b.probe {
		return nil
	}
	return processBarrier()
}

// harvestIntoAtomic swaps every non-zero word of src with zero and ORs it
// atomically into dst (len(dst) >= len(src)). Words stay in log (LE) form.
func harvestIntoAtomic(src, dst []uint64) (taken uint64) {
	dst = dst[:len(src)]
	for i := nextBlock(src, 0); i < len(src); i = nextBlock(src, i) {
		end := min(i+scanBlock, len(src))
		// Bring the destination block's cache lines in with plain loads,
		// which overlap, before the locked ORs, which would each wait for
		// their line in turn.
		sinkLoad(dst[i:end])
		for ; i < end; i++ {
			if guestatomic.Load64(&src[i]) != 0 {
				w := guestatomic.Swap64(&src[i], 0)
				guestatomic.Or64(&dst[i], w)
				taken += uint64(bits.OnesCount64(w))
			}
		}
	}
	return taken
}

// harvestIntoSlice swaps every non-zero word of src with zero and ORs it, in
// integer form, into the caller-owned dst (len(dst) >= len(src)).
func harvestIntoSlice(src, dst []uint64) (taken uint64) {
	dst = dst[:len(src)]
	for i := nextBlock(src, 0); i < len(src); i = nextBlock(src, i) {
		end := min(i+scanBlock, len(src))
		for ; i < end; i++ {
			if guestatomic.Load64(&src[i]) != 0 {
				w := toLE(guestatomic.Swap64(&src[i], 0))
				dst[i] |= w
				taken += uint64(bits.OnesCount64(w))
			}
		}
	}
	return taken
}

// sinkLoad loads one word per cache line of ws (atomically: ws is shared).
//
//go:noinline
func sinkLoad(ws []uint64) uint64 {
	var x uint64
	for i := 0; i < len(ws); i += 8 {
		x |= guestatomic.Load64(&ws[i])
	}
	return x
}

func geometryMismatch(op string, src, dst *Bitmap) error {
	if src.shift != dst.shift {
		return &GeometryError{Op: op, Reason: "page sizes differ"}
	}
	return &GeometryError{Op: op, Reason: "destination covers fewer pages than the source"}
}

// Union ORs every bit of src into b (atomically, word by word), leaving src
// unchanged. It is also how a consumer that failed to process a harvest puts
// the harvested bits back into the live log, so that none is lost:
// log.Union(harvested). src must have b's page size. It may cover more
// pages than b as long as none of those is marked (a pending log sized for
// a memory table, merged into a smaller log that covers every page written);
// a mark past b's pages is rejected with a *GeometryError before anything
// is merged. Union reads only the parts of a shared src that were ever
// written, and allocates nothing.
func (b *Bitmap) Union(src *Bitmap) error {
	if err := b.checkOpen(); err != nil {
		return err
	}
	if err := src.checkOpen(); err != nil {
		return err
	}
	if src.shift != b.shift {
		return geometryMismatch("union", src, b)
	}
	if src == b {
		return nil
	}
	n, last := len(src.words), src.lastMask()
	if src.pages > b.pages {
		if src.anyFrom(b.pages) {
			return &GeometryError{Op: "union", Reason: "source marks pages past the destination's span"}
		}
		n, last = len(b.words), b.lastMask()
	}
	for lo, hi := src.dataWords(0); lo < n && lo < hi; lo, hi = src.dataWords(hi) {
		hi = min(hi, n)
		for i := lo; i < hi; i++ {
			w := guestatomic.Load64(&src.words[i])
			if i == n-1 {
				w = toLE(toLE(w) & last)
			}
			if w != 0 {
				guestatomic.Or64(&b.words[i], w)
			}
		}
	}
	return nil
}

// anyFrom reports whether a page at or past first (and below NumPages) is
// marked, reading only the written parts of a shared bitmap.
func (b *Bitmap) anyFrom(first uint64) bool {
	if first >= b.pages {
		return false
	}
	start := int(first / 64)
	for lo, hi := b.dataWords(start); lo < hi; lo, hi = b.dataWords(hi) {
		for i := lo; i < hi; i++ {
			w := b.word(i) // masked to NumPages in the last word
			if i == start {
				w &^= 1<<(first%64) - 1
			}
			if w != 0 {
				return true
			}
		}
	}
	return false
}

// UnionWords ORs words in integer form (bit b of src[w] is page 64w+b, as
// HarvestWords produces them) into b: the way to put back bits a consumer
// harvested with HarvestWords and then failed to process. src may be shorter
// than Words(). A bit naming a page past NumPages is rejected with a
// *GeometryError before anything is merged.
func (b *Bitmap) UnionWords(src []uint64) error {
	if err := b.checkOpen(); err != nil {
		return err
	}
	if len(src) > len(b.words) {
		return &GeometryError{Op: "union", Reason: "source slice longer than the bitmap"}
	}
	if len(src) == len(b.words) && src[len(src)-1]&^b.lastMask() != 0 {
		return &GeometryError{Op: "union", Reason: "source marks pages past the bitmap's span"}
	}
	for i, w := range src {
		if w != 0 {
			guestatomic.Or64(&b.words[i], toLE(w))
		}
	}
	return nil
}

// Clear clears every bit. Bits set concurrently may survive (a Mark after
// the word was cleared). Clearing discards dirty information: clear a
// harvest destination after consuming it, or a live log only when every
// page will be read afterwards anyway (Tracker.Begin, before the full
// copy). A write whose mark the clear removed is then seen by those reads,
// as it would be by the reads after a harvest (Clear ends with the same
// barrier).
func (b *Bitmap) Clear() error {
	if err := b.checkOpen(); err != nil {
		return err
	}
	var cleared uint64
	for lo, hi := b.dataWords(0); lo < hi; lo, hi = b.dataWords(hi) {
		ws := b.words[:hi]
		for i := nextBlock(ws, lo); i < hi; i = nextBlock(ws, i) {
			end := min(i+scanBlock, hi)
			for ; i < end; i++ {
				if guestatomic.Load64(&ws[i]) != 0 {
					cleared += uint64(bits.OnesCount64(guestatomic.Swap64(&ws[i], 0)))
				}
			}
		}
	}
	return b.harvested(cleared)
}

// word returns word i in integer form, masked to the pages it covers.
func (b *Bitmap) word(i int) uint64 {
	w := toLE(guestatomic.Load64(&b.words[i]))
	if i == len(b.words)-1 {
		w &= b.lastMask()
	}
	return w
}

// Count returns the number of dirty pages. Bits set concurrently may or may
// not be counted. A closed bitmap counts 0.
func (b *Bitmap) Count() uint64 {
	var n uint64
	for lo, hi := b.dataWords(0); lo < hi; lo, hi = b.dataWords(hi) {
		ws := b.words[:hi]
		for i := nextBlock(ws, lo); i < hi; i = nextBlock(ws, i) {
			for end := min(i+scanBlock, hi); i < end; i++ {
				if w := b.word(i); w != 0 {
					n += uint64(bits.OnesCount64(w))
				}
			}
		}
	}
	return n
}

// DirtyPages returns an iterator over the dirty pages in increasing order.
// It reads the bitmap as it goes (atomic loads, no clearing): iterate a
// harvested bitmap for a consistent set. It allocates nothing.
func (b *Bitmap) DirtyPages() iter.Seq[uint64] {
	return func(yield func(uint64) bool) {
		for lo, hi := b.dataWords(0); lo < hi; lo, hi = b.dataWords(hi) {
			ws := b.words[:hi]
			for i := nextBlock(ws, lo); i < hi; i = nextBlock(ws, i) {
				for end := min(i+scanBlock, hi); i < end; i++ {
					w := b.word(i)
					base := uint64(i) * 64
					for w != 0 {
						if !yield(base + uint64(bits.TrailingZeros64(w))) {
							return
						}
						w &= w - 1
					}
				}
			}
		}
	}
}

// DirtyRuns returns an iterator over maximal runs of consecutive dirty
// pages, in increasing order, as (first page, number of pages). Runs join
// across word boundaries. Like DirtyPages it reads without clearing and
// allocates nothing.
func (b *Bitmap) DirtyRuns() iter.Seq2[uint64, uint64] {
	return func(yield func(first, n uint64) bool) {
		var start, n uint64 // the run being built; n == 0: none
		// add extends the run with ones pages from p, or yields the run and
		// starts a new one; it reports false when the consumer stopped.
		add := func(p, ones uint64) bool {
			if n != 0 && start+n == p {
				n += ones
				return true
			}
			if n != 0 && !yield(start, n) {
				return false
			}
			start, n = p, ones
			return true
		}
		for lo, hi := b.dataWords(0); lo < hi; lo, hi = b.dataWords(hi) {
			ws := b.words[:hi]
			for i := nextBlock(ws, lo); i < hi; i = nextBlock(ws, i) {
				for end := min(i+scanBlock, hi); i < end; i++ {
					w := b.word(i)
					base := uint64(i) * 64
					if w == ^uint64(0) {
						if !add(base, 64) {
							return
						}
						continue
					}
					for w != 0 {
						tz := uint(bits.TrailingZeros64(w))
						ones := uint(bits.TrailingZeros64(^(w >> tz))) // < 64: w is not all ones
						if !add(base+uint64(tz), uint64(ones)) {
							return
						}
						w &^= (1<<ones - 1) << tz
					}
				}
			}
		}
		if n != 0 {
			yield(start, n)
		}
	}
}
