package vring

import (
	"errors"
	"fmt"

	"github.com/vdpakit/vdpakit/internal/guestatomic"
	"github.com/vdpakit/vdpakit/virtio"
)

// Segment is one piece of a descriptor chain's buffer.
type Segment struct {
	Addr     GuestAddr // guest address of the piece
	Len      uint32    // length in bytes (len(Buf))
	Writable bool      // device-writable (VIRTQ_DESC_F_WRITE)
	// Buf is the piece's guest memory, zero-copy. It stays valid while the
	// Memory is open; the driver may reuse it once the chain is pushed.
	Buf []byte
}

// Chain is a descriptor chain popped by the device side: the readable
// segments, then the writable ones. A descriptor whose buffer crosses from
// one region into an adjacent one appears as several segments; a chain has
// at most MaxChainSegments(queue size) of them. Reuse a Chain across Pop
// calls: Segs keeps its capacity, so steady-state popping does not allocate.
// Pop grows Segs (when a chain does not fit) to at most MaxChainSegments
// elements; it never shrinks it, so a holder of many Chains that wants
// memory back after an unusually long chain replaces that Chain's Segs.
type Chain struct {
	Head        uint16    // head descriptor index (packed: the buffer id): the id to Push
	Segs        []Segment // Segs[:Readable] readable, Segs[Readable:] writable
	Readable    int       // number of readable segments
	ReadableLen uint64    // total readable bytes
	WritableLen uint64    // total writable bytes
	// Descs is the number of ring descriptors a packed chain occupies (1
	// for an indirect chain): the device's used position moves by it when
	// the chain is pushed. Only a packed queue's Pop sets it.
	Descs uint16
}

// Gather copies the chain's readable bytes into p and returns how many it
// copied (min(len(p), ReadableLen)).
func (c *Chain) Gather(p []byte) int {
	n := 0
	for i := 0; i < c.Readable && n < len(p); i++ {
		n += copy(p[n:], c.Segs[i].Buf)
	}
	return n
}

// Scatter copies p into the chain's writable segments and returns how many
// bytes it copied (min(len(p), WritableLen)). It does not log; PushChain
// logs the written bytes.
func (c *Chain) Scatter(p []byte) int {
	n := 0
	for i := c.Readable; i < len(c.Segs) && n < len(p); i++ {
		n += copy(c.Segs[i].Buf, p[n:])
	}
	return n
}

// MaxChainSegments is the most segments a popped chain may have on a queue
// of the given size; Pop refuses a chain that would have more
// (ErrTooManySegments, which also matches ErrChainTooLong).
//
// Every descriptor makes one segment, plus one for each boundary between
// adjacent guest-memory regions its buffer crosses, and a chain has at
// most size descriptors (counting indirect entries; ErrChainTooLong,
// ErrChainLoop). Without a bound on the crossings, a peer that maps many
// tiny adjacent regions (vfio-user accepts up to 65535 DMA windows of any
// size, VDUSE IOTLB entries are not limited) turns each descriptor into
// thousands of segments: with 8192 one-page regions a single chain of a
// size-256 queue became 2.1 million segments and 400 MiB. Guest RAM is a
// handful of large regions and a driver's buffer rarely straddles one of
// their boundaries, so the bound grants every descriptor one crossing plus
// 64 to spare:
//
//	2*size + 64 segments: 576 for a size-256 queue (23 KiB of Segments at
//	40 bytes each), 65600 for the largest, 32768 (2.5 MiB)
//
// That is always more than a chain of size descriptors that each cross one
// boundary needs. (Linux's vhost refuses any chain of more than UIO_MAXIOV, 1024,
// iovecs and DPDK's more than BUF_VECTOR_MAX, 256, whatever the queue
// size.) The bound is checked before a segment is added, so refusing a
// chain costs at most this many segments of work and memory.
func MaxChainSegments(size uint16) int { return 2*int(size) + 64 }

// grow extends Segs by one element and returns it; the caller has checked
// that len(Segs) < limit (MaxChainSegments). Fields are then set one by one:
// building a Segment value and copying it costs a store-forwarding stall on
// the hot path.
func (c *Chain) grow(limit int) *Segment {
	n := len(c.Segs)
	if n < cap(c.Segs) {
		c.Segs = c.Segs[:n+1]
	} else {
		c.Segs = growSegs(c.Segs, limit)
	}
	return &c.Segs[n]
}

// growSegs is the cold path of adding a segment to a full Segs (len ==
// cap, len < limit): it returns Segs one element longer, in a new array
// with room for twice as many but never more than limit, so that popping
// never grows a Chain's Segs past MaxChainSegments (beyond the capacity it
// was given): a holder of many Chains can count on that.
func growSegs(segs []Segment, limit int) []Segment {
	n := len(segs)
	s := make([]Segment, n+1, max(min(2*n, limit), n+1, 4))
	copy(s, segs)
	return s
}

// UsedElem is one used-ring entry for PushBatch.
type UsedElem struct {
	Head uint16 // chain head (Chain.Head)
	Len  uint32 // bytes written into the chain's writable buffers
}

