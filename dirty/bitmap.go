package dirty

import (
	"math"
	"math/bits"

	"github.com/vdpakit/vdpakit/internal/guestatomic"
)

// DefaultPageSize is the page size of the vhost log (VHOST_LOG_PAGE): one bit
// of the log covers 4 KiB of guest address space.
const DefaultPageSize = 4096

// MaxSize is the largest bitmap the package creates or attaches, in bytes:
// 256 GiB of log, enough for 8 PiB of guest address space with 4 KiB pages.
// It bounds what a hostile peer's size field can make us map.
const MaxSize = 1 << 38

// addressLimit is a quarter of the address space: 1 GiB on 32-bit, where
// it, not the machine's memory, bounds the log New creates (a larger one
// could not be allocated or mapped in one piece), and far above MaxSize on
// 64-bit.
const addressLimit = math.MaxInt/2 + 1

// Options configure a Bitmap. A nil *Options means all defaults.
type Options struct {
	// PageSize is the number of guest bytes one bit covers: a power of two,
	// DefaultPageSize (4096) if zero. The kernel's and vhost-user's logs use
	// 4096.
	PageSize uint64
	// Shared backs the bitmap with a memfd mapped MAP_SHARED (Linux only),
	// so that its fd can be sent to a vhost-user peer or the memory handed
	// to the kernel. New only; Attach and AttachFd ignore it.
	Shared bool
	// Name names the memfd (visible in /proc/PID/fd); "vdpakit-dirty-log"
	// if empty. Used only with Shared.
	Name string
}

// Bitmap is a dirty-page bitmap in the vhost log layout: bit n of the log
// marks page n of guest address space [0, Span()), where page n covers bytes
// [n*PageSize(), (n+1)*PageSize()). The bits are stored as little-endian u64
// words, so word w holds pages 64w..64w+63 with page 64w+b at bit b. This is
// byte for byte the layout the kernel's vhost (VHOST_SET_LOG_BASE) and
// vhost-user peers (VHOST_USER_SET_LOG_BASE, log[page/8] |= 1 << page%8)
// write.
//
// Concurrency: Mark, LogWrite, Harvest, HarvestWords, Union, UnionWords,
// Clear, Count, PageDirty and the iterators may be called from any number of
// goroutines at once, and concurrently with writers outside this process
// (the kernel or a peer sharing the memory), because every access to the
// words is atomic (internal/guestatomic: sync/atomic's operations, made
// safe under the race detector on a log a peer can truncate). Close must
// not run concurrently with any other method. The geometry accessors (Span,
// PageSize, Size, ...) never change after construction.
type Bitmap struct {
	// words is the log as stored: little-endian u64 words. Invariant:
	// len(words) == ceil(pages/64), so every word but the last is all
	// pages, and only the last can hold slack bits (see lastMask).
	words []uint64
	span  uint64 // valid addresses are [0, span)
	pages uint64 // pages covered: ceil(span / page size)
	shift uint   // log2(page size)

	mapping  []byte // the whole mmap'd range to unmap on Close, or nil
	fd       int    // memfd or dup of a peer's fd; -1 if none
	fdOffset uint64 // offset of word 0 within fd
	// sparse: the words are a mapping of fd, whose holes (file pages never
	// written) scans skip rather than fault in (see dataWords).
	sparse bool
	// probe: Mark loads a word first and skips the atomic OR when its
	// bits are already set. Set only by New for a private bitmap (its
	// memory is this process's alone, so every operation that takes bits
	// out of it runs here: Harvest, HarvestWords, Clear) where
	// membarrier(2) is available. Ordering: a skipped mark has no store
	// that a harvester's swap could synchronise with, so an operation
	// that takes bits ends with processBarrier. Either the marking
	// thread's barrier point falls after its write to guest memory (the
	// write is then visible before the harvest returns), or it falls
	// before its load of the word (the load then sees the swap's zero,
	// and the mark ORs). A skipped mark's write is thus seen by whoever
	// reads the page after the harvest that took the bit, as an ORed one
	// is. Logs that may be shared with another process (a shared New,
	// Attach, AttachFd) never skip: that process could take bits without
	// the barrier.
	probe  bool
	closed bool
}

