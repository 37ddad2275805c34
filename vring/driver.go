package vring

import (
	"fmt"

	"github.com/vdpakit/vdpakit/virtio"
)

// Buffer is one buffer of a chain the driver side adds.
type Buffer struct {
	Addr     GuestAddr
	Len      uint32
	Writable bool // device-writable
}

// DriverQueueOptions configure a driver-side queue.
type DriverQueueOptions struct {
	// Index is the queue's number, reported in errors.
	Index int
	// Layout is where the ring lives; the driver side zeroes it.
	Layout Layout
	// Features are the negotiated features; INDIRECT_DESC and EVENT_IDX
	// matter here.
	Features virtio.Features
}

type chainInfo struct {
	tail     uint16 // last descriptor of the chain in the table
	ndesc    uint16 // descriptors it uses in the table
	writable uint64 // writable bytes
	inflight bool
}

// DriverQueue is the driver side of a split virtqueue (what a guest driver,
// a VMM test or a shadow relay does): it adds chains, publishes them, decides
// whether to kick, and reclaims used entries. Its free-descriptor list is
// private, so a misbehaving device cannot corrupt it. A DriverQueue is owned
// by one goroutine; the device may run anywhere.
type DriverQueue struct {
	_        [64]byte // keep the fields off cache lines shared with other allocations (the device side may be next door)
	mem      *Memory
	fence    uint32 // storeLoadFence's private word (NeedsKick)
	r        ring
	index    int
	eventIdx bool
	indirect bool

	freeNext    []uint16
	freeHead    uint16
	numFree     int
	chains      []chainInfo
	availIdx    uint16 // next avail index to fill
	published   uint16 // avail.idx in memory
	kicked      uint16 // avail.idx at the last NeedsKick
	lastUsed    uint16 // next used index to reclaim
	usedSeen    uint16 // used.idx at the last load
	outstanding int    // chains added and not reclaimed
	availFlags  uint16 // shadow of avail.flags
	usedEvent   uint16 // shadow of used_event
	intr        bool   // interrupts enabled
	err         error
	hint        uint32    // index of the last region hit (checkBufs)
	cBase       GuestAddr // that region's base and bytes: buffers inside
	cMem        []byte    // it are checked without a table lookup

	pk *packedDriver // the packed ring's state, nil for a split queue (packed_driver.go)

	// prefetchTrace, when set (by tests), sees what ReclaimBatch asks for
	// (prefetch_driver.go), by host address: n used-ring entries from addr
	// in lines cache lines (used), or one descriptor (n and lines 1).
	prefetchTrace func(used bool, addr HostAddr, n, lines int)
	_             [64]byte
}

// NewDriverQueue validates opts against mem, zeroes the ring areas (as a
// driver does before handing a queue to a device) and returns the driver
// side with interrupts enabled. Only one agent may be the driver of a ring.
func NewDriverQueue(mem *Memory, opts DriverQueueOptions) (*DriverQueue, error) {
	if isPacked(opts.Features) {
		return newPackedDriverQueue(mem, opts)
	}
	r, err := newRing(mem, opts.Layout, opts.Features)
	if err != nil {
		return nil, fmt.Errorf("vring: queue %d: %w", opts.Index, err)
	}
	n := int(opts.Layout.Size)
	q := &DriverQueue{
		mem: mem, r: r, index: opts.Index,
		eventIdx: opts.Features.Has(virtio.FEventIdx),
		indirect: opts.Features.Has(virtio.FIndirectDesc),
		freeNext: make([]uint16, n), chains: make([]chainInfo, n),
	}
	q.Reset()
	return q, nil
}

// Reset re-initializes the driver side as after NewDriverQueue, as a driver
// does after a device reset before setting the queue up again: it zeroes
// the descriptor table and both rings in guest memory, frees every
// descriptor (chains not reclaimed are dropped), starts the indexes from 0,
// enables interrupts and clears a broken state. No device may be using the
// ring meanwhile; a device side must start again from a zero QueueState
// (a new DeviceQueue, or Reset of one created with a zero state).
func (q *DriverQueue) Reset() {
	if q.pk != nil {
		q.packedReset()
		return
	}
	clear(q.r.desc)
	clear(q.r.avail)
	clear(q.r.used)
	for i := range q.freeNext {
		q.freeNext[i] = uint16(i + 1)
	}
	clear(q.chains)
	q.freeHead, q.numFree = 0, len(q.freeNext)
	q.availIdx, q.published, q.kicked = 0, 0, 0
	q.lastUsed, q.usedSeen, q.outstanding = 0, 0, 0
	q.availFlags, q.usedEvent = 0, 0
	q.intr = true
	q.err = nil
}