// DeviceQueueOptions configure a device-side queue. Layout and State come
// from the driver or a migration stream and are validated.
type DeviceQueueOptions struct {
	// Index is the queue's number, reported in errors.
	Index int
	// Layout is where the ring lives in guest memory.
	Layout Layout
	// Features are the negotiated features; INDIRECT_DESC and EVENT_IDX
	// matter here.
	Features virtio.Features
	// Log, when set, receives every guest-memory write the queue makes
	// (used entries, used.flags/idx, avail_event, PushChain's written bytes).
	Log WriteLogger
	// UsedLogAddr, when non-zero, is the guest address used to log used-ring
	// writes instead of Layout.Used (vhost's log_guest_addr: the ring may be
	// addressed by IOVA or host address while the log is indexed by
	// guest-physical address).
	//
	// For a packed queue (VIRTIO_F_RING_PACKED) the device writes used
	// descriptors into the descriptor ring, so UsedLogAddr is the guest
	// address of the descriptor ring for logging (zero: Layout.Desc), and
	// DeviceEventLogAddr that of the device event suppression area (zero:
	// Layout.Used). See the package doc, "Dirty logging".
	UsedLogAddr GuestAddr
	// DeviceEventLogAddr, for a packed queue, is the guest address at
	// which writes to the device event suppression area are logged (zero:
	// Layout.Used). Unused for a split queue.
	DeviceEventLogAddr GuestAddr
	// State is the position to start from (zero for a new split queue,
	// InitialState(Features) for any new queue, the saved state on
	// migration). For a packed queue it is in the vhost encoding (index |
	// wrap counter << 15, see QueueState): both indexes below the size,
	// NextAvail at most one lap ahead of NextUsed; the ring descriptors in
	// between are chains in flight whose ids the restored queue does not
	// know (it cannot push them; they keep their descriptors, as in the
	// driver's count). NextAvail-NextUsed (in-flight chains) must not
	// exceed Layout.Size. NextUsed must equal used.idx in guest memory (the
	// index the device last published); the queue does not rewrite it until
	// its next push.
	State QueueState
}

// ErrInvalidState: a QueueState with more chains in flight than the queue size.
var ErrInvalidState = errors.New("vring: invalid queue state")

// DeviceQueue is the device side of a split virtqueue: it pops available
// chains and pushes used entries. A DeviceQueue is owned by one goroutine (no
// method is safe for concurrent use); the driver it talks to may run
// anywhere (another goroutine, process, the kernel or a guest).
type DeviceQueue struct {
	_        [64]byte // keep the fields off cache lines shared with other allocations (the driver side may be next door)
	mem      *Memory
	fence    uint32 // storeLoadFence's private word (NeedsInterrupt)
	r        ring
	index    int
	layout   Layout
	eventIdx bool
	indirect bool
	log      WriteLogger
	flusher  LogFlusher // log, if it caches marks (see LogFlusher); else nil
	usedLog  GuestAddr

	lastAvail  uint16 // next avail ring index to consume
	availSeen  uint16 // avail.idx at the last load
	prefetched uint16 // avail index up to which Prefetch has asked for buffers (see Prefetch)
	usedIdx    uint16 // next used index to publish (== used.idx in memory)
	usedFlags  uint16 // shadow of used.flags
	signalled  uint16 // used index at the last NeedsInterrupt
	availEvent uint16 // shadow of avail_event
	eventValid bool   // availEvent holds what memory holds
	notify     bool   // notifications enabled
	hint       uint32 // index of the last region hit for buffer translation
	cBase      GuestAddr
	cMem       []byte // that region's base and bytes (the fast path)
	init       QueueState
	err        error // *brokenError once broken
	// flagsWord is the avail.idx word when NeedsInterrupt can read
	// avail.flags as its low half (no EVENT_IDX, ring 4-aligned), else nil.
	flagsWord *uint32

	pk *packedDevice // the packed ring's state, nil for a split queue (packed_device.go)

	// prefetchTrace, when set (by tests), sees every buffer Prefetch
	// asks for: its guest address, cache lines and direction.
	prefetchTrace func(addr GuestAddr, lines int, write bool)
	_             [64]byte
}

// NewDeviceQueue validates opts against mem and returns the device side of
// the queue. It enables notifications (clears NO_NOTIFY; with EVENT_IDX
// writes avail_event = State.NextAvail) like vhost does on start; a memory
// fault doing so (ring pages truncated away by the memory's owner) is an
// error matching ErrMemoryFault.
func NewDeviceQueue(mem *Memory, opts DeviceQueueOptions) (*DeviceQueue, error) {
	if isPacked(opts.Features) {
		return newPackedDeviceQueue(mem, opts)
	}
	r, err := newRing(mem, opts.Layout, opts.Features)
	if err != nil {
		return nil, fmt.Errorf("vring: queue %d: %w", opts.Index, err)
	}
	if uint16(opts.State.NextAvail-opts.State.NextUsed) > opts.Layout.Size {
		return nil, fmt.Errorf("%w: queue %d: next avail %d, next used %d, size %d", ErrInvalidState,
			opts.Index, opts.State.NextAvail, opts.State.NextUsed, opts.Layout.Size)
	}
	q := &DeviceQueue{
		mem: mem, r: r, index: opts.Index, layout: opts.Layout,
		eventIdx: opts.Features.Has(virtio.FEventIdx),
		indirect: opts.Features.Has(virtio.FIndirectDesc),
		log:      opts.Log, usedLog: opts.UsedLogAddr, init: opts.State,
	}
	if q.usedLog == 0 {
		q.usedLog = opts.Layout.Used
	}
	q.flusher, _ = opts.Log.(LogFlusher)
	if !q.eventIdx && r.availIdxShift == 16 {
		q.flagsWord = r.availIdxWord
	}
	q.reset(opts.State)
	// The first write to the ring, on the caller's (server's) goroutine:
	// guarded, so ring pages a peer already truncated away fail the call
	// with ErrMemoryFault instead of killing the process.
	if err := Guard(func() error { return q.endLog(q.enable()) }); err != nil {
		if _, ok := err.(*FaultError); ok {
			return nil, fmt.Errorf("vring: queue %d: enable notifications: %w", opts.Index, err)
		}
		return nil, err
	}
	return q, nil
}

func (q *DeviceQueue) reset(st QueueState) {
	q.lastAvail, q.availSeen, q.prefetched = st.NextAvail, st.NextAvail, st.NextAvail
	q.usedIdx, q.signalled = st.NextUsed, st.NextUsed
	q.usedFlags = 0
	q.eventValid = false
	q.notify = true
	q.err = nil
}

// Layout returns the queue's validated layout.
func (q *DeviceQueue) Layout() Layout { return q.layout }

