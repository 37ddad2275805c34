package vring

// Prefetch hints the CPU to start bringing into its cache the first buffers
// of up to n chains the driver has made available and Pop has not taken
// yet: for reading when the chain's first descriptor is device-readable
// (a transmitted frame), for writing when it is device-writable (a
// receive buffer). It returns how many chains it found, at most n.
//
// The queue remembers how far it has asked: a later call asks only for
// chains beyond that (until pops pass that point; after 65536-size pops
// without a call in between, the record can look current again and the
// next size chains go unasked: a hint lost, nothing else). A device that calls Prefetch(d) as it pops keeps the
// next d chains asked for, so each one's lines are on their way well
// before it is taken; a device that works in batches can instead ask for a
// whole batch at its start. When the driver runs on another CPU, those
// cache lines are in the driver's cache: taken one by one as the device
// copies each frame, every transfer waits in turn (and a store to a line
// not yet here holds up every later store); asked for ahead, they travel
// together. Where the lines are already in this CPU's cache (a driver on
// the same CPU), Prefetch only costs its own work: about 2.7 ns a chain on
// the machine of docs/performance (BenchmarkPrefetch32).
//
// Whether it pays depends on the ring, so measure it: softnet asks for its
// receive buffers (which it writes: PREFETCHW) but not for its transmit
// ring, where it cost its loopback about 10-18 % (docs/performance, "The
// transmit ring is not prefetched"). Asking for a frame's header line,
// which Prefetch does with its first bytes and softnet does not read
// without offloads, is the likely reason; softnet asks instead for the
// first line of each popped frame after its header (Chain.PrefetchReadable).
//
// Prefetch reads the available ring and descriptors but changes nothing
// in guest memory and nothing Pop reads (only its own record of how far
// it has asked), so Pop returns the same chains whether or not it was
// called. It uses only the chains' first descriptors that are direct and
// start inside the queue's cached memory region (the region of the last
// buffer Pop translated through the memory table: none before the queue's
// first chain), and ignores anything else, including descriptors that
// break the ring's rules: Pop judges those. When fewer than n chains are
// known available it reads avail.idx again, without recording it. A
// prefetch instruction never faults, and it is only given addresses inside
// guest memory. Its reads of the ring can fault as Pop's can (guest memory
// truncated by its owner), so call it where Pop would be called, under the
// same CatchFault. Where vring has no prefetch instruction (architectures
// other than amd64 and arm64) it still returns the count.
func (q *DeviceQueue) Prefetch(n int) int {
	if n <= 0 || q.err != nil {
		return 0
	}
	if q.pk != nil {
		return q.packedPrefetch(n)
	}
	// The chains known available (availSeen, rule 2); when they are
	// fewer than n, avail.idx is read again (acquire, as refresh does) but
	// not recorded: a value that breaks the rules is left for Pop to
	// report.
	known := q.availSeen - q.lastAvail
	if int(known) < n {
		if fresh := q.r.loadAvailIdx() - q.lastAvail; fresh <= q.r.size && fresh > known {
			known = fresh
		}
	}
	if known == 0 {
		return 0
	}
	n = min(n, int(known))
	// Chains from lastAvail to prefetched were asked for by an earlier
	// call. prefetched-lastAvail is at most a ring's worth while that is
	// current; otherwise (pops went past it, a reset) it is stale.
	start := q.lastAvail
	if ahead := q.prefetched - q.lastAvail; ahead <= q.r.size {
		if int(ahead) >= n {
			return n
		}
		start = q.prefetched
	}
	end := q.lastAvail + uint16(n)
	q.prefetched = end
	mem, base := q.cMem, q.cBase
	avail, descs := q.r.availRing, q.r.descs
	// ring0: avail.ring[0] shares the atomic avail.idx word (as in popRun).
	ring0 := q.r.availIdxShift == 0
	if len(avail) == 0 { // never (len is the queue size); drops a bounds check
		return 0
	}
	for i := start; i != end; i++ {
		slot := int(i) & (len(avail) - 1)
		var head uint16
		if slot == 0 && ring0 {
			head = q.r.availEntry(0)
		} else {
			head = avail[slot]
		}
		if int(head) < len(descs) {
			d := &descs[head]
			q.prefetchBuf(mem, base, GuestAddr(d.addr), d.len, d.flags)
		}
	}
	return n
}