// Size is the queue size.
func (q *DriverQueue) Size() uint16 { return q.r.size }

// NumFree is the number of free descriptors.
func (q *DriverQueue) NumFree() int {
	if q.pk != nil {
		return q.pk.numFree
	}
	return q.numFree
}

// Outstanding is the number of chains added and not yet reclaimed.
func (q *DriverQueue) Outstanding() int { return q.outstanding }

// Err returns the error that broke the queue (wrapping ErrQueueBroken), or nil.
func (q *DriverQueue) Err() error { return q.err }

func (q *DriverQueue) fail(index uint16, err error) error {
	e := qerr(q.index, index, false, err)
	q.err = &brokenError{cause: e}
	return e
}

// checkBufs validates a chain: non-empty, readable before writable, every
// buffer in guest memory. It returns the writable byte count.
func (q *DriverQueue) checkBufs(bufs []Buffer) (uint64, error) {
	if len(bufs) == 0 {
		return 0, fmt.Errorf("%w: queue %d: empty chain", ErrBadChain, q.index)
	}
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
	}
	return writable, nil
}

// inCache reports whether buffer b lies in the cached region: the fast
// path of checkBufs' range check (contains is the slow one).
func (q *DriverQueue) inCache(b Buffer) bool {
	off := uint64(b.Addr - q.cBase)
	return off < uint64(len(q.cMem)) && uint64(b.Len) <= uint64(len(q.cMem))-off
}

// bufErr is the error of buffer i of a chain that broke checkBufs' rules
// (w: an earlier buffer was writable): readable after writable, else out
// of range.
func (q *DriverQueue) bufErr(i int, b Buffer, w bool) error {
	if w && !b.Writable {
		return fmt.Errorf("%w: queue %d: buffer %d readable after writable", ErrBadChain, q.index, i)
	}
	return fmt.Errorf("%w: queue %d: buffer %d %v+%#x: %w", ErrBadChain, q.index, i, b.Addr, b.Len, ErrOutOfRange)
}

// contains is checkBufs' slow path: a buffer outside the cached region
// (or a zero-length one at its end).
// It checks the buffer against the memory table and caches the region that
// holds its first byte.
func (q *DriverQueue) contains(addr GuestAddr, n uint32) bool {
	if n == 0 {
		// As the device checks it: in a region or at the end of one.
		return q.mem.checkEmpty(addr, q.hint) == nil
	}
	if !q.mem.Contains(addr, uint64(n)) {
		return false
	}
	if rs, i, _ := q.mem.find(addr, 1, q.hint); i >= 0 {
		q.hint = uint32(i)
		q.cBase, q.cMem = rs[i].base, rs[i].mem
	}
	return true
}

// Add writes a chain of buffers (readable first, then writable) into free
// descriptors and the available ring, and returns its head. The chain is
// visible to the device after Publish. On a packed queue it writes the
// chain into the next ring descriptors and returns its buffer id; Publish
// then stores the heads' flags.
func (q *DriverQueue) Add(bufs []Buffer) (uint16, error) {
	if q.pk != nil {
		return q.packedAdd(bufs)
	}
	if q.err != nil {
		return 0, q.err
	}
	if len(bufs) == 0 || len(bufs) > q.numFree {
		// The errors in checkBufs' order: a bad chain before no space.
		if _, err := q.checkBufs(bufs); err != nil {
			return 0, err
		}
		return 0, fmt.Errorf("%w: queue %d: need %d, have %d", ErrNoSpace, q.index, len(bufs), q.numFree)
	}
	// One pass: each buffer is checked as checkBufs does and written into
	// a free descriptor. Free descriptors are the driver's own and
	// invisible to the device, so a chain rejected midway leaves nothing
	// to undo: the free list and the ring move only once it is complete.
	head := q.freeHead
	cur := head
	descs := q.r.descs
	var writable uint64
	w := false
	for i, b := range bufs {
		if (w && !b.Writable) || (!q.inCache(b) && !q.contains(b.Addr, b.Len)) {
			return 0, q.bufErr(i, b, w)
		}
		w = b.Writable
		var flags uint16
		if w {
			flags = DescFWrite
			writable += uint64(b.Len)
		}
		d := &descs[cur]
		d.addr, d.len = uint64(b.Addr), b.Len
		if i == len(bufs)-1 {
			d.flags, d.next = flags, 0
			break
		}
		next := q.freeNext[cur]
		d.flags, d.next = flags|DescFNext, next
		cur = next
	}
	q.freeHead = q.freeNext[cur]
	q.numFree -= len(bufs)
	q.chains[head] = chainInfo{tail: cur, ndesc: uint16(len(bufs)), writable: writable, inflight: true}
	q.makeAvail(head)
	return head, nil
}

