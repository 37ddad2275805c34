package vring

import (
	"fmt"

	"github.com/vdpakit/vdpakit/internal/guestatomic"
	"github.com/vdpakit/vdpakit/virtio"
)

// packedDevice is the device side of a packed ring (DeviceQueue.pk). The
// DeviceQueue's shared fields (mem, index, log, hint, cBase/cMem, err,
// notify, eventIdx, indirect, init) keep their meaning.
type packedDevice struct {
	_ [64]byte // off cache lines shared with other allocations (the driver side may be next door)
	r packedRing

	nextAvail uint16 // ring index of the next descriptor to pop
	availBits uint16 // AVAIL|USED bits of an available descriptor at nextAvail: DescFAvail for wrap 1, DescFUsed for wrap 0
	nextUsed  uint16 // ring index of the next used descriptor to write
	usedBits  uint16 // AVAIL|USED bits of a used descriptor written at nextUsed: both for wrap 1, none for wrap 0
	inflight  uint16 // ring descriptors popped and not returned: from nextUsed to nextAvail

	ids []packedID // by buffer id

	// inOrder: VIRTIO_F_IN_ORDER was negotiated. popSeq numbers the
	// chains in pop order (for prefetching, below).
	inOrder bool
	popSeq  uint32

	sinceSignal uint32 // descriptors used since the last NeedsInterrupt

	// Prefetch's frontier: the chain numbered pfSeq (popSeq's numbering)
	// starts at ring index pfIdx with AVAIL|USED bits pfBits, and the
	// chains before it have been asked for. Current while
	// 0 < pfSeq-popSeq <= ring size.
	pfSeq  uint32
	pfIdx  uint16
	pfBits uint16

	devEvent    uint32 // shadow of the device event suppression word
	devEventSet bool   // devEvent holds what memory holds
	devEventLog GuestAddr
	descLog     GuestAddr // guest address of the descriptor ring for logging
	// lost is the number of ring descriptors of chains that were in
	// flight when the queue was restored (DeviceQueueOptions.State): the
	// device does not know their ids, so it cannot push them. Without
	// IN_ORDER they stay in flight, as in the driver's own count; with
	// IN_ORDER the first used descriptor written covers them (the driver
	// takes every chain it added before that id as used), so the used
	// position moves past them then.
	lost uint16
	// adopted counts the chains AdoptInFlight declared that are still in
	// flight. With IN_ORDER, while both these and lost descriptors are in
	// flight, no push can say which come first: a push then fails.
	adopted uint16
	_       [64]byte
}

// packedID is what the device knows of a buffer id.
type packedID struct {
	writable uint64 // the chain's writable bytes
	ndesc    uint16 // ring descriptors of the chain
	inflight bool
	adopted  bool // declared by AdoptInFlight
}

func setWrapBits(avail, used bool) (availBits, usedBits uint16) {
	availBits, usedBits = DescFUsed, 0
	if avail {
		availBits = DescFAvail
	}
	if used {
		usedBits = availUsed
	}
	return
}

// newPackedDeviceQueue is NewDeviceQueue for VIRTIO_F_RING_PACKED.
func newPackedDeviceQueue(mem *Memory, opts DeviceQueueOptions) (*DeviceQueue, error) {
	r, err := newPackedRing(mem, opts.Layout)
	if err != nil {
		return nil, fmt.Errorf("vring: queue %d: %w", opts.Index, err)
	}
	if err := validatePackedState(opts.State, opts.Layout.Size); err != nil {
		return nil, fmt.Errorf("vring: queue %d: %w", opts.Index, err)
	}
	p := &packedDevice{
		r: r, ids: make([]packedID, opts.Layout.Size),
		inOrder:     opts.Features.Has(virtio.FInOrder),
		descLog:     opts.UsedLogAddr,
		devEventLog: opts.DeviceEventLogAddr,
	}
	if p.descLog == 0 {
		p.descLog = opts.Layout.Desc
	}
	if p.devEventLog == 0 {
		p.devEventLog = opts.Layout.Used
	}
	q := &DeviceQueue{
		mem: mem, index: opts.Index, layout: opts.Layout,
		eventIdx: opts.Features.Has(virtio.FEventIdx),
		indirect: opts.Features.Has(virtio.FIndirectDesc),
		log:      opts.Log, usedLog: p.descLog, init: opts.State,
		pk: p,
	}
	q.flusher, _ = opts.Log.(LogFlusher)
	q.r.size = opts.Layout.Size // Size() works on both formats
	q.packedReset(opts.State)
	if err := Guard(func() error { return q.endLog(q.packedEnable()) }); err != nil {
		if _, ok := err.(*FaultError); ok {
			return nil, fmt.Errorf("vring: queue %d: enable notifications: %w", opts.Index, err)
		}
		return nil, err
	}
	return q, nil
}

