package vring

import (
	"fmt"

	"github.com/vdpakit/vdpakit/internal/guestatomic"
	"github.com/vdpakit/vdpakit/virtio"
)

// packedDriver is the driver side of a packed ring (DriverQueue.pk). The
// DriverQueue's shared fields (mem, index, eventIdx, indirect, err, intr,
// outstanding, hint/cBase/cMem) keep their meaning.
type packedDriver struct {
	_ [64]byte // off cache lines shared with other allocations (the device side may be next door)
	r packedRing

	nextAvail uint16 // ring index of the next descriptor to fill
	availBits uint16 // AVAIL|USED bits of an available descriptor at nextAvail (DescFAvail: wrap 1)
	nextUsed  uint16 // ring index where the next used descriptor appears
	usedBits  uint16 // AVAIL|USED bits of a used descriptor there (both: wrap 1)
	numFree   int    // ring descriptors free

	freeIDs []uint16 // stack of free buffer ids
	ids     []drvID  // by buffer id

	// Chains added and not published: their head positions and flags,
	// stored by Publish.
	pending []pendingHead
	pubIdx  uint16 // nextAvail at the last Publish
	pubWrap bool
	// sinceKick is the number of descriptors published since the last
	// NeedsKick, added the number added since the last Publish.
	sinceKick uint32
	added     uint32

	// In-order (VIRTIO_F_IN_ORDER): the ids in flight in add order, and
	// the used descriptor being expanded (Reclaim returns the chains it
	// covers one by one).
	inOrder   bool
	order     []uint16 // ring buffer, len size
	orderHead int
	orderLen  int
	skipTo    uint16 // the used descriptor's id, while skipping
	skipLen   uint32 // its length
	skipping  bool
	drvEvent  uint32 // shadow of the driver event suppression word
	drvEventV bool
	_         [64]byte
}

type drvID struct {
	writable uint64
	ndesc    uint16
	inflight bool
	// published is set by Publish: only a published chain can be used (a
	// device naming a chain still pending would have the driver free it
	// and then publish a freed slot).
	published bool
}

type pendingHead struct {
	pos   uint16
	id    uint16
	flags uint16
}

func newPackedDriverQueue(mem *Memory, opts DriverQueueOptions) (*DriverQueue, error) {
	r, err := newPackedRing(mem, opts.Layout)
	if err != nil {
		return nil, fmt.Errorf("vring: queue %d: %w", opts.Index, err)
	}
	n := int(opts.Layout.Size)
	p := &packedDriver{
		r: r, freeIDs: make([]uint16, 0, n), ids: make([]drvID, n),
		pending: make([]pendingHead, 0, n),
		inOrder: opts.Features.Has(virtio.FInOrder),
	}
	if p.inOrder {
		p.order = make([]uint16, n)
	}
	q := &DriverQueue{
		mem: mem, index: opts.Index,
		eventIdx: opts.Features.Has(virtio.FEventIdx),
		indirect: opts.Features.Has(virtio.FIndirectDesc),
		pk:       p,
	}
	q.r.size = opts.Layout.Size
	q.packedReset()
	return q, nil
}

// Packed reports whether the queue is a packed virtqueue
// (VIRTIO_F_RING_PACKED).
func (q *DriverQueue) Packed() bool { return q.pk != nil }

func (q *DriverQueue) packedReset() {
	p := q.pk
	clear(p.r.desc)
	guestatomic.Store32(p.r.drvEvent, 0)
	guestatomic.Store32(p.r.devEvent, 0)
	p.nextAvail, p.nextUsed = 0, 0
	p.availBits, p.usedBits = setWrapBits(true, true)
	p.numFree = int(p.r.size)
	p.freeIDs = p.freeIDs[:0]
	for i := int(p.r.size) - 1; i >= 0; i-- {
		p.freeIDs = append(p.freeIDs, uint16(i))
	}
	clear(p.ids)
	p.pending = p.pending[:0]
	p.pubIdx, p.pubWrap, p.sinceKick, p.added = 0, true, 0, 0
	p.orderHead, p.orderLen, p.skipping = 0, 0, false
	p.drvEvent, p.drvEventV = 0, true
	q.outstanding = 0
	q.intr = true
	q.err = nil
}