// AddIndirect writes bufs as an indirect descriptor table at table (which
// must hold 16*len(bufs) bytes of guest memory the caller keeps untouched
// until the chain is reclaimed) and adds a single descriptor pointing to it.
// It needs VIRTIO_F_INDIRECT_DESC.
func (q *DriverQueue) AddIndirect(table GuestAddr, bufs []Buffer) (uint16, error) {
	if q.pk != nil {
		return q.packedAddIndirect(table, bufs)
	}
	if q.err != nil {
		return 0, q.err
	}
	if !q.indirect {
		return 0, fmt.Errorf("%w: queue %d", ErrIndirectNotNegotiated, q.index)
	}
	if len(bufs) > int(q.r.size) {
		return 0, fmt.Errorf("%w: queue %d: %d buffers in an indirect table of a size-%d queue", ErrBadChain, q.index, len(bufs), q.r.size)
	}
	writable, err := q.checkBufs(bufs)
	if err != nil {
		return 0, err
	}
	if q.numFree < 1 {
		return 0, fmt.Errorf("%w: queue %d: need 1, have 0", ErrNoSpace, q.index)
	}
	t, err := q.mem.Slice(table, 16*uint64(len(bufs)))
	if err != nil {
		return 0, fmt.Errorf("%w: queue %d: indirect table: %w", ErrBadChain, q.index, err)
	}
	for i, b := range bufs {
		var flags uint16
		if b.Writable {
			flags = DescFWrite
		}
		next := uint16(0)
		if i < len(bufs)-1 {
			flags |= DescFNext
			next = uint16(i + 1)
		}
		writeDesc(t, uint16(i), uint64(b.Addr), b.Len, flags, next)
	}
	head := q.freeHead
	writeDesc(q.r.desc, head, uint64(table), uint32(16*len(bufs)), DescFIndirect, 0)
	q.freeHead = q.freeNext[head]
	q.numFree--
	q.chains[head] = chainInfo{tail: head, ndesc: 1, writable: writable, inflight: true}
	q.makeAvail(head)
	return head, nil
}

func (q *DriverQueue) makeAvail(head uint16) {
	q.r.setAvailEntry(q.availIdx, head)
	q.availIdx++
	q.outstanding++
}

// Publish makes every chain added so far visible to the device (one atomic
// avail.idx store, release-ordered after the descriptors and ring entries).
// It is not a full barrier: a driver that publishes often and decides on a
// notification once per batch (NeedsKick) pays for the store->load fence
// once per batch, as Linux's virtio drivers do with xmit_more.
func (q *DriverQueue) Publish() {
	if q.pk != nil {
		q.packedPublish()
		return
	}
	if q.published == q.availIdx {
		return
	}
	q.r.storeAvailIdx(q.availIdx)
	q.published = q.availIdx
}

// NeedsKick reports whether the device wants a notification for the chains
// published since the previous call: with EVENT_IDX when avail.idx passed
// avail_event, otherwise unless the device set NO_NOTIFY. Call it after
// Publish.
//
// Ordering (rule 5): a "no" needs a full barrier between the avail.idx
// store of Publish and the load of avail_event or used.flags that decides
// it, so that of the driver ("store avail.idx, load the device's field")
// and a device re-enabling notifications ("store its field, load
// avail.idx") at least one sees the other's store. A "yes" needs none: a
// read before the barrier can only be older than the truth, and a kick
// the device no longer wanted is a spurious one, which costs it a look at
// its ring. So the field is read once without the barrier, and the
// barrier and a second read are paid only when that read says no.
func (q *DriverQueue) NeedsKick() bool {
	if q.pk != nil {
		return q.packedNeedsKick()
	}
	newIdx, old := q.published, q.kicked
	if newIdx == old {
		return false
	}
	q.kicked = newIdx
	if q.kickWanted(newIdx, old) {
		return true
	}
	storeLoadFence(&q.fence)
	return q.kickWanted(newIdx, old)
}

// kickWanted reads the device's suppression field: whether it wants a
// notification for avail.idx moving from old to newIdx.
func (q *DriverQueue) kickWanted(newIdx, old uint16) bool {
	if q.eventIdx {
		return needEvent(load16(q.r.availEvent), newIdx, old)
	}
	flags, _ := q.r.loadUsedWord()
	return flags&UsedFNoNotify == 0
}