func (q *DeviceQueue) packedReset(st QueueState) {
	p := q.pk
	var aw, uw bool
	p.nextAvail, aw = PackedPosition(st.NextAvail)
	p.nextUsed, uw = PackedPosition(st.NextUsed)
	p.availBits, p.usedBits = setWrapBits(aw, uw)
	n, _ := st.PackedInFlight(p.r.size) // validated by the constructor
	p.inflight = n
	// Chains in flight at a restore are known by their descriptor count
	// only (the ring no longer tells which ids they were once the device
	// completed chains out of order): see packedDevice.lost.
	p.lost = n
	p.adopted = 0
	clear(p.ids)
	p.popSeq = 0
	p.pfSeq = 0 // not current: pfSeq == popSeq
	p.sinceSignal = 0
	p.devEventSet = false
	q.notify = true
	q.err = nil
}

// Packed reports whether the queue is a packed virtqueue
// (VIRTIO_F_RING_PACKED).
func (q *DeviceQueue) Packed() bool { return q.pk != nil }

func (q *DeviceQueue) packedState() QueueState {
	p := q.pk
	return QueueState{
		NextAvail: PackedIndex(p.nextAvail, p.availBits == DescFAvail),
		NextUsed:  PackedIndex(p.nextUsed, p.usedBits != 0),
	}
}

// packedFail breaks the queue with err found at ring (or table) index.
//
//go:noinline
func (q *DeviceQueue) packedFail(index uint16, indirect bool, err error) error {
	e := qerr(q.index, index, indirect, err)
	q.err = &brokenError{cause: e}
	q.pk.sinceSignal = 0 // a broken queue reports no interrupt
	return e
}

func (q *DeviceQueue) packedLogWrite(addr GuestAddr, n uint64) error {
	if err := q.log.LogWrite(uint64(addr), n); err != nil {
		return q.packedFail(q.pk.nextUsed, false, &wrap2{ErrLogWrite, err})
	}
	return nil
}

// storeDevEvent writes the device event suppression word (and logs it).
func (q *DeviceQueue) storeDevEvent(w uint32) error {
	p := q.pk
	if p.devEventSet && p.devEvent == w {
		return nil
	}
	guestatomic.Store32(p.r.devEvent, w)
	p.devEvent, p.devEventSet = w, true
	if q.log != nil {
		return q.packedLogWrite(p.devEventLog, 4)
	}
	return nil
}

// armWord is the device event word asking for a kick at the next avail
// position: DESC with that offset and wrap counter under EVENT_IDX,
// ENABLE otherwise.
func (p *packedDevice) armWord(eventIdx bool) uint32 {
	if eventIdx {
		return eventWord(PackedIndex(p.nextAvail, p.availBits == DescFAvail), EventFlagsDesc)
	}
	return eventWord(0, EventFlagsEnable)
}

func (q *DeviceQueue) packedEnable() error {
	q.notify = true
	return q.storeDevEvent(q.pk.armWord(q.eventIdx))
}

// headAvailable loads the flags word at nextAvail and reports whether it
// is an available descriptor of the current lap. A descriptor whose
// AVAIL/USED bits do not say so is simply not available (yet): a used
// descriptor, a stale one from the previous lap or the zeroed ring.
func (p *packedDevice) headAvailable() (flags uint16, ok bool) {
	_, flags = p.r.loadWord(p.nextAvail)
	return flags, flags&availUsed == p.availBits
}

func (q *DeviceQueue) packedPop(c *Chain) (bool, error) {
	if q.err != nil {
		return false, q.err
	}
	p := q.pk
	flags, ok := p.headAvailable()
	if !ok {
		// Empty. With notifications on and EVENT_IDX, move the event
		// offset to the next avail position and re-check (EnableNotify's
		// race, as the split ring's Pop does).
		if !q.notify || !q.eventIdx {
			return false, nil
		}
		w := p.armWord(true)
		if p.devEventSet && p.devEvent == w {
			return false, nil
		}
		if err := q.storeDevEvent(w); err != nil {
			return false, err
		}
		if flags, ok = p.headAvailable(); !ok {
			return false, nil
		}
	}
	// Fast path: one direct descriptor inside the cached region.
	i := p.nextAvail
	d := &p.r.descs[i]
	addr, length, id := GuestAddr(d.addr), d.len, d.id
	mem := q.cMem
	off := uint64(addr - q.cBase)
	if segs := c.Segs; flags&(DescFNext|DescFIndirect) == 0 && off < uint64(len(mem)) &&
		uint64(length)-1 < uint64(len(mem))-off && cap(segs) != 0 && int(id) < len(p.ids) &&
		!p.ids[id].inflight && p.inflight < p.r.size {
		c.fill1(segs[:1], id, addr, length, flags, bufAt(mem, off, length))
		c.Descs = 1
		p.take(id, 1, c.WritableLen)
		return true, nil
	}
	if flags&DescFIndirect == 0 && q.packedWalkDirect(c, flags) {
		return true, nil
	}
	if err := q.packedWalk(c, flags); err != nil {
		return false, err
	}
	return true, nil
}