// Size is the queue size.
func (q *DeviceQueue) Size() uint16 { return q.r.size }

// Index is the queue index given in the options.
func (q *DeviceQueue) Index() int { return q.index }

// State returns the queue position for saving (migration): the next avail
// index to consume and the next used index to publish. Chains popped but not
// pushed are NextAvail-NextUsed; a device should push them before saving.
func (q *DeviceQueue) State() QueueState {
	if q.pk != nil {
		return q.packedState()
	}
	return QueueState{NextAvail: q.lastAvail, NextUsed: q.usedIdx}
}

// Err returns the error that broke the queue (wrapping ErrQueueBroken), or nil.
func (q *DeviceQueue) Err() error { return q.err }

// Reset clears a broken state and returns the queue to the position it was
// created with (DeviceQueueOptions.State), with notifications enabled, as
// after a device reset followed by re-initialization of the same ring. It
// writes nothing to guest memory; the driver re-initializes the ring.
func (q *DeviceQueue) Reset() {
	if q.pk != nil {
		q.packedReset(q.init)
		return
	}
	q.reset(q.init)
}

// fail breaks the queue with err at index and returns err. It is kept out
// of line: it is the cold path of every check in walk.
//
//go:noinline
func (q *DeviceQueue) fail(index uint16, indirect bool, err error) error {
	e := qerr(q.index, index, indirect, err)
	q.err = &brokenError{cause: e}
	// Forget the chains known to be available, so that Pop and PopBatch,
	// which check q.err only when they run out of those, stop here.
	q.availSeen = q.lastAvail
	// Likewise NeedsInterrupt (Push cannot move usedIdx while broken): a broken queue reports no interrupt.
	q.signalled = q.usedIdx
	return e
}

// endLog ends an operation that may have logged: with a caching logger
// (LogFlusher) it applies the marks — also after err, since the writes
// were made — and returns err, or the flush's error if err is nil. Without
// one it returns err (inlined: one nil check).
func (q *DeviceQueue) endLog(err error) error {
	if q.flusher == nil {
		return err
	}
	return q.flushLog(err)
}

func (q *DeviceQueue) flushLog(err error) error {
	ferr := q.flusher.FlushLog()
	if ferr == nil || err != nil {
		return err
	}
	if q.err != nil {
		return q.err
	}
	if q.pk != nil {
		return q.packedFail(q.pk.nextUsed, false, &wrap2{ErrLogWrite, ferr})
	}
	return q.fail(q.usedIdx, false, &wrap2{ErrLogWrite, ferr})
}

// FlushLog applies the marks a caching logger (LogFlusher) holds for this
// queue; without one it does nothing. The queue flushes at the end of each
// publication on its own; call FlushLog when the queue stops being driven
// (after the handler has stopped it), so that a final harvest of the log
// sees every write, including LogChain's for chains never pushed. It must
// not run concurrently with the queue's other methods. A flush failure
// breaks the queue with ErrLogWrite.
func (q *DeviceQueue) FlushLog() error { return q.endLog(nil) }

func (q *DeviceQueue) logWrite(addr GuestAddr, n uint64) error {
	if q.pk != nil {
		return q.packedLogWrite(addr, n)
	}
	if err := q.log.LogWrite(uint64(addr), n); err != nil {
		return q.fail(q.usedIdx, false, &wrap2{ErrLogWrite, err})
	}
	return nil
}

// refresh loads avail.idx and returns how many chains are available.
func (q *DeviceQueue) refresh() (uint16, error) {
	idx := q.r.loadAvailIdx()
	n := idx - q.lastAvail
	if n > q.r.size {
		return 0, q.fail(idx, false, ErrAvailIdxJump)
	}
	q.availSeen = idx
	return n, nil
}

// Pop takes the next available chain into c. It returns false when the ring
// is empty. With notifications enabled and EVENT_IDX, finding the ring empty
// writes avail_event = next avail index and re-checks (see EnableNotify).
// Any rule broken by the driver returns a *QueueError and breaks the queue.
func (q *DeviceQueue) Pop(c *Chain) (bool, error) {
	if q.pk != nil {
		return q.packedPop(c)
	}
	// Chains up to availSeen (the avail.idx last loaded, rule 2) are known
	// to be available: avail.idx is loaded again only once they are used
	// up. A broken queue has none (fail clears them).
	if q.lastAvail != q.availSeen {
		head := q.r.availEntry(q.lastAvail)
		// Fast path: a single direct descriptor inside the cached region.
		if descs := q.r.descs; int(head) < len(descs) {
			d := &descs[head]
			flags, addr, length := d.flags, GuestAddr(d.addr), d.len
			mem := q.cMem
			off := uint64(addr - q.cBase)
			// As in PopBatch: in the cached region, non-empty, ending inside.
			if segs := c.Segs; flags&(DescFNext|DescFIndirect) == 0 && off < uint64(len(mem)) &&
				uint64(length)-1 < uint64(len(mem))-off && cap(segs) != 0 {
				c.fill1(segs[:1], head, addr, length, flags, bufAt(mem, off, length))
				q.lastAvail++
				return true, nil
			}
		}
	}
	return q.popSlow(c)
}

// popSlow is Pop for everything but the fast path: a broken queue, no
// chain known to be available, or a chain that needs walk.
func (q *DeviceQueue) popSlow(c *Chain) (bool, error) {
	if q.lastAvail == q.availSeen {
		if ok, err := q.wait(); !ok {
			return false, err
		}
		return q.Pop(c) // now lastAvail != availSeen: Pop comes back here only to walk
	}
	head := q.r.availEntry(q.lastAvail)
	if !q.walkDirect(head, c) {
		if err := q.walk(head, c); err != nil {
			return false, err
		}
	}
	q.lastAvail++
	return true, nil
}