// Reclaim takes the next used entry: the chain's head and the length the
// device reported. It returns ok == false when none is pending. With
// interrupts enabled and EVENT_IDX, finding none writes used_event = next
// used index and re-checks (see EnableInterrupts). A device breaking the
// rules returns a *QueueError and breaks the queue.
func (q *DriverQueue) Reclaim() (head uint16, length uint32, ok bool, err error) {
	if q.pk != nil {
		return q.packedReclaim()
	}
	if q.err != nil {
		return 0, 0, false, q.err
	}
	if q.lastUsed == q.usedSeen {
		n, err := q.refresh()
		if err != nil {
			return 0, 0, false, err
		}
		if n == 0 {
			if !q.intr || !q.eventIdx || q.usedEvent == q.lastUsed {
				return 0, 0, false, nil
			}
			q.usedEvent = q.lastUsed
			store16(q.r.usedEvent, q.lastUsed)
			if n, err = q.refresh(); err != nil || n == 0 {
				return 0, 0, false, err
			}
		}
	}
	e := &q.r.usedRing[q.lastUsed&q.r.mask]
	id, length := e.id, e.len
	if id >= uint32(q.r.size) || !q.chains[id].inflight {
		return 0, 0, false, q.fail(q.lastUsed, ErrUsedIDNotOutstanding)
	}
	c := &q.chains[id]
	if uint64(length) > c.writable {
		return 0, 0, false, q.fail(q.lastUsed, ErrUsedLenTooLarge)
	}
	c.inflight = false
	q.freeNext[c.tail] = q.freeHead
	q.freeHead = uint16(id)
	q.numFree += int(c.ndesc)
	q.outstanding--
	q.lastUsed++
	return uint16(id), length, true, nil
}

// ReclaimBatch takes up to len(out) used entries into out, in the order
// the device used them, and returns how many it took. It is Reclaim in a
// loop, with the entries already known to be used taken in one pass: a
// driver that reclaims in bursts pays for one call, and used.idx is loaded
// only when the entries known run out. Fewer than len(out) means none is
// pending now; as with Reclaim, finding none with interrupts enabled and
// EVENT_IDX writes used_event = next used index and re-checks, so a caller
// that stops at a short batch and waits for an interrupt gets one. A
// device breaking the rules returns the entries taken before the bad one
// and a *QueueError, and breaks the queue.
func (q *DriverQueue) ReclaimBatch(out []UsedElem) (int, error) {
	if q.pk != nil {
		return q.packedReclaimBatch(out)
	}
	if q.err != nil {
		return 0, q.err
	}
	n := 0
	for {
		if k := min(int(q.usedSeen-q.lastUsed), len(out)-n); k > 0 {
			m, err := q.reclaimRun(out[n : n+k])
			n += m
			if err != nil {
				return n, err
			}
		}
		if n == len(out) {
			return n, nil
		}
		k, err := q.refresh()
		if err != nil {
			return n, err
		}
		if k == 0 {
			if !q.intr || !q.eventIdx || q.usedEvent == q.lastUsed {
				return n, nil
			}
			q.usedEvent = q.lastUsed
			store16(q.r.usedEvent, q.lastUsed)
			if k, err = q.refresh(); err != nil || k == 0 {
				return n, err
			}
		}
		// The entries the next reclaimRun reads, asked for together.
		q.prefetchUsed(min(int(k), len(out)-n))
	}
}

// reclaimRun is ReclaimBatch's tight loop: it takes len(out) entries known
// to be used (used.idx was loaded past them), each checked as Reclaim
// checks it, with the free list and counters in locals, stored back once.
func (q *DriverQueue) reclaimRun(out []UsedElem) (int, error) {
	used, chains, freeNext := q.r.usedRing, q.chains, q.freeNext
	mask := q.r.mask
	last, free, numFree := q.lastUsed, q.freeHead, q.numFree
	var err error
	i := 0
	for ; i < len(out); i++ {
		e := &used[last&mask]
		id, length := e.id, e.len
		if id >= uint32(len(chains)) || !chains[id].inflight {
			err = ErrUsedIDNotOutstanding
			break
		}
		c := &chains[id]
		if uint64(length) > c.writable {
			err = ErrUsedLenTooLarge
			break
		}
		c.inflight = false
		freeNext[c.tail] = free
		free = uint16(id)
		numFree += int(c.ndesc)
		out[i] = UsedElem{Head: uint16(id), Len: length}
		last++
	}
	q.lastUsed, q.freeHead, q.numFree = last, free, numFree
	q.outstanding -= i
	q.prefetchFreed(out[:i]) // the next Adds write these descriptors
	if err != nil {
		return i, q.fail(last, err)
	}
	return i, nil
}