// take records a popped chain of n ring descriptors with buffer id id and
// moves nextAvail past it.
func (p *packedDevice) take(id, n uint16, writable uint64) {
	e := &p.ids[id]
	e.inflight, e.ndesc, e.writable = true, n, writable
	p.popSeq++
	p.inflight += n
	next := uint32(p.nextAvail) + uint32(n)
	if next >= uint32(p.r.size) {
		next -= uint32(p.r.size)
		p.availBits ^= availUsed
	}
	p.nextAvail = uint16(next)
}

// packedWalk follows the chain whose head (at nextAvail, flags headFlags)
// is available, validating every rule, and takes it.
//
// The rules (virtio 1.2 §2.8.5-2.8.8, §2.8.14-2.8.17):
//   - The chain is the run of ring descriptors from the head while NEXT is
//     set. Each after the head must be available for its own position's
//     wrap counter (the chain may wrap around the ring end): the driver
//     makes the head available last, so the rest already is
//     (ErrDescNotAvailable otherwise).
//   - It may not run into descriptors in flight: at most size - in-flight
//     ring descriptors (ErrChainTooLong; a chain longer than the ring is
//     the case of nothing in flight).
//   - An INDIRECT descriptor needs VIRTIO_F_INDIRECT_DESC, may not have
//     NEXT (ErrIndirectWithNext) and must be the chain's only ring
//     descriptor (direct descriptors with INDIRECT in a NEXT list are
//     forbidden for packed rings, §2.8.17: ErrIndirectWithNext too); its
//     table is len/16 descriptors in order (len a non-zero multiple of 16,
//     ErrIndirectSize; at most the queue size, ErrChainTooLong), where
//     WRITE is the only flag that counts: NEXT, AVAIL, USED and the id are
//     reserved and ignored (DPDK's driver sets NEXT there), except INDIRECT,
//     which is refused (ErrNestedIndirect).
//   - Readable descriptors come before writable ones
//     (ErrReadableAfterWritable); every buffer lies in guest memory
//     (ErrBufferOutOfRange).
//   - The buffer id is the last ring descriptor's id (§2.8.6): < size
//     (ErrBufferIDOutOfRange) and not in flight (ErrBufferIDInFlight).
func (q *DeviceQueue) packedWalk(c *Chain, headFlags uint16) error {
	p := q.pk
	size := p.r.size
	limit := size - p.inflight // ring descriptors this chain may use
	pos, bits := p.nextAvail, p.availBits
	flags := headFlags
	n := uint16(0)
	writable := false
	descs := p.r.descs
	id := descs[pos].id          // the head's (read after its flags word, rule 2)
	base, mem := q.cBase, q.cMem // the cached region, in registers
	// The chain is built in locals and stored into c once (or around the
	// slow paths, which append to c themselves).
	segs := c.Segs[:0]
	maxSegs := MaxChainSegments(size)
	readable := 0
	var rlen, wlen uint64
	for {
		if n == limit {
			return q.packedFail(pos, false, ErrChainTooLong)
		}
		if int(pos) >= len(descs) { // never (pos < size); lets the compiler drop the bounds check below
			return q.packedFail(pos, false, ErrChainTooLong)
		}
		d := &descs[pos]
		if n > 0 && flags&availUsed != bits {
			return q.packedFail(pos, false, ErrDescNotAvailable)
		}
		n++
		addr, length := GuestAddr(d.addr), d.len
		at := pos
		if pos++; pos == size {
			pos, bits = 0, bits^availUsed
		}
		if flags&DescFIndirect != 0 {
			if !q.indirect {
				return q.packedFail(at, false, ErrIndirectNotNegotiated)
			}
			if flags&DescFNext != 0 || n > 1 {
				return q.packedFail(at, false, ErrIndirectWithNext)
			}
			c.Segs, c.Readable, c.ReadableLen, c.WritableLen = segs, readable, rlen, wlen
			if err := q.packedWalkTable(c, at, addr, length); err != nil {
				return err
			}
			segs, readable, rlen, wlen = c.Segs, c.Readable, c.ReadableLen, c.WritableLen
			break
		}
		w := flags&DescFWrite != 0
		if !w && writable {
			return q.packedFail(at, false, ErrReadableAfterWritable)
		}
		writable = w
		// appendSeg's fast path, inline: non-empty, inside the cached region.
		if off := uint64(addr - base); off < uint64(len(mem)) && uint64(length)-1 < uint64(len(mem))-off {
			k := len(segs)
			if k >= maxSegs {
				return q.packedFail(at, false, ErrTooManySegments)
			}
			if k < cap(segs) {
				segs = segs[:k+1]
			} else {
				segs = growSegs(segs, maxSegs)
			}
			seg := &segs[k]
			seg.Addr, seg.Len, seg.Writable, seg.Buf = addr, length, w, bufAt(mem, off, length)
			if w {
				wlen += uint64(length)
			} else {
				rlen += uint64(length)
				readable++
			}
		} else {
			c.Segs, c.Readable, c.ReadableLen, c.WritableLen = segs, readable, rlen, wlen
			if err := q.appendSegsSlow(c, addr, length, w); err != nil {
				return q.packedFail(at, false, segsErr(err))
			}
			segs, readable, rlen, wlen = c.Segs, c.Readable, c.ReadableLen, c.WritableLen
			base, mem = q.cBase, q.cMem // appendSegsSlow may have cached another region
		}
		if flags&DescFNext == 0 {
			break
		}
		// The next descriptor's id|flags word, loaded atomically: its
		// flags are checked for AVAIL/USED at the top of the loop.
		wd := guestatomic.Load32(descWord(&descs[pos]))
		id, flags = uint16(wd), uint16(wd>>16)
	}
	c.Segs, c.Readable, c.ReadableLen, c.WritableLen = segs, readable, rlen, wlen
	last := pos - 1
	if pos == 0 {
		last = size - 1
	}
	if id >= size {
		return q.packedFail(last, false, ErrBufferIDOutOfRange)
	}
	if p.ids[id].inflight {
		return q.packedFail(last, false, ErrBufferIDInFlight)
	}
	c.Head, c.Descs = id, n
	p.take(id, n, wlen)
	return nil
}