func (q *DriverQueue) packedFail(index uint16, err error) error {
	e := qerr(q.index, index, false, err)
	q.err = &brokenError{cause: e}
	return e
}

// advance moves position (idx, bits) by one descriptor.
func (p *packedDriver) advance(idx, bits uint16) (uint16, uint16) {
	if idx++; idx == p.r.size {
		return 0, bits ^ availUsed
	}
	return idx, bits
}

// addChain takes a free id, records the chain and its pending head.
func (p *packedDriver) addChain(headPos, headFlags uint16, ndesc uint16, writable uint64) uint16 {
	id := p.freeIDs[len(p.freeIDs)-1]
	p.freeIDs = p.freeIDs[:len(p.freeIDs)-1]
	p.ids[id] = drvID{writable: writable, ndesc: ndesc, inflight: true}
	p.numFree -= int(ndesc)
	p.added += uint32(ndesc)
	p.pending = append(p.pending, pendingHead{pos: headPos, id: id, flags: headFlags})
	if p.inOrder {
		p.order[(p.orderHead+p.orderLen)%len(p.order)] = id
		p.orderLen++
	}
	return id
}

// descFlags is a packed descriptor's flags: the lap's AVAIL|USED bits,
// WRITE and NEXT.
func descFlags(bits uint16, writable, next bool) uint16 {
	if writable {
		bits |= DescFWrite
	}
	if next {
		bits |= DescFNext
	}
	return bits
}

func (q *DriverQueue) packedAdd(bufs []Buffer) (uint16, error) {
	if q.err != nil {
		return 0, q.err
	}
	p := q.pk
	if len(bufs) == 0 || len(bufs) > p.numFree || len(p.freeIDs) == 0 {
		// The errors in checkBufs' order: a bad chain before no space.
		if _, err := q.checkBufs(bufs); err != nil {
			return 0, err
		}
		return 0, fmt.Errorf("%w: queue %d: need %d, have %d", ErrNoSpace, q.index, len(bufs), p.numFree)
	}
	// One pass checks each buffer as checkBufs does and writes its address
	// and length; the id|flags words of the descriptors after the head,
	// which make them look available, are written only once the whole
	// chain is accepted (a rejected chain's would be found as the next
	// chain's head once a shorter chain is added there). The head's word
	// is stored by Publish (rule 1).
	id := p.freeIDs[len(p.freeIDs)-1]
	head, headBits := p.nextAvail, p.availBits
	pos, bits := head, headBits
	var writable uint64
	w := false
	for i, b := range bufs {
		if (w && !b.Writable) || (!q.inCache(b) && !q.contains(b.Addr, b.Len)) {
			return 0, q.bufErr(i, b, w)
		}
		w = b.Writable
		if w {
			writable += uint64(b.Len)
		}
		d := &p.r.descs[pos]
		d.addr, d.len = uint64(b.Addr), b.Len
		pos, bits = p.advance(pos, bits)
	}
	headFlags := descFlags(headBits, bufs[0].Writable, len(bufs) > 1)
	if len(bufs) > 1 {
		pos, bits := p.advance(head, headBits)
		for i := 1; i < len(bufs); i++ {
			d := &p.r.descs[pos]
			d.id, d.flags = id, descFlags(bits, bufs[i].Writable, i < len(bufs)-1)
			pos, bits = p.advance(pos, bits)
		}
	}
	p.nextAvail, p.availBits = pos, bits
	p.addChain(head, headFlags, uint16(len(bufs)), writable)
	q.outstanding++
	return id, nil
}