func (q *DriverQueue) packedReclaimBatch(out []UsedElem) (int, error) {
	if q.err != nil { // also for an empty out, as on a split queue
		return 0, q.err
	}
	i := 0
	if p := q.pk; !p.inOrder && !p.skipping {
		var more bool
		if i, more = q.packedReclaimRun(out); !more {
			return i, nil
		}
	}
	// The rest one at a time: an IN_ORDER used descriptor's expansion, an
	// interrupt to arm before the last look, and every error.
	for ; i < len(out); i++ {
		head, length, ok, err := q.packedReclaim()
		if err != nil || !ok {
			return i, err
		}
		out[i] = UsedElem{Head: head, Len: length}
	}
	return len(out), nil
}

// packedReclaimRun is packedReclaimBatch's loop for a queue without
// IN_ORDER: it reclaims used descriptors into out while they are valid,
// with the position, wrap bits, free count and outstanding count in locals
// (stored back once), and no call per chain. It takes exactly what
// packedReclaim takes and does what packedRelease does; it stops at the
// first descriptor not used yet, or one packedReclaim would refuse, and
// reports in more whether packedReclaim must look at it (an error to
// report, or an interrupt to arm with EVENT_IDX before giving up).
func (q *DriverQueue) packedReclaimRun(out []UsedElem) (n int, more bool) {
	p := q.pk
	next, bits, free, outstanding := p.nextUsed, p.usedBits, p.numFree, q.outstanding
	ids, freeIDs, descs := p.ids, p.freeIDs, p.r.descs
	size := uint32(p.r.size)
	k := 0
	for ; k < len(out); k++ {
		if outstanding == 0 {
			break
		}
		id, flags := p.r.loadWord(next) // acquire: rule 4 for len below
		if flags&availUsed != bits {
			more = q.intr && q.eventIdx
			break
		}
		if int(id) >= len(ids) || !ids[id].published {
			more = true // packedReclaim reports it
			break
		}
		e := &ids[id]
		length := descs[next].len
		if flags&DescFWrite == 0 {
			length = 0 // reserved without WRITE (§2.8.4)
		}
		if uint64(length) > e.writable {
			more = true
			break
		}
		// packedRelease and free, in locals.
		e.inflight, e.published = false, false
		free += int(e.ndesc)
		pos := uint32(next) + uint32(e.ndesc)
		if pos >= size {
			pos -= size
			bits ^= availUsed
		}
		next = uint16(pos)
		freeIDs = append(freeIDs, id) // within its capacity: one slot per id
		outstanding--
		out[k] = UsedElem{Head: id, Len: length}
	}
	p.nextUsed, p.usedBits, p.numFree, p.freeIDs = next, bits, free, freeIDs
	q.outstanding = outstanding
	if k == len(out) {
		more = false
	}
	return k, more
}

func (q *DriverQueue) refresh() (uint16, error) {
	_, idx := q.r.loadUsedWord()
	n := idx - q.lastUsed
	if int(n) > q.outstanding {
		return 0, q.fail(idx, ErrUsedIdxJump)
	}
	q.usedSeen = idx
	return n, nil
}

// EnableInterrupts asks the device to interrupt when it uses chains (clears
// NO_INTERRUPT, or with EVENT_IDX sets used_event to the next used index)
// and then re-checks used.idx, reporting whether entries are already
// pending: the mirror image of DeviceQueue.EnableNotify, with the same race
// and the same store-then-load answer.
func (q *DriverQueue) EnableInterrupts() (pending bool, err error) {
	if q.pk != nil {
		return q.packedEnableInterrupts()
	}
	if q.err != nil {
		return false, q.err
	}
	q.intr = true
	if q.eventIdx {
		q.usedEvent = q.lastUsed
		store16(q.r.usedEvent, q.lastUsed)
	} else if q.availFlags&AvailFNoInterrupt != 0 {
		q.availFlags &^= AvailFNoInterrupt
		store16(q.r.availFlags, q.availFlags)
	}
	if q.lastUsed != q.usedSeen {
		return true, nil
	}
	n, err := q.refresh()
	return n > 0, err
}

// DisableInterrupts asks the device not to interrupt (a polling driver): it
// sets NO_INTERRUPT, or with EVENT_IDX stops moving used_event forward. It is
// a hint.
func (q *DriverQueue) DisableInterrupts() {
	if q.pk != nil {
		q.packedDisableInterrupts()
		return
	}
	q.intr = false
	if q.eventIdx || q.availFlags&AvailFNoInterrupt != 0 {
		return
	}
	q.availFlags |= AvailFNoInterrupt
	store16(q.r.availFlags, q.availFlags)
}