// walkDirect is walk's fast path (walkRun applies the same rules to a run
// of chains; a rule changed here is changed there too): a chain of direct
// descriptors whose buffers are non-empty and lie inside the cached region,
// readable ones before writable ones, no longer than c.Segs's capacity. It
// reads the descriptors through the typed table view, each descriptor once
// (into locals), and checks every value it uses on what it read. For any
// other chain it returns false, leaving c's contents unspecified, and the
// caller walks the chain with walk, which starts over from head and applies
// every rule with its typed errors (a driver changing the chain in between
// is judged on what walk reads).
func (q *DeviceQueue) walkDirect(head uint16, c *Chain) bool {
	descs, mem, base := q.r.descs, q.cMem, q.cBase
	segs := c.Segs[:cap(c.Segs)]
	idx := int(head)
	n, readable := 0, 0
	var rlen, wlen uint64
	for {
		// More descriptors than the table holds is a loop; more than segs
		// holds is for walk (which grows Segs).
		if idx >= len(descs) || n >= len(segs) || n >= len(descs) {
			return false
		}
		d := &descs[idx]
		flags, addr, length, next := d.flags, GuestAddr(d.addr), d.len, d.next
		// In the cached region (off wraps past len(mem) when addr < base),
		// non-empty (length-1 wraps when 0) and ending inside.
		off := uint64(addr - base)
		if flags&DescFIndirect != 0 || off >= uint64(len(mem)) || uint64(length)-1 >= uint64(len(mem))-off {
			return false
		}
		s := &segs[n]
		s.Addr, s.Len, s.Buf = addr, length, bufAt(mem, off, length)
		if flags&DescFWrite != 0 {
			s.Writable = true
			wlen += uint64(length)
		} else {
			if wlen != 0 { // readable after writable
				return false
			}
			s.Writable = false
			rlen += uint64(length)
			readable++
		}
		n++
		if flags&DescFNext == 0 {
			break
		}
		idx = int(next)
	}
	c.Head, c.Segs, c.Readable, c.ReadableLen, c.WritableLen = head, segs[:n], readable, rlen, wlen
	return true
}

// wait is Pop's slow start: the queue is broken or every chain seen
// available has been taken. It reloads avail.idx (re-arming avail_event
// first when notifications are on with EVENT_IDX and the ring is empty) and
// reports whether a chain is available now.
func (q *DeviceQueue) wait() (bool, error) {
	if q.err != nil {
		return false, q.err
	}
	n, err := q.refresh()
	if err != nil {
		return false, err
	}
	if n == 0 {
		if !q.notify || !q.eventIdx || (q.eventValid && q.availEvent == q.lastAvail) {
			return false, nil
		}
		if n, err = q.armAndRecheck(); err != nil || n == 0 {
			return false, err
		}
	}
	return true, nil
}

// fill1 makes c the one-segment chain head -> buf, with segs (c.Segs
// re-sliced to length 1 by the caller) as its Segs. Fields are set one by
// one: building a Segment value and copying it costs a store-forwarding
// stall on the hot path.
func (c *Chain) fill1(segs []Segment, head uint16, addr GuestAddr, length uint32, flags uint16, buf []byte) {
	c.Head = head
	c.Segs = segs
	seg := &segs[0]
	seg.Addr, seg.Len, seg.Buf = addr, length, buf
	if flags&DescFWrite != 0 {
		seg.Writable = true
		c.Readable, c.ReadableLen, c.WritableLen = 0, 0, uint64(length)
	} else {
		seg.Writable = false
		c.Readable, c.ReadableLen, c.WritableLen = 1, uint64(length), 0
	}
}

// PopBatch pops up to len(cs) chains into cs and returns how many it popped.
// On an error it returns the chains popped before it and the error.
func (q *DeviceQueue) PopBatch(cs []Chain) (int, error) {
	if q.pk != nil {
		return q.packedPopBatch(cs)
	}
	i := 0
	for i < len(cs) {
		// Chains already known to be available are taken in a tight loop
		// while they are single direct descriptors inside the cached
		// region; anything else goes through Pop.
		n := min(int(q.availSeen-q.lastAvail), len(cs)-i) // 0 when broken
		i += q.popRun(cs[i : i+n])
		if i == len(cs) {
			break
		}
		// Chains of several direct descriptors (or anything else popRun
		// does not take) that are known to be available: walkRun, without
		// going back through popRun for each. When popRun took every
		// chain known to be available (a device that keeps up with its
		// driver, every batch), popSlow reloads avail.idx without that
		// call.
		if n = min(int(q.availSeen-q.lastAvail), len(cs)-i); n != 0 {
			if i += q.walkRun(cs[i : i+n]); i == len(cs) {
				break
			}
		}
		// walkRun stopped at a chain it does not take (or ran out of known
		// ones): popSlow walks it (or reloads avail.idx and Pops).
		ok, err := q.popSlow(&cs[i])
		if err != nil || !ok {
			return i, err
		}
		i++
	}
	return i, nil
}