// geometry validates a page size and span and returns log2(page size), the
// pages covered and the words needed.
func geometry(span, pageSize uint64) (shift uint, pages, words uint64, err error) {
	if pageSize == 0 {
		pageSize = DefaultPageSize
	}
	if pageSize&(pageSize-1) != 0 {
		return 0, 0, 0, ErrPageSize
	}
	shift = uint(bits.TrailingZeros64(pageSize))
	if span == 0 {
		return 0, 0, 0, ErrSpan
	}
	pages = span >> shift
	if span&(pageSize-1) != 0 {
		pages++
	}
	words = pages/64 + boolU64(pages%64 != 0)
	// What this process can hold (on 32-bit less than MaxSize) is for the
	// callers: New refuses more than MemoryLimit, Attach and AttachFd more
	// than the memory they are given.
	if words > MaxSize/8 {
		return 0, 0, 0, ErrSpan
	}
	return shift, pages, words, nil
}

func boolU64(b bool) uint64 {
	if b {
		return 1
	}
	return 0
}

// spanFor returns the span that n words of log cover with the given page
// shift, capped at 2^64-1.
func spanFor(words uint64, shift uint) uint64 {
	pages := words * 64
	if shift >= 64 || pages > (^uint64(0))>>shift {
		return ^uint64(0)
	}
	return pages << shift
}

// MemoryLimit returns the largest log New creates on this machine, in
// bytes: a quarter of its physical memory (MaxSize where that cannot be
// read, and never more than MaxSize), and on 32-bit no more than a quarter
// of the address space, 1 GiB. A log covers 32768 times its size of guest
// memory with 4 KiB pages, so a quarter of 16 GiB is a log for 128 TiB of
// guest: a larger one is a mistake, and a private bitmap that size would
// kill the process with a runtime out-of-memory error on first use.
func MemoryLimit() uint64 {
	limit := uint64(min(MaxSize, addressLimit))
	if m := physMem(); m != 0 {
		return min(m/4, limit)
	}
	return limit
}

// New returns a clean bitmap covering guest addresses [0, span). With
// opts.Shared it lives in a memfd mapped MAP_SHARED (see Fd); otherwise in
// ordinary memory. Its Size is the span's page count rounded up to whole
// 64-page words, times 8 bytes. A bitmap larger than MemoryLimit is
// refused with a *SizeError matching ErrTooLarge.
//
// A shared bitmap takes memory only for the pages of its memfd that were
// written (by Mark here or by a peer): the scans (Harvest, Count, Clear,
// the iterators) skip the file's holes, so a large, sparsely written log
// costs what is written, and harvesting a clean one reads nothing.
func New(span uint64, opts *Options) (*Bitmap, error) {
	var o Options
	if opts != nil {
		o = *opts
	}
	shift, pages, words, err := geometry(span, o.PageSize)
	if err != nil {
		return nil, err
	}
	if limit := MemoryLimit(); words*8 > limit {
		return nil, &SizeError{Size: words * 8, Limit: limit}
	}
	b := &Bitmap{span: span, pages: pages, shift: shift, fd: -1}
	if !o.Shared {
		b.words = make([]uint64, words)
		b.probe = probeMarks && registerBarrier()
		return b, nil
	}
	name := o.Name
	if name == "" {
		name = "vdpakit-dirty-log"
	}
	mapping, fd, err := mapShared(words*8, name)
	if err != nil {
		return nil, err
	}
	b.mapping, b.fd, b.sparse = mapping, fd, true
	b.words = bytesAsWords(mapping[:words*8])
	return b, nil
}

// Attach returns a bitmap over memory someone else allocated and keeps
// writing: a mapping a vhost-user peer sent, memory the kernel logs into. mem
// must be 8-byte aligned and hold the words the span needs; a span of 0 means
// the largest span mem can describe (len(mem)/8 words). The bitmap does not
// own mem: Close does not free it, and mem must stay valid until Close.
// Existing bits in mem are kept.
func Attach(mem []byte, span uint64, opts *Options) (*Bitmap, error) {
	var o Options
	if opts != nil {
		o = *opts
	}
	pageSize := o.PageSize
	if pageSize == 0 {
		pageSize = DefaultPageSize
	}
	if pageSize&(pageSize-1) != 0 {
		return nil, ErrPageSize
	}
	if len(mem) < 8 || !aligned8(mem) {
		return nil, ErrMemory
	}
	if span == 0 {
		span = spanFor(uint64(len(mem))/8, uint(bits.TrailingZeros64(pageSize)))
	}
	shift, pages, words, err := geometry(span, pageSize)
	if err != nil {
		return nil, err
	}
	if uint64(len(mem))/8 < words {
		return nil, ErrMemory
	}
	return &Bitmap{
		words: bytesAsWords(mem[:words*8]),
		span:  span, pages: pages, shift: shift, fd: -1,
	}, nil
}