func (q *DriverQueue) packedAddIndirect(table GuestAddr, bufs []Buffer) (uint16, error) {
	if q.err != nil {
		return 0, q.err
	}
	if !q.indirect {
		return 0, fmt.Errorf("%w: queue %d", ErrIndirectNotNegotiated, q.index)
	}
	p := q.pk
	if len(bufs) > int(p.r.size) {
		return 0, fmt.Errorf("%w: queue %d: %d buffers in an indirect table of a size-%d queue", ErrBadChain, q.index, len(bufs), p.r.size)
	}
	writable, err := q.checkBufs(bufs)
	if err != nil {
		return 0, err
	}
	if p.numFree < 1 || len(p.freeIDs) == 0 {
		return 0, fmt.Errorf("%w: queue %d: need 1, have 0", ErrNoSpace, q.index)
	}
	t, err := q.mem.Slice(table, 16*uint64(len(bufs)))
	if err != nil {
		return 0, fmt.Errorf("%w: queue %d: indirect table: %w", ErrBadChain, q.index, err)
	}
	for i, b := range bufs {
		var flags uint16 // WRITE is the only flag in an indirect table (§2.8.17)
		if b.Writable {
			flags = DescFWrite
		}
		writeDesc(t, uint16(i), uint64(b.Addr), b.Len, 0, flags) // packed: id 0 at 12, flags at 14
	}
	head := p.nextAvail
	d := &p.r.descs[head]
	d.addr, d.len = uint64(table), uint32(16*len(bufs))
	headFlags := p.availBits | DescFIndirect
	p.nextAvail, p.availBits = p.advance(head, p.availBits)
	id := p.addChain(head, headFlags, 1, writable)
	q.outstanding++
	return id, nil
}

// packedPublish stores the pending heads' flags words, the first last
// (rule 1: one release publishes the batch).
func (q *DriverQueue) packedPublish() {
	p := q.pk
	n := len(p.pending)
	if n == 0 {
		return
	}
	for i := n - 1; i > 0; i-- {
		h := p.pending[i]
		p.ids[h.id].published = true
		p.r.setWord(h.pos, h.id, h.flags) // released by the first head's store
	}
	h := p.pending[0]
	p.ids[h.id].published = true
	p.r.storeWord(h.pos, h.id, h.flags)
	p.sinceKick += p.added
	p.added = 0
	p.pending = p.pending[:0]
	p.pubIdx, p.pubWrap = p.nextAvail, p.availBits == DescFAvail
}

func (q *DriverQueue) packedNeedsKick() bool {
	p := q.pk
	n := p.sinceKick
	if n == 0 {
		return false
	}
	p.sinceKick = 0
	// Rule 5: a "no" needs the head's store ordered before the load that
	// decides it; a "yes" read without the barrier is at worst spurious
	// (see the split ring's NeedsKick).
	if eventWanted(guestatomic.Load32(p.r.devEvent), q.eventIdx, p.r.size, p.pubIdx, p.pubWrap, n) {
		return true
	}
	storeLoadFence(&q.fence)
	return eventWanted(guestatomic.Load32(p.r.devEvent), q.eventIdx, p.r.size, p.pubIdx, p.pubWrap, n)
}

// usedAt loads the flags word at nextUsed and reports whether it is a used
// descriptor of the current lap.
func (p *packedDriver) usedAt() (id, flags uint16, ok bool) {
	id, flags = p.r.loadWord(p.nextUsed)
	return id, flags, flags&availUsed == p.usedBits
}

// armWord is the driver event word asking for an interrupt when the
// descriptor at nextUsed is used (DESC with EVENT_IDX, ENABLE otherwise).
func (p *packedDriver) armWord(eventIdx bool) uint32 {
	if eventIdx {
		return eventWord(PackedIndex(p.nextUsed, p.usedBits != 0), EventFlagsDesc)
	}
	return eventWord(0, EventFlagsEnable)
}