// PopBatchFit is PopBatch for a caller that bounds the memory its Chains
// hold. It pops the next chain into cs[0] as Pop does (a chain longer than
// cs[0].Segs's capacity grows it), then up to len(cs)-1 more only while
// each fits the capacity its Chain's Segs already has: it never grows
// cs[1:]'s Segs. It stops before a chain that does not fit, and before any
// chain only Pop's full walk takes (an indirect table, an empty buffer, a
// buffer outside the memory region the queue last read buffers from
// directly, on a packed ring several descriptors running past the ring's
// end, a broken rule), which the next call (or Pop) then takes as its
// first; the Segs elements of the Chain it stopped at may have been
// written. It returns 0 with a nil error when the ring is empty; on an
// error, the chains popped before it and the error, as PopBatch does.
//
// Fewer than len(cs) chains does not mean the ring is empty, and only a
// call that finds it empty (0 chains) re-arms the EVENT_IDX notification
// as Pop does: a device about to sleep calls EnableNotify first, as with
// Pop.
//
// A device that pops ahead of its need (a receive queue taking chains for
// the frames to come) can so pop in batches without letting a driver make
// every Chain it holds as long as the ring allows (MaxChainSegments): only
// the chains it pops one at a time, as it would with Pop, may grow.
func (q *DeviceQueue) PopBatchFit(cs []Chain) (int, error) {
	if len(cs) == 0 {
		return 0, nil
	}
	if q.pk != nil {
		return q.packedPopBatchFit(cs)
	}
	if ok, err := q.Pop(&cs[0]); err != nil || !ok {
		return 0, err
	}
	i := 1
	for i < len(cs) {
		n := min(int(q.availSeen-q.lastAvail), len(cs)-i)
		if n == 0 {
			// Every chain known to be available is taken: load avail.idx
			// again (without arming avail_event: chains were popped, and
			// Pop arms it when it finds the ring empty).
			k, err := q.refresh()
			if err != nil {
				return i, err
			}
			if k == 0 {
				break
			}
			continue
		}
		// popRun and walkRun take chains only into the room a Chain's
		// Segs has; what neither takes is left for the next call.
		k := q.popRun(cs[i : i+n])
		if k < n {
			k += q.walkRun(cs[i+k : i+n])
		}
		if i += k; k < n {
			break
		}
	}
	return i, nil
}

// packedPopBatchFit is PopBatchFit on a packed ring.
func (q *DeviceQueue) packedPopBatchFit(cs []Chain) (int, error) {
	if ok, err := q.packedPop(&cs[0]); err != nil || !ok {
		return 0, err
	}
	p := q.pk
	i := 1
	for i < len(cs) {
		flags, ok := p.headAvailable()
		if !ok {
			break
		}
		// As in packedPopBatch, without packedWalk: the two run loops
		// take chains only into the room a Chain's Segs has.
		k := 0
		if flags&(DescFNext|DescFIndirect) == 0 {
			k = q.packedPopRun(cs[i:])
		}
		if k == 0 && flags&DescFIndirect == 0 {
			k = q.packedWalkRun(cs[i:])
		}
		if k == 0 {
			break
		}
		i += k
	}
	return i, nil
}

// popRun is PopBatch's tight loop: it pops chains known to be available
// (len(batch) <= availSeen-lastAvail) into batch while they are single
// direct descriptors inside the cached region, and returns how many. It is
// a function of its own so that its loop, which calls nothing, keeps its
// values in registers.
func (q *DeviceQueue) popRun(batch []Chain) int {
	avail, descs := q.r.availRing, q.r.descs
	base, mem := q.cBase, q.cMem
	start := q.lastAvail
	// ring0 is set when avail.ring[0] shares the atomic avail.idx word
	// (a 2-aligned ring): slot 0 is then read through availEntry.
	ring0 := q.r.availIdxShift == 0
	k := 0
	if len(avail) != 0 { // always (len is the queue size); lets the compiler drop a bounds check
		for ; k < len(batch); k++ {
			slot := int(start+uint16(k)) & (len(avail) - 1)
			var head uint16
			if slot == 0 && ring0 {
				head = q.r.availEntry(0)
			} else {
				head = avail[slot]
			}
			if int(head) >= len(descs) {
				break
			}
			d := &descs[head]
			flags, addr, length := d.flags, GuestAddr(d.addr), d.len
			c := &batch[k]
			// In the cached region (off wraps past len(mem) when addr <
			// base), non-empty (length-1 wraps when 0) and ending inside.
			off := uint64(addr - base)
			segs := c.Segs
			if flags&(DescFNext|DescFIndirect) != 0 || off >= uint64(len(mem)) ||
				uint64(length)-1 >= uint64(len(mem))-off || cap(segs) == 0 {
				break
			}
			c.fill1(segs[:1], head, addr, length, flags, bufAt(mem, off, length))
		}
	}
	q.lastAvail = start + uint16(k)
	return k
}

// walkRun is PopBatch's loop for chains popRun does not take: it pops
// chains known to be available (len(batch) <= availSeen-lastAvail) into
// batch while walkDirect's rules take them (direct descriptors, non-empty,
// inside the cached region, readable before writable, no more than a
// Chain's Segs holds), and returns how many. It is walkDirect's loop inside
// popRun's: the ring's and the cached region's fields are loaded once per
// run, not once per chain, and no call is made per chain. The chain it
// stops at (whose Chain's contents are then unspecified) is left for
// popSlow (walkDirect, then walk with its typed errors), which reads it
// again from the start.
func (q *DeviceQueue) walkRun(batch []Chain) int {
	avail, descs := q.r.availRing, q.r.descs
	base, mem := q.cBase, q.cMem
	start := q.lastAvail
	ring0 := q.r.availIdxShift == 0 // as in popRun
	k := 0
	if len(avail) == 0 { // never (len is the queue size); drops a bounds check
		return 0
	}
chains:
	for ; k < len(batch); k++ {
		slot := int(start+uint16(k)) & (len(avail) - 1)
		var head uint16
		if slot == 0 && ring0 {
			head = q.r.availEntry(0)
		} else {
			head = avail[slot]
		}
		c := &batch[k]
		segs := c.Segs[:cap(c.Segs)]
		idx := int(head)
		n, readable := 0, 0
		var rlen, wlen uint64
		for {
			// As in walkDirect: more descriptors than the table holds is a
			// loop, more than segs holds is for walk (which grows Segs).
			if idx >= len(descs) || n >= len(segs) || n >= len(descs) {
				break chains
			}
			d := &descs[idx]
			flags, addr, length, next := d.flags, GuestAddr(d.addr), d.len, d.next
			// In the cached region (off wraps past len(mem) when addr <
			// base), non-empty (length-1 wraps when 0) and ending inside.
			off := uint64(addr - base)
			if flags&DescFIndirect != 0 || off >= uint64(len(mem)) || uint64(length)-1 >= uint64(len(mem))-off {
				break chains
			}
			s := &segs[n]
			s.Addr, s.Len, s.Buf = addr, length, bufAt(mem, off, length)
			if flags&DescFWrite != 0 {
				s.Writable = true
				wlen += uint64(length)
			} else {
				if wlen != 0 { // readable after writable
					break chains
				}
				s.Writable = false
				rlen += uint64(length)
				readable++
			}
			n++
			if flags&DescFNext == 0 {
				break
			}
			idx = int(next)
		}
		c.Head, c.Segs, c.Readable, c.ReadableLen, c.WritableLen = head, segs[:n], readable, rlen, wlen
	}
	q.lastAvail = start + uint16(k)
	return k
}