// AttachFd maps size bytes of a log fd at offset, as a vhost-user
// VHOST_USER_SET_LOG_BASE message describes it (fd, mmap_size, mmap_offset),
// and returns a bitmap over it covering the largest span the log describes:
// size/8 whole words, each 64 pages of opts.PageSize. Only opts.PageSize is
// used. As with a shared New, the scans skip the file's holes: harvesting
// the log reads only pages someone wrote.
//
// The fd is duplicated: the caller keeps ownership of fd and may close it.
// The bitmap's Fd returns the duplicate, which Close closes. When fd is a
// regular file (a memfd) it must be at least offset+size bytes long, and
// AttachFd seals it against shrinking where the file allows, since a peer
// that truncates the file under the mapping would make the next access fault.
func AttachFd(fd int, offset, size uint64, opts *Options) (*Bitmap, error) {
	var o Options
	if opts != nil {
		o = *opts
	}
	pageSize := o.PageSize
	if pageSize == 0 {
		pageSize = DefaultPageSize
	}
	if pageSize&(pageSize-1) != 0 {
		return nil, ErrPageSize
	}
	words := size / 8
	if words == 0 || size > MaxSize || size > math.MaxInt/2 || offset%8 != 0 {
		return nil, &OpError{Op: "attach", Err: ErrMemory}
	}
	shift := uint(bits.TrailingZeros64(pageSize))
	mapping, view, dup, err := mapFd(fd, offset, size)
	if err != nil {
		return nil, err
	}
	// With a huge page size the span caps at 2^64-1 and needs fewer words
	// than were mapped; the bitmap uses only those.
	span := spanFor(words, shift)
	_, pages, words, _ := geometry(span, pageSize)
	return &Bitmap{
		words: bytesAsWords(view[:words*8]),
		span:  span, pages: pages, shift: shift,
		mapping: mapping, fd: dup, fdOffset: offset, sparse: true,
	}, nil
}

// Close releases the bitmap: it unmaps and closes a memfd or attached fd.
// Memory handed to Attach is left alone. After Close every method reports
// ErrClosed (Mark and LogWrite included). Close must not run concurrently
// with other methods; a second Close returns ErrClosed.
func (b *Bitmap) Close() error {
	if b.closed {
		return ErrClosed
	}
	b.closed = true
	b.words, b.span, b.pages = nil, 0, 0
	var err error
	if b.mapping != nil {
		err = unmap(b.mapping)
		b.mapping = nil
	}
	if b.fd >= 0 {
		if cerr := closeFd(b.fd); err == nil {
			err = cerr
		}
		b.fd = -1
	}
	return err
}

// Span returns the number of guest bytes covered: addresses [0, Span()).
func (b *Bitmap) Span() uint64 { return b.span }

// PageSize returns the number of guest bytes one bit covers.
func (b *Bitmap) PageSize() uint64 { return 1 << b.shift }

// NumPages returns the number of pages covered, ceil(Span/PageSize). Bits
// past it in the last word belong to no page: Mark never sets them, and
// Harvest, Count and the iterators ignore them.
func (b *Bitmap) NumPages() uint64 { return b.pages }

// Words returns the number of 64-bit words of the log.
func (b *Bitmap) Words() int { return len(b.words) }

// Size returns the size of the log in bytes, 8*Words(): the mmap_size to send
// with VHOST_USER_SET_LOG_BASE.
func (b *Bitmap) Size() int { return len(b.words) * 8 }

// Fd returns the memfd backing a shared bitmap (or the duplicate of the fd
// given to AttachFd), or -1 if the bitmap is not backed by an fd. The bitmap
// owns it: do not close it.
func (b *Bitmap) Fd() int { return b.fd }

// FdOffset returns the offset of the log's first byte within Fd: the
// mmap_offset to send with VHOST_USER_SET_LOG_BASE.
func (b *Bitmap) FdOffset() uint64 { return b.fdOffset }

// Addr returns the address of the log's first word in this process: the
// value VHOST_SET_LOG_BASE takes. The memory stays at that address until
// Close (keep the Bitmap reachable while a kernel writes to it).
func (b *Bitmap) Addr() uintptr { return wordsAddr(b.words) }

// Bytes returns the log's memory, Size() bytes. It aliases the bitmap:
// anything reading or writing it while others mark must use 64-bit atomic
// operations on aligned words, as this package does.
func (b *Bitmap) Bytes() []byte { return wordsAsBytes(b.words) }