func (p *packedDriver) storeDrvEvent(w uint32) {
	if p.drvEventV && p.drvEvent == w {
		return
	}
	guestatomic.Store32(p.r.drvEvent, w)
	p.drvEvent, p.drvEventV = w, true
}

// free returns id's chain: its ring descriptors and the id.
func (p *packedDriver) free(id uint16) {
	e := &p.ids[id]
	e.inflight, e.published = false, false
	p.numFree += int(e.ndesc)
	next := uint32(p.nextUsed) + uint32(e.ndesc)
	if next >= uint32(p.r.size) {
		next -= uint32(p.r.size)
		p.usedBits ^= availUsed
	}
	p.nextUsed = uint16(next)
	p.freeIDs = append(p.freeIDs, id)
}

func (q *DriverQueue) packedReclaim() (uint16, uint32, bool, error) {
	if q.err != nil {
		return 0, 0, false, q.err
	}
	p := q.pk
	if p.skipping {
		return q.packedSkipNext()
	}
	if q.outstanding == 0 {
		return 0, 0, false, nil
	}
	id, flags, ok := p.usedAt()
	if !ok {
		if !q.intr || !q.eventIdx {
			return 0, 0, false, nil
		}
		w := p.armWord(true)
		if p.drvEventV && p.drvEvent == w {
			return 0, 0, false, nil
		}
		p.storeDrvEvent(w)
		if id, flags, ok = p.usedAt(); !ok {
			return 0, 0, false, nil
		}
	}
	// Rule 4: len after the acquire load of the word. Without WRITE the
	// length is reserved and ignored (§2.8.4).
	length := p.r.descs[p.nextUsed].len
	if flags&DescFWrite == 0 {
		length = 0
	}
	if int(id) >= len(p.ids) || !p.ids[id].published {
		return 0, 0, false, q.packedFail(p.nextUsed, ErrUsedIDNotOutstanding)
	}
	if uint64(length) > p.ids[id].writable {
		return 0, 0, false, q.packedFail(p.nextUsed, ErrUsedLenTooLarge)
	}
	if p.inOrder && p.order[p.orderHead] != id {
		// An IN_ORDER device used every chain added before id too, with
		// one used descriptor (§2.8.8): return them one by one.
		p.skipping, p.skipTo, p.skipLen = true, id, length
		return q.packedSkipNext()
	}
	q.packedRelease(id)
	return id, length, true, nil
}

// packedSkipNext returns the oldest chain covered by the in-order used
// descriptor being expanded: the chains before its id with their whole
// writable length (they count as used completely, §2.8.8), then the id
// itself with the length the device wrote.
func (q *DriverQueue) packedSkipNext() (uint16, uint32, bool, error) {
	p := q.pk
	id := p.order[p.orderHead]
	if id == p.skipTo {
		p.skipping = false
		q.packedRelease(id)
		return id, p.skipLen, true, nil
	}
	length := uint32(min(p.ids[id].writable, 0xffffffff))
	q.packedRelease(id)
	return id, length, true, nil
}

func (q *DriverQueue) packedRelease(id uint16) {
	p := q.pk
	p.free(id)
	if p.inOrder {
		p.orderHead = (p.orderHead + 1) % len(p.order)
		p.orderLen--
	}
	q.outstanding--
}

func (q *DriverQueue) packedEnableInterrupts() (bool, error) {
	if q.err != nil {
		return false, q.err
	}
	q.intr = true
	p := q.pk
	p.storeDrvEvent(p.armWord(q.eventIdx))
	if p.skipping {
		return true, nil
	}
	if q.outstanding == 0 {
		return false, nil
	}
	_, _, ok := p.usedAt()
	return ok, nil
}

func (q *DriverQueue) packedDisableInterrupts() {
	q.intr = false
	q.pk.storeDrvEvent(eventWord(0, EventFlagsDisable))
}