// packedWalkDirect is packedWalk's fast path (packedWalkRun applies the
// same rules to a run of chains; a rule changed here is changed there too):
// a chain of direct ring descriptors that ends before the ring's end,
// within the descriptors not in flight, whose buffers are non-empty and lie
// inside the cached region, readable ones before writable ones, no longer
// than c.Segs's capacity, with a buffer id in range and not in flight. It
// reads each descriptor once, its id|flags word first (atomically, rule 2),
// and checks every value it uses on what it read. It takes such a chain and
// reports true; for any other it reports false, leaving c's contents
// unspecified and the queue as it was, and the caller walks the chain with
// packedWalk, which starts over from the head and applies every rule with
// its typed errors.
func (q *DeviceQueue) packedWalkDirect(c *Chain, headFlags uint16) bool {
	p := q.pk
	descs := p.r.descs
	start := int(p.nextAvail)
	segs := c.Segs[:cap(c.Segs)]
	// The chain ends before the ring's end, uses at most the descriptors
	// not in flight and fits segs.
	end := min(len(descs), start+int(p.r.size-p.inflight), start+len(segs))
	mem, base := q.cMem, q.cBase
	bits := p.availBits
	flags := headFlags
	readable := -1
	var rlen, wlen uint64
	i := start
	if i >= end {
		return false
	}
	id := descs[i].id // the head's: its flags word was loaded (acquire) by the caller
	for {
		d := &descs[i]
		addr, length := GuestAddr(d.addr), d.len
		off := uint64(addr - base)
		// Direct, in the cached region (off wraps past len(mem) when addr
		// < base), non-empty (length-1 wraps when 0) and ending inside.
		if flags&DescFIndirect != 0 || off >= uint64(len(mem)) || uint64(length)-1 >= uint64(len(mem))-off {
			return false
		}
		s := &segs[i-start]
		s.Addr, s.Len, s.Buf = addr, length, bufAt(mem, off, length)
		if flags&DescFWrite != 0 {
			if wlen == 0 { // the first writable one
				readable = i - start
			}
			s.Writable = true
			wlen += uint64(length)
		} else {
			if wlen != 0 { // readable after writable
				return false
			}
			s.Writable = false
			rlen += uint64(length)
		}
		if flags&DescFNext == 0 {
			break
		}
		if i++; i >= end {
			return false
		}
		// The next descriptor's id|flags word (acquire), then its addr
		// and len at the top of the loop; it must be available.
		w := guestatomic.Load32(descWord(&descs[i]))
		id, flags = uint16(w), uint16(w>>16)
		if flags&availUsed != bits {
			return false
		}
	}
	n := i - start + 1
	if int(id) >= len(p.ids) || p.ids[id].inflight {
		return false
	}
	if readable < 0 {
		readable = n
	}
	c.Head, c.Descs = id, uint16(n)
	c.Segs, c.Readable, c.ReadableLen, c.WritableLen = segs[:n], readable, rlen, wlen
	p.take(id, uint16(n), wlen)
	return true
}

// packedWalkTable appends the segments of the indirect table at addr
// (length bytes) named by ring descriptor at.
func (q *DeviceQueue) packedWalkTable(c *Chain, at uint16, addr GuestAddr, length uint32) error {
	if length == 0 || length%16 != 0 {
		return q.packedFail(at, false, ErrIndirectSize)
	}
	nt := length / 16
	if nt > uint32(q.pk.r.size) {
		return q.packedFail(at, false, ErrChainTooLong)
	}
	t, err := q.mem.slice(addr, uint64(length), &q.hint)
	if err != nil {
		return q.packedFail(at, false, &wrap2{ErrBufferOutOfRange, err})
	}
	writable := false
	for k := uint32(0); k < nt; k++ {
		a, l, _, flags := readDesc(t, uint16(k)) // packed layout: id at 12, flags at 14
		if flags&DescFIndirect != 0 {
			return q.packedFail(uint16(k), true, ErrNestedIndirect)
		}
		w := flags&DescFWrite != 0
		if !w && writable {
			return q.packedFail(uint16(k), true, ErrReadableAfterWritable)
		}
		writable = w
		if err := q.appendSeg(c, GuestAddr(a), l, w); err != nil {
			return q.packedFail(uint16(k), true, segsErr(err))
		}
	}
	return nil
}