// PageOf returns the page that holds guest address addr.
func (b *Bitmap) PageOf(addr uint64) uint64 { return addr >> b.shift }

// PageAddr returns the guest address of the first byte of page.
func (b *Bitmap) PageAddr(page uint64) uint64 { return page << b.shift }

// Mark marks every page that the guest byte range [addr, addr+length)
// touches. A zero length marks nothing and succeeds. A range that does not
// lie entirely in [0, Span()) — including one that wraps past 2^64 — marks
// nothing and returns a *RangeError matching ErrOutOfSpan.
//
// Mark is atomic per word and safe for concurrent use with every other
// method but Close. Call it after the write it records: a Harvest that
// observes the bit then also observes the write (the atomic OR publishes
// everything the marking goroutine wrote before it). On a private bitmap
// (New without Options.Shared), a mark whose bits are already set costs
// one load and no locked instruction; the harvest that takes the bits pays
// for the ordering instead, with one membarrier(2) (see the package doc).
func (b *Bitmap) Mark(addr, length uint64) error {
	// Fast path: a non-empty range inside the span
	// (length-1 < span-addr, with addr < span so neither side wraps) that
	// stays within one page. Everything else goes to markSlow.
	if addr < b.span && length-1 < b.span-addr {
		sh := b.shift & 63 // always < 64; the mask spares the compiler a range check
		p := addr >> sh
		if (addr+length-1)>>sh == p {
			// Ordering: the atomic OR is sequentially consistent, so writes
			// this goroutine made before it happen before any Harvest swap
			// that returns the bit. A mark that finds its bit set skips
			// the OR only when b.probe says the harvest fences instead.
			w, bit := &b.words[p>>6], toLE(1<<(p&63))
			if !b.probe || guestatomic.Load64(w)&bit == 0 {
				guestatomic.Or64(w, bit)
			}
			return nil
		}
	}
	return b.markSlow(addr, length)
}

// markSlow is Mark for zero-length, multi-page and rejected ranges. It is
// kept out of line so that Mark's fast path stays a short leaf: its callers
// reach it through WriteLogger (an interface call), so it is not inlined,
// and a fast path that calls nothing needs no stack frame.
//
//go:noinline
func (b *Bitmap) markSlow(addr, length uint64) error {
	if length == 0 {
		return nil
	}
	last := addr + length - 1
	if last < addr || last >= b.span {
		if b.closed {
			return ErrClosed
		}
		return &RangeError{Addr: addr, Len: length, Span: b.span}
	}
	b.markPages(addr>>b.shift, last>>b.shift)
	return nil
}

// LogWrite is Mark under the name vring's WriteLogger interface uses, so a
// *Bitmap can be a device queue's write logger directly. On a nil *Bitmap
// (a typed nil stored in a WriteLogger) it reports ErrClosed rather than
// panicking, so the queue fails loudly and drops nothing silently.
func (b *Bitmap) LogWrite(addr, length uint64) error {
	if b == nil {
		return ErrClosed
	}
	return b.Mark(addr, length)
}

// markPages sets the bits of pages first..last (inclusive, first < last,
// last < NumPages) with one atomic OR per word touched.
func (b *Bitmap) markPages(first, last uint64) {
	w0, w1 := first>>6, last>>6
	lo := ^uint64(0) << (first & 63)
	hi := ^uint64(0) >> (63 - last&63)
	ws := b.words[w0 : w1+1]
	if len(ws) == 1 {
		b.orWord(&ws[0], toLE(lo&hi))
		return
	}
	b.orWord(&ws[0], toLE(lo))
	mid := ws[1 : len(ws)-1]
	for i := range mid {
		b.orWord(&mid[i], ^uint64(0))
	}
	b.orWord(&ws[len(ws)-1], toLE(hi))
}

// orWord ORs bits (in log form) into the word at w: atomically, and only
// when some of them are clear if b.probe allows skipping (see probe).
func (b *Bitmap) orWord(w *uint64, bits uint64) {
	if !b.probe || guestatomic.Load64(w)&bits != bits {
		guestatomic.Or64(w, bits)
	}
}

// PageDirty reports whether page's bit is set. Pages past NumPages report
// false.
func (b *Bitmap) PageDirty(page uint64) bool {
	if page >= b.pages {
		return false
	}
	return toLE(guestatomic.Load64(&b.words[page>>6]))&(1<<(page&63)) != 0
}