// packedPrefetch is Prefetch on a packed ring: it follows the available
// descriptors (each one's flags word loaded with acquire, as Pop does)
// from nextAvail, or from the frontier an earlier call left, and
// prefetches the first buffer of each chain.
func (q *DeviceQueue) packedPrefetch(n int) int {
	mem, base := q.cMem, q.cBase
	p := q.pk
	i, bits, seq := p.nextAvail, p.availBits, p.popSeq
	if ahead := p.pfSeq - p.popSeq; ahead != 0 && ahead <= uint32(p.r.size) {
		if int(ahead) >= n {
			return n
		}
		i, bits, seq = p.pfIdx, p.pfBits, p.pfSeq
	}
	size, first := p.r.size, true
	for range size { // a ring's worth of descriptors at most
		if int(seq-p.popSeq) == n {
			break
		}
		_, flags := p.r.loadWord(i)
		if flags&availUsed != bits {
			break
		}
		if first {
			d := &p.r.descs[i]
			q.prefetchBuf(mem, base, GuestAddr(d.addr), d.len, flags)
		}
		if i++; i == size {
			i, bits = 0, bits^availUsed
		}
		first = flags&DescFNext == 0
		if first { // a chain ends: the frontier moves past it
			seq++
			p.pfSeq, p.pfIdx, p.pfBits = seq, i, bits
		}
	}
	return int(seq - p.popSeq)
}

// PrefetchReadable hints the CPU to start bringing into its cache, for
// reading, the cache line that holds byte off of the chain's readable
// bytes (its first Readable segments, in order). A device that pops a few
// chains (PopBatch) and then handles them one at a time can ask for each
// one's first line of data before it handles the first: when the driver
// runs on another CPU those lines are in the driver's cache, and asked for
// together they travel together instead of one at a time, each when its
// chain's copy reaches it.
//
// Ask for the bytes the device will read, and only those. softnet asks
// for the frame's first byte, after the virtio-net header: asking for the
// header's line too (which softnet reads only when it offers offloads) cost
// its loopback more than the frame's line gained (docs/performance, "The
// transmit frames' first lines").
//
// It is a hint: it changes no memory, never faults (a line past a mapping,
// or in guest memory truncated by its owner, is ignored) and does nothing
// when off is not below the readable bytes, or where vring has no prefetch
// instruction (architectures other than amd64 and arm64). It reads only
// the chain's Segs, which bound it.
func (c *Chain) PrefetchReadable(off uint64) {
	if p := c.readableAt(off); p != nil {
		prefetchLines(p, 1, false)
	}
}

// readableAt returns the address of byte off of c's readable bytes, or nil
// when there is no such byte. A Readable outside 0..len(Segs) (a Chain
// its holder changed) is clamped to it.
func (c *Chain) readableAt(off uint64) *byte {
	segs := c.Segs[:min(max(c.Readable, 0), len(c.Segs))]
	for i := range segs {
		b := segs[i].Buf
		if off < uint64(len(b)) {
			return &b[off]
		}
		off -= uint64(len(b))
	}
	return nil
}

// prefetchBuf prefetches the first bytes of the buffer of one descriptor
// (of its flags) in mem, the cached region at guest address base, as
// prefetchRange chooses them.
func (q *DeviceQueue) prefetchBuf(mem []byte, base GuestAddr, addr GuestAddr, length uint32, flags uint16) {
	if off, lines, ok := prefetchRange(len(mem), uint64(hostAddrOf(mem)), base, addr, length, flags); ok {
		write := flags&DescFWrite != 0
		if q.prefetchTrace != nil {
			q.prefetchTrace(base+GuestAddr(off), lines, write)
		}
		prefetchLines(&mem[off], lines, write && hasPrefetchW)
	}
}

// prefetchRange chooses what Prefetch asks for of one descriptor's buffer
// (of its flags) in a region of size bytes at guest address base and host
// address host: the cache lines of its first prefetchSpan bytes, from the
// line holding its first byte (at region offset off) on. That is a
// virtio-net header and the start of the frame after it, wherever the
// buffer starts in its line; the CPU's own prefetcher follows a longer
// buffer once it is being copied. ok is false for an indirect descriptor
// or an empty buffer, or one that does not start inside the region.
// Lines are counted on host addresses: every line after the first starts
// inside the buffer's first span bytes, so all of them hold region bytes.
func prefetchRange(size int, host uint64, base, addr GuestAddr, length uint32, flags uint16) (off uint64, lines int, ok bool) {
	off = uint64(addr - base) // wraps past size when addr < base
	if flags&DescFIndirect != 0 || length == 0 || off >= uint64(size) {
		return 0, 0, false
	}
	span := min(uint64(length), prefetchSpan, uint64(size)-off)
	h := host + off
	return off, int((h+span-1)/cacheLine - h/cacheLine + 1), true
}

// prefetchSpan is how many bytes of a chain's first buffer Prefetch asks
// for.
const prefetchSpan = 128

// cacheLine is the cache line size Prefetch assumes (64 bytes on the
// amd64 and arm64 CPUs it targets; a larger line only makes some requests
// redundant).
const cacheLine = 64