// walk follows the chain at head into c, validating every rule.
func (q *DeviceQueue) walk(head uint16, c *Chain) error {
	c.Head = head
	c.Segs = c.Segs[:0]
	c.Readable = 0
	c.ReadableLen, c.WritableLen = 0, 0
	if head >= q.r.size {
		return q.fail(uint16(q.lastAvail), false, ErrHeadOutOfRange)
	}
	table := q.r.desc
	tableSize := uint32(q.r.size)
	indirect := false
	idx := head
	direct := uint32(0)  // direct descriptors visited
	inTable := uint32(0) // indirect descriptors visited
	writable := false
	maxSegs := MaxChainSegments(q.r.size)
	for {
		if indirect {
			inTable++
			if inTable > tableSize {
				return q.fail(idx, true, ErrChainLoop)
			}
		} else {
			direct++
			if direct > tableSize {
				return q.fail(idx, false, ErrChainLoop)
			}
		}
		addr, length, flags, next := readDesc(table, idx)
		if flags&DescFIndirect != 0 {
			if indirect {
				return q.fail(idx, true, ErrNestedIndirect)
			}
			if !q.indirect {
				return q.fail(idx, false, ErrIndirectNotNegotiated)
			}
			if flags&DescFNext != 0 {
				return q.fail(idx, false, ErrIndirectWithNext)
			}
			if length == 0 || length%16 != 0 {
				return q.fail(idx, false, ErrIndirectSize)
			}
			n := length / 16
			if uint64(n)+uint64(direct-1) > uint64(q.r.size) {
				return q.fail(idx, false, ErrChainTooLong)
			}
			t, err := q.mem.slice(GuestAddr(addr), uint64(length), &q.hint)
			if err != nil {
				return q.fail(idx, false, &wrap2{ErrBufferOutOfRange, err})
			}
			table, tableSize, indirect, idx = t, n, true, 0
			continue
		}
		w := flags&DescFWrite != 0
		if !w && writable {
			return q.fail(idx, indirect, ErrReadableAfterWritable)
		}
		writable = w
		// The fast path of appendSegs, inline.
		if off := uint64(GuestAddr(addr) - q.cBase); GuestAddr(addr) >= q.cBase && off < uint64(len(q.cMem)) &&
			uint64(length) <= uint64(len(q.cMem))-off && length != 0 {
			if len(c.Segs) >= maxSegs {
				return q.fail(idx, indirect, ErrTooManySegments)
			}
			end := off + uint64(length)
			seg := c.grow(maxSegs)
			seg.Addr, seg.Len, seg.Writable, seg.Buf = GuestAddr(addr), length, w, q.cMem[off:end:end]
			if w {
				c.WritableLen += uint64(length)
			} else {
				c.ReadableLen += uint64(length)
				c.Readable++
			}
		} else if err := q.appendSegsSlow(c, GuestAddr(addr), length, w); err != nil {
			return q.fail(idx, indirect, segsErr(err))
		}
		if flags&DescFNext == 0 {
			return nil
		}
		if uint32(next) >= tableSize {
			return q.fail(idx, indirect, ErrNextOutOfRange)
		}
		idx = next
	}
}

// appendSegsSlow translates one descriptor's buffer through the region
// table (faulting in regions if configured), splitting it at boundaries
// between adjacent regions, and caches the last region for walk's inline
// fast path. It returns ErrTooManySegments, before appending, for a
// segment that would take c past MaxChainSegments; any other error is a
// buffer outside guest memory (see segsErr).
func (q *DeviceQueue) appendSegsSlow(c *Chain, addr GuestAddr, length uint32, w bool) error {
	maxSegs := MaxChainSegments(q.r.size)
	if err := checkRange(addr, uint64(length)); err != nil {
		return err
	}
	if length == 0 {
		if err := q.mem.checkEmpty(addr, q.hint); err != nil {
			return err
		}
	}
	if w {
		c.WritableLen += uint64(length)
	} else {
		c.ReadableLen += uint64(length)
		c.Readable++
	}
	if length == 0 {
		if len(c.Segs) >= maxSegs {
			return ErrTooManySegments
		}
		seg := c.grow(maxSegs)
		seg.Addr, seg.Len, seg.Writable, seg.Buf = addr, 0, w, nil
		return nil
	}
	left := uint64(length)
	first := true
	for left > 0 {
		rs, i, ferr := q.mem.find(addr, left, q.hint)
		if i < 0 {
			return missErr(ferr)
		}
		if len(c.Segs) >= maxSegs {
			return ErrTooManySegments
		}
		q.hint = uint32(i)
		r := rs[i]
		q.cBase, q.cMem = r.base, r.mem
		off := uint64(addr - r.base)
		k := min(uint64(len(r.mem))-off, left)
		if !first && !w {
			c.Readable++
		}
		first = false
		seg := c.grow(maxSegs)
		seg.Addr, seg.Len, seg.Writable, seg.Buf = addr, uint32(k), w, r.mem[off:off+k:off+k]
		left -= k
		addr += GuestAddr(k)
	}
	return nil
}

// segsErr is the QueueError cause for an appendSegsSlow error: the segment
// bound as is, anything else a buffer outside guest memory.
func segsErr(err error) error {
	if err == ErrTooManySegments {
		return err
	}
	return &wrap2{ErrBufferOutOfRange, err}
}