// appendSeg appends one descriptor's buffer to c: inline for the cached
// region, else through appendSegsSlow (region table, splitting, empty
// buffers). Its errors are appendSegsSlow's (see segsErr).
func (q *DeviceQueue) appendSeg(c *Chain, addr GuestAddr, length uint32, w bool) error {
	if off := uint64(addr - q.cBase); addr >= q.cBase && off < uint64(len(q.cMem)) &&
		uint64(length) <= uint64(len(q.cMem))-off && length != 0 {
		maxSegs := MaxChainSegments(q.r.size)
		if len(c.Segs) >= maxSegs {
			return ErrTooManySegments
		}
		end := off + uint64(length)
		seg := c.grow(maxSegs)
		seg.Addr, seg.Len, seg.Writable, seg.Buf = addr, length, w, q.cMem[off:end:end]
		if w {
			c.WritableLen += uint64(length)
		} else {
			c.ReadableLen += uint64(length)
			c.Readable++
		}
		return nil
	}
	return q.appendSegsSlow(c, addr, length, w)
}

func (q *DeviceQueue) packedPopBatch(cs []Chain) (int, error) {
	p := q.pk
	i := 0
	for i < len(cs) {
		if q.err != nil {
			return i, q.err
		}
		flags, ok := p.headAvailable()
		if !ok {
			// Empty: packedPop arms the event offset (EVENT_IDX) and
			// re-checks.
			ok, err := q.packedPop(&cs[i])
			if err != nil || !ok {
				return i, err
			}
			i++
			continue
		}
		if flags&(DescFNext|DescFIndirect) == 0 {
			if k := q.packedPopRun(cs[i:]); k > 0 {
				i += k
				continue
			}
		}
		// Chains packedPopRun does not take: packedWalkRun takes a run of
		// them, packedWalk the one it stops at.
		if flags&DescFIndirect == 0 {
			if k := q.packedWalkRun(cs[i:]); k > 0 {
				i += k
				continue
			}
		}
		if err := q.packedWalk(&cs[i], flags); err != nil {
			return i, err
		}
		i++
	}
	return i, nil
}

// packedPopRun is packedPopBatch's tight loop: it pops available chains
// into batch while they are single direct descriptors inside the cached
// region with a free buffer id, and returns how many. Anything else (and
// the end of the available chains) stops it; packedPop takes over.
func (q *DeviceQueue) packedPopRun(batch []Chain) int {
	p := q.pk
	descs, ids := p.r.descs, p.ids
	base, mem := q.cBase, q.cMem
	pos, bits := p.nextAvail, p.availBits
	batch = batch[:min(len(batch), int(p.r.size-p.inflight))] // one ring descriptor a chain
	k := 0
	for ; k < len(batch); k++ {
		if int(pos) >= len(descs) { // never (pos < size); lets the compiler drop the bounds checks below
			break
		}
		d := &descs[pos]
		// Rule 2: the flags word (acquire), then addr and len.
		w := guestatomic.Load32(descWord(d))
		id, flags := uint16(w), uint16(w>>16)
		if flags&availUsed != bits || flags&(DescFNext|DescFIndirect) != 0 || int(id) >= len(ids) || ids[id].inflight {
			break
		}
		addr, length := GuestAddr(d.addr), d.len
		c := &batch[k]
		off := uint64(addr - base)
		segs := c.Segs
		if off >= uint64(len(mem)) || uint64(length)-1 >= uint64(len(mem))-off || cap(segs) == 0 {
			break
		}
		c.fill1(segs[:1], id, addr, length, flags, bufAt(mem, off, length))
		c.Descs = 1
		e := &ids[id]
		e.inflight, e.ndesc, e.writable = true, 1, c.WritableLen
		if pos++; pos == uint16(len(descs)) {
			pos, bits = 0, bits^availUsed
		}
	}
	p.nextAvail, p.availBits = pos, bits
	p.popSeq += uint32(k)
	p.inflight += uint16(k)
	return k
}

// packedWalkRun is packedPopBatch's loop for chains packedPopRun does not
// take: it pops available chains into batch while packedWalkDirect's rules
// take them (direct ring descriptors, each available, inside the cached
// region and non-empty, readable before writable, ending before the ring's
// end, not running into descriptors in flight, no more than a Chain's Segs
// holds, and a free buffer id), and returns how many. It is
// packedWalkDirect's loop inside packedPopRun's: the queue's position, wrap
// counter and in-flight count stay in locals for the run and no call is
// made per chain. The queue is left as it was for the chain it stops at
// (that Chain's contents are unspecified), which packedPopBatch hands to
// packedPop or packedWalk. packedWalkDirect applies the same rules to one
// chain: a rule changed in one is changed in both
// (TestPackedWalkRunAgreesWithWalkDirect compares them).
func (q *DeviceQueue) packedWalkRun(batch []Chain) int {
	p := q.pk
	descs, ids := p.r.descs, p.ids
	base, mem := q.cBase, q.cMem
	pos, bits, inflight := int(p.nextAvail), p.availBits, p.inflight
	k := 0
chains:
	for ; k < len(batch); k++ {
		if pos >= len(descs) { // never (pos < size); drops a bounds check
			break
		}
		// Rule 2: the head's id|flags word (acquire), then its addr and len.
		w := guestatomic.Load32(descWord(&descs[pos]))
		id, flags := uint16(w), uint16(w>>16)
		if flags&availUsed != bits {
			// Not available. After k > 0 chains packedPopBatch re-checks
			// (and packedPop arms the event); at k == 0 (the driver took
			// the head back since packedPopBatch loaded it) packedWalk
			// judges the head on what it reads, as it did when
			// packedWalkDirect never reloaded it.
			break
		}
		c := &batch[k]
		segs := c.Segs[:cap(c.Segs)]
		// As in packedWalkDirect: the chain ends before the ring's end,
		// uses at most the descriptors not in flight and fits segs.
		end := min(len(descs), pos+int(p.r.size-inflight), pos+len(segs))
		if pos >= end {
			break
		}
		readable := -1
		var rlen, wlen uint64
		i := pos
		for {
			d := &descs[i]
			addr, length := GuestAddr(d.addr), d.len
			off := uint64(addr - base)
			// Direct, in the cached region (off wraps past len(mem) when
			// addr < base), non-empty (length-1 wraps when 0) and ending
			// inside.
			if flags&DescFIndirect != 0 || off >= uint64(len(mem)) || uint64(length)-1 >= uint64(len(mem))-off {
				break chains
			}
			s := &segs[i-pos]
			s.Addr, s.Len, s.Buf = addr, length, bufAt(mem, off, length)
			if flags&DescFWrite != 0 {
				if wlen == 0 { // the first writable one
					readable = i - pos
				}
				s.Writable = true
				wlen += uint64(length)
			} else {
				if wlen != 0 { // readable after writable
					break chains
				}
				s.Writable = false
				rlen += uint64(length)
			}
			if flags&DescFNext == 0 {
				break
			}
			if i++; i >= end {
				break chains
			}
			// The next descriptor's id|flags word (acquire), then its
			// addr and len at the top of the loop; it must be available.
			w = guestatomic.Load32(descWord(&descs[i]))
			id, flags = uint16(w), uint16(w>>16)
			if flags&availUsed != bits {
				break chains
			}
		}
		n := i - pos + 1
		if int(id) >= len(ids) || ids[id].inflight {
			break
		}
		if readable < 0 {
			readable = n
		}
		c.Head, c.Descs = id, uint16(n)
		c.Segs, c.Readable, c.ReadableLen, c.WritableLen = segs[:n], readable, rlen, wlen
		e := &ids[id]
		e.inflight, e.ndesc, e.writable = true, uint16(n), wlen
		inflight += uint16(n)
		if pos = i + 1; pos == len(descs) { // the chain ended at the ring's end
			pos, bits = 0, bits^availUsed
		}
	}
	p.nextAvail, p.availBits = uint16(pos), bits
	p.popSeq += uint32(k)
	p.inflight = inflight
	return k
}

// AdoptInFlight declares a chain that was in flight when a packed queue
// was restored (DeviceQueueOptions.State with NextAvail ahead of
// NextUsed): its buffer id and the number of ring descriptors it
// occupies, as the device recorded them before the save (Chain.Head and
// Chain.Descs; vhost-user's inflight area carries the same). The chain
// can then be pushed like a popped one. Its writable length is unknown,
// so its used descriptor always carries WRITE. It fails (without breaking
// the queue) on a split queue, for an id out of range or in flight, and
// for more descriptors than the restored state has in flight unadopted.
//
// With VIRTIO_F_IN_ORDER a used descriptor also stands for every chain
// the driver made available before it, and the restored state does not
// say where an adopted chain lies among the others in flight: adopt every
// one of them before pushing anything (oldest first, and push them in
// that order). While some are adopted and others are not, a push fails
// with ErrNotInFlight, where it would otherwise move the used position
// past chains the driver does not count as used.
func (q *DeviceQueue) AdoptInFlight(id, descs uint16) error {
	p := q.pk
	if p == nil {
		return fmt.Errorf("%w: queue %d: AdoptInFlight on a split queue", ErrNotInFlight, q.index)
	}
	if q.err != nil {
		return q.err
	}
	if int(id) >= len(p.ids) || p.ids[id].inflight || descs == 0 || descs > p.lost {
		return fmt.Errorf("%w: queue %d: adopt buffer id %d of %d descriptors (%d restored in flight unadopted)",
			ErrNotInFlight, q.index, id, descs, p.lost)
	}
	p.lost -= descs
	p.ids[id] = packedID{writable: ^uint64(0), ndesc: descs, inflight: true, adopted: true}
	p.adopted++
	p.popSeq++
	return nil
}