// armAndRecheck writes avail_event = lastAvail and re-reads avail.idx.
func (q *DeviceQueue) armAndRecheck() (uint16, error) {
	store16(q.r.availEvent, q.lastAvail)
	q.availEvent, q.eventValid = q.lastAvail, true
	if q.log != nil {
		if err := q.logWrite(q.usedLog+GuestAddr(4+8*int(q.r.size)), 2); err != nil {
			return 0, err
		}
	}
	return q.refresh()
}

// enable turns notifications on (see EnableNotify) without re-checking.
func (q *DeviceQueue) enable() error {
	q.notify = true
	if q.eventIdx {
		store16(q.r.availEvent, q.lastAvail)
		q.availEvent, q.eventValid = q.lastAvail, true
		if q.log != nil {
			return q.logWrite(q.usedLog+GuestAddr(4+8*int(q.r.size)), 2)
		}
		return nil
	}
	q.usedFlags &^= UsedFNoNotify
	store16(q.r.usedFlags, q.usedFlags)
	if q.log != nil {
		return q.logWrite(q.usedLog, 2)
	}
	return nil
}

// EnableNotify asks the driver to notify (kick) the device when it makes
// chains available, and reports whether chains are already pending.
//
// The race it handles: a device that found the ring empty and now wants to
// sleep until a kick must publish its request (clear NO_NOTIFY, or with
// EVENT_IDX set avail_event to its next avail index) and only then look at
// avail.idx again. A driver that published in between either sees the
// request and kicks, or published before the device's re-check and the
// re-check sees it (this side stores with a sequentially consistent store
// and then loads; the driver's NeedsKick puts a full barrier between its
// avail.idx store and its load: at least one of them sees the other's
// store). When pending is
// true the caller must keep processing instead of sleeping.
func (q *DeviceQueue) EnableNotify() (pending bool, err error) {
	if q.pk != nil {
		pending, err = q.packedEnableNotify()
		return pending, q.endLog(err)
	}
	if q.err != nil {
		return false, q.err
	}
	if err := q.endLog(q.enable()); err != nil {
		return false, err
	}
	if q.lastAvail != q.availSeen {
		return true, nil
	}
	n, err := q.refresh()
	return n > 0, err
}

// DisableNotify asks the driver not to kick (a busy-polling device): it sets
// NO_NOTIFY, or with EVENT_IDX stops moving avail_event forward, so the
// driver kicks at most once more. It is a hint; the driver may still kick. A
// failure to log the flag write breaks the queue (see Err).
func (q *DeviceQueue) DisableNotify() {
	if q.pk != nil {
		q.packedDisableNotify()
		_ = q.endLog(nil)
		return
	}
	if q.err != nil {
		return
	}
	q.notify = false
	if q.eventIdx || q.usedFlags&UsedFNoNotify != 0 {
		return
	}
	q.usedFlags |= UsedFNoNotify
	store16(q.r.usedFlags, q.usedFlags)
	if q.log != nil {
		_ = q.endLog(q.logWrite(q.usedLog, 2))
	}
}

// logPage is the granularity below which logging a few bytes more than were
// written cannot mark an extra page: vhost's dirty log (VHOST_LOG_PAGE) and
// dirty.Bitmap's default page are 4 KiB.
const logPage = 4096

// logUsed logs the used-ring writes of a push that wrote entries at byte
// offsets [first, end) of the used ring (end <= first when they wrapped:
// [first, len) and [4, end)) and stored used.idx (offset 2). The used.idx
// field and the entries are logged as one range when that range stays in
// the 4 KiB page of used.idx (the bytes in between are ring bytes, so the
// extra marking costs nothing); otherwise separately. Logging follows the
// writes and the used.idx store, and each mark is an atomic OR (a full
// barrier) or a store after them, so a harvest that sees the log sees the
// data; a caching logger applies the marks at the flush that ends the
// push, later still.
func (q *DeviceQueue) logUsed(first, end int) error {
	base := q.usedLog
	if end <= first { // wrapped: the tail of the ring, then its start
		if err := q.logWrite(base+GuestAddr(first), uint64(4+8*int(q.r.size)-first)); err != nil {
			return err
		}
		first = 4
	}
	if (base+2)/logPage == (base+GuestAddr(end-1))/logPage {
		return q.logWrite(base+2, uint64(end-2))
	}
	if err := q.logWrite(base+GuestAddr(first), uint64(end-first)); err != nil {
		return err
	}
	return q.logWrite(base+2, 2)
}

// pushErr is Push's cold path: the error for a push it refused.
//
//go:noinline
func (q *DeviceQueue) pushErr(head uint16) error {
	if q.err != nil {
		return q.err
	}
	return fmt.Errorf("%w: queue %d head %d", ErrNotInFlight, q.index, head)
}

// Push returns the chain with the given head to the driver with the number
// of bytes written into its writable buffers, and publishes used.idx. The
// caller logs its own buffer writes (or uses PushChain).
func (q *DeviceQueue) Push(head uint16, written uint32) error {
	if q.pk != nil {
		return q.packedPush(head, written)
	}
	if q.err != nil || q.usedIdx == q.lastAvail || head >= q.r.size {
		return q.pushErr(head)
	}
	idx := q.usedIdx
	slot := int(idx & q.r.mask)
	e := &q.r.usedRing[slot]
	e.id, e.len = uint32(head), written
	idx++
	q.usedIdx = idx
	// Rule 3: the entry (plain stores) before used.idx (release store;
	// NeedsInterrupt adds the store->load barrier of rule 5).
	q.r.storeUsedWord(q.usedFlags, idx)
	if q.log != nil {
		return q.endLog(q.logUsed(4+8*slot, 4+8*slot+8))
	}
	return nil
}

// PushChain logs the first written bytes of c's writable segments to the
// WriteLogger (if any) and pushes c.Head with written.
func (q *DeviceQueue) PushChain(c *Chain, written uint32) error {
	if q.pk != nil {
		return q.packedPushChain(c, written)
	}
	if q.err != nil {
		return q.err
	}
	if err := q.LogChain(c, written); err != nil {
		return err
	}
	return q.Push(c.Head, written)
}