// pushCheck reports whether id can be pushed.
func (p *packedDevice) pushable(id uint16) bool {
	return int(id) < len(p.ids) && p.ids[id].inflight
}

// unordered reports whether a push cannot tell where it stands among the
// chains in flight at a restore (see adopted).
func (p *packedDevice) unordered() bool {
	return p.lost != 0 && p.adopted != 0 && p.inOrder
}

//go:noinline
func (q *DeviceQueue) packedPushErr(id uint16) error {
	if q.err != nil {
		return q.err
	}
	if p := q.pk; p.unordered() {
		return fmt.Errorf("%w: queue %d buffer id %d: IN_ORDER, restored with %d chains adopted and %d descriptors in flight not adopted, whose order is unknown (AdoptInFlight every chain restored in flight first)",
			ErrNotInFlight, q.index, id, p.adopted, p.lost)
	}
	if q.pk.lost != 0 && int(id) < len(q.pk.ids) {
		return fmt.Errorf("%w: queue %d buffer id %d (restored with chains in flight whose ids are unknown)", ErrNotInFlight, q.index, id)
	}
	return fmt.Errorf("%w: queue %d buffer id %d", ErrNotInFlight, q.index, id)
}

// release returns id's ring descriptors: the used position moves past
// them. It returns the ring index where id's used descriptor goes, the
// used wrap bits there and how many descriptors the used position moved.
func (p *packedDevice) release(id uint16) (at uint16, bits uint16, n uint16) {
	e := &p.ids[id]
	e.inflight = false
	if e.adopted {
		e.adopted = false
		p.adopted--
	}
	at, bits = p.nextUsed, p.usedBits
	n = e.ndesc
	if p.inOrder && p.lost != 0 {
		// The first used descriptor also covers the chains in flight at
		// the restore whose ids are unknown (see lost).
		n += p.lost
		p.lost = 0
	}
	p.inflight -= n
	p.sinceSignal += uint32(n)
	next := uint32(p.nextUsed) + uint32(n)
	if next >= uint32(p.r.size) {
		next -= uint32(p.r.size)
		p.usedBits ^= availUsed
	}
	p.nextUsed = uint16(next)
	return at, bits, n
}

// usedFlags is the flags of a used descriptor: AVAIL and USED equal to
// the used wrap counter, WRITE when the device wrote into the buffer
// (§2.8.4: len is only meaningful with WRITE) or the chain has writable
// buffers (as QEMU sets it).
func usedFlags(bits uint16, written uint32, writable uint64) uint16 {
	if written != 0 || writable != 0 {
		return bits | DescFWrite
	}
	return bits
}

func (q *DeviceQueue) packedPush(id uint16, written uint32) error {
	p := q.pk
	if q.err != nil || !p.pushable(id) || p.unordered() {
		return q.packedPushErr(id)
	}
	writable := p.ids[id].writable
	at, bits, n := p.release(id)
	d := &p.r.descs[at]
	// Rule 3: addr (the used mark) and len (plain stores), then the
	// id|flags word (release).
	d.addr, d.len = usedMark|uint64(n), written
	p.r.storeWord(at, id, usedFlags(bits, written, writable))
	if q.log != nil {
		return q.endLog(q.packedLogWrite(p.descLog+GuestAddr(16*uint64(at)), 16))
	}
	return nil
}

func (q *DeviceQueue) packedPushChain(c *Chain, written uint32) error {
	if !q.pk.pushable(c.Head) && q.err == nil && uint64(written) <= c.WritableLen {
		return q.packedPushErr(c.Head) // before logging: nothing to push
	}
	if err := q.LogChain(c, written); err != nil {
		return err
	}
	return q.packedPush(c.Head, written)
}

// packedPushBatch writes used descriptors for elems and publishes them
// with the first one's flags word stored last: one used descriptor per
// chain, with VIRTIO_F_IN_ORDER too.
//
// An IN_ORDER device may instead write one used descriptor for a run of
// chains (§2.8.8, §2.8.23: the skipped ones count as used completely).
// The device side does not: grouping receive buffers stalls DPDK's packed
// receive paths (one buffer per used descriptor), and grouping transmit
// completions, which DPDK's vhost library does, measured slower against
// DPDK 22.11's virtio-user (bench peers, 1 queue pair, interleaved runs:
// packed txonly 0.85-0.93x of net_vhost grouped, 1.03-1.10x not; macswap
// 0.58-0.64x either way). The driver side still follows groups from
// devices that send them.
func (q *DeviceQueue) packedPushBatch(elems []UsedElem) error {
	if q.err != nil {
		return q.err
	}
	if len(elems) == 0 {
		return nil
	}
	p := q.pk
	if p.unordered() {
		return q.packedPushErr(elems[0].Head)
	}
	// Check everything first: nothing is written unless every element is
	// a distinct buffer id in flight. The check takes each id out of
	// flight (a repeated id then fails) and puts them back on failure.
	ids := p.ids
	for i, e := range elems {
		if int(e.Head) >= len(ids) || !ids[e.Head].inflight {
			for _, u := range elems[:i] {
				ids[u.Head].inflight = true
			}
			for _, u := range elems[:i] {
				if u.Head == e.Head {
					return fmt.Errorf("%w: queue %d buffer id %d twice in one batch", ErrNotInFlight, q.index, e.Head)
				}
			}
			return q.packedPushErr(e.Head)
		}
		ids[e.Head].inflight = false
	}
	return q.packedWriteUsed(elems)
}

// packedWriteUsed is packedPushBatch once the ids are checked (and out of
// flight): a used descriptor per element, at consecutive used positions,
// the first one's word stored last. With IN_ORDER the first one also
// covers the chains in flight at a restore whose ids are unknown (lost).
func (q *DeviceQueue) packedWriteUsed(elems []UsedElem) error {
	p := q.pk
	ids, descs := p.ids, p.r.descs
	size := uint32(len(descs))
	start := uint32(p.nextUsed)
	pos, bits := start, p.usedBits
	var count, lost uint32
	if p.inOrder {
		lost, p.lost = uint32(p.lost), 0 // see lost
	}
	var firstWord uint32
	for i, e := range elems {
		ent := &ids[e.Head]
		if pos >= size { // never; lets the compiler drop the bounds check below
			break
		}
		if ent.adopted {
			ent.adopted = false
			p.adopted--
		}
		d := &descs[pos]
		w := uint32(e.Head) | uint32(usedFlags(bits, e.Len, ent.writable))<<16
		n := uint32(ent.ndesc)
		if i == 0 {
			n += lost
		}
		d.addr, d.len = usedMark|uint64(n), e.Len
		if i == 0 {
			firstWord = w
		} else {
			*descWord(d) = w // released by the first one's store below
		}
		count += n
		if pos += n; pos >= size {
			pos -= size
			bits ^= availUsed
		}
	}
	// Rule 3: the batch's first used descriptor last (release).
	storeRelease32(descWord(&descs[start]), firstWord)
	p.nextUsed, p.usedBits = uint16(pos), bits
	p.inflight -= uint16(count)
	p.sinceSignal += count
	if q.log != nil {
		return q.endLog(q.logUsedRange(start, count))
	}
	return nil
}

// logUsedRange logs the used descriptors written from ring index start
// over count descriptors (every byte from the first to the end of the
// range, in at most two pieces around the ring end).
func (q *DeviceQueue) logUsedRange(start, count uint32) error {
	p := q.pk
	size := uint32(p.r.size)
	end := start + count // exclusive, in descriptors, may pass size
	if end <= size {
		return q.packedLogWrite(p.descLog+GuestAddr(16*uint64(start)), 16*uint64(end-start))
	}
	if err := q.packedLogWrite(p.descLog+GuestAddr(16*uint64(start)), 16*uint64(size-start)); err != nil {
		return err
	}
	return q.packedLogWrite(p.descLog, 16*uint64(end-size))
}

func (q *DeviceQueue) packedNeedsInterrupt() bool {
	p := q.pk
	n := p.sinceSignal
	if n == 0 { // always when broken
		return false
	}
	p.sinceSignal = 0
	// Rule 5: a "no" needs the used descriptor's store ordered before the
	// load that decides it; a "yes" read without the barrier is at worst
	// spurious (see the split ring's NeedsInterrupt).
	if eventWanted(guestatomic.Load32(p.r.drvEvent), q.eventIdx, p.r.size, p.nextUsed, p.usedBits != 0, n) {
		return true
	}
	storeLoadFence(&q.fence)
	return eventWanted(guestatomic.Load32(p.r.drvEvent), q.eventIdx, p.r.size, p.nextUsed, p.usedBits != 0, n)
}

func (q *DeviceQueue) packedEnableNotify() (bool, error) {
	if q.err != nil {
		return false, q.err
	}
	if err := q.packedEnable(); err != nil {
		return false, err
	}
	// The store above is sequentially consistent; this load sees a
	// descriptor the driver made available before it, or the driver's
	// later load of the device event word sees our store and kicks.
	_, ok := q.pk.headAvailable()
	return ok, nil
}

func (q *DeviceQueue) packedDisableNotify() {
	if q.err != nil {
		return
	}
	q.notify = false
	_ = q.storeDevEvent(eventWord(0, EventFlagsDisable))
}

// packedSnapshot: the event suppression words (the only shared fields
// that are not descriptors).
func (q *DeviceQueue) packedSnapshot() RingSnapshot {
	p := q.pk
	drv, dev := guestatomic.Load32(p.r.drvEvent), guestatomic.Load32(p.r.devEvent)
	return RingSnapshot{
		Packed:     true,
		AvailFlags: uint16(drv >> 16), UsedEvent: uint16(drv),
		UsedFlags: uint16(dev >> 16), AvailEvent: uint16(dev),
	}
}