// LogChain does the logging half of PushChain without pushing: it checks
// written against c's writable bytes and logs the first written bytes of
// c's writable segments to the WriteLogger, if the queue has one. A device
// that returns a run of chains with one PushBatch calls it for each chain
// (after writing the chain, before the PushBatch), so that every guest
// write is logged before used.idx (packed: the used descriptor's flags)
// makes it visible. With a caching logger (LogFlusher) the marks are
// applied by the PushBatch's flush, just after that store instead: still
// after the writes, which is the order a harvest needs (the kernel's vhost
// logs receive buffers after publishing them too). It works on split and
// packed queues alike.
func (q *DeviceQueue) LogChain(c *Chain, written uint32) error {
	if q.err != nil {
		return q.err
	}
	if uint64(written) > c.WritableLen {
		return fmt.Errorf("%w: queue %d head %d: %d > %d", ErrWrittenTooLarge, q.index, c.Head, written, c.WritableLen)
	}
	if q.log == nil {
		return nil
	}
	left := uint64(written)
	for i := c.Readable; i < len(c.Segs) && left > 0; i++ {
		k := min(uint64(c.Segs[i].Len), left)
		if k == 0 {
			continue
		}
		var err error
		if q.pk != nil {
			err = q.packedLogWrite(c.Segs[i].Addr, k)
		} else {
			err = q.logWrite(c.Segs[i].Addr, k)
		}
		if err != nil {
			return err
		}
		left -= k
	}
	return nil
}

// PushBatch writes all elems to the used ring and publishes them with one
// used.idx store. It logs the used-ring writes but not buffer contents: a
// caller with a WriteLogger logs what it wrote into the chains (or uses
// PushChain).
func (q *DeviceQueue) PushBatch(elems []UsedElem) error {
	if q.pk != nil {
		return q.packedPushBatch(elems)
	}
	if q.err != nil {
		return q.err
	}
	if len(elems) == 0 {
		return nil
	}
	if len(elems) > int(q.lastAvail-q.usedIdx) {
		return fmt.Errorf("%w: queue %d: pushing %d with %d in flight", ErrNotInFlight, q.index, len(elems), q.lastAvail-q.usedIdx)
	}
	// Entries past used.idx are invisible to the driver, so a bad head
	// found midway needs no undo: used.idx is not moved.
	used, mask, idx, size := q.r.usedRing, q.r.mask, q.usedIdx, q.r.size
	first := 4 + 8*int(idx&mask)
	if len(used) == 0 { // never (len is the queue size); lets the compiler drop the bounds check below
		return q.pushErr(0)
	}
	if q.log != nil {
		// Logged queues write nothing unless every head is valid: every
		// guest write must be logged, and the log is written after used.idx.
		for _, e := range elems {
			if e.Head >= size {
				return q.pushErr(e.Head)
			}
		}
	}
	for _, e := range elems {
		if e.Head >= size {
			return q.pushErr(e.Head)
		}
		u := &used[int(idx)&(len(used)-1)]
		u.id, u.len = uint32(e.Head), e.Len
		idx++
	}
	q.usedIdx = idx
	q.r.storeUsedWord(q.usedFlags, idx) // rule 3, as in Push
	if q.log != nil {
		return q.endLog(q.logUsed(first, 4+8*int((idx-1)&mask)+8))
	}
	return nil
}

// NeedsInterrupt reports whether the driver wants an interrupt for the used
// entries published since the previous call: with EVENT_IDX when used.idx
// passed used_event, otherwise unless the driver set NO_INTERRUPT. Call it
// after pushing (it relies on the used.idx store preceding its load).
//
// Ordering (rule 5): a "no" needs a full barrier between the used.idx
// store of the push (a release store, not a barrier) and the load of
// used_event or avail.flags that decides it; it pairs with the driver's
// "store used_event/flags, then load used.idx". A device that pushes often
// and checks once per burst pays for it once per burst, as vhost and
// DPDK's vhost do. A "yes" needs none: a load before the barrier that
// finds an interrupt wanted can only be older than the truth, and an
// interrupt the driver no longer wanted is a spurious one, which drivers
// must handle (virtio 1.2 §2.7.7.2). So the field is read first without
// the barrier, and the barrier and a second read are paid only when the
// first says no (the driver is suppressing interrupts, i.e. polling).
func (q *DeviceQueue) NeedsInterrupt() bool {
	if q.pk != nil {
		return q.packedNeedsInterrupt()
	}
	newIdx := q.usedIdx
	if newIdx == q.signalled { // always when broken (fail)
		return false
	}
	if w := q.flagsWord; w != nil {
		q.signalled = newIdx
		if guestatomic.Load32(w)&uint32(AvailFNoInterrupt) == 0 {
			return true
		}
		storeLoadFence(&q.fence)
		return guestatomic.Load32(w)&uint32(AvailFNoInterrupt) == 0
	}
	return q.needsInterruptSlow()
}

// needsInterruptSlow is NeedsInterrupt for EVENT_IDX and for an available
// ring that is only 2-aligned (avail.flags then has its own 16-bit load).
func (q *DeviceQueue) needsInterruptSlow() bool {
	newIdx, old := q.usedIdx, q.signalled
	q.signalled = newIdx
	if q.interruptWanted(newIdx, old) {
		return true
	}
	storeLoadFence(&q.fence)
	return q.interruptWanted(newIdx, old)
}

// interruptWanted reads the driver's suppression field: whether it wants
// an interrupt for used.idx moving from old to newIdx.
func (q *DeviceQueue) interruptWanted(newIdx, old uint16) bool {
	if q.eventIdx {
		return needEvent(load16(q.r.usedEvent), newIdx, old)
	}
	return q.r.loadAvailFlags()&AvailFNoInterrupt == 0
}
