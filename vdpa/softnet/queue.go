package softnet

import (
	"context"
	"errors"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/vdpakit/vdpakit/internal/sysmem"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// queue is one virtqueue of the device. Its chain and gather buffers are
// allocated when the queue starts or in its first batch (kept across stop
// and start, released on Reset), so that the data path allocates nothing.
//
// Ownership: a transmit or control queue's DeviceQueue and buffers belong to
// its worker goroutine between start and stop. A receive queue has no
// goroutine; mu serializes every delivery into it (from transmit workers of
// this or another device, or Deliver callers) with start and stop.
type queue struct {
	idx  int
	note chan struct{} // the device's QueueErrNotify channel

	mu      sync.Mutex
	dq      *vring.DeviceQueue
	kick    *vdpa.EventFD
	call    *vdpa.EventFD
	running atomic.Bool
	stopReq atomic.Bool // tells the worker to finish its batch and exit
	done    chan struct{}
	// poller is the PollGroup worker serving this transmit or control
	// queue (set when it joins, under the group's lock, before StartQueue
	// returns; cleared by stop), or nil.
	poller *pollWorker
	// rxHeld (receive queue): the driver stopped this queue (StopQueue)
	// and has not started it again; transmit queues whose replies go
	// here consume nothing meanwhile (see "Receive queue stopped" in the
	// package documentation).
	rxHeld atomic.Bool
	// batchMu (transmit queue): held by the worker for one batch, from
	// the rxHeld check to its last push, so that StopQueue of a receive
	// queue can wait for a batch that started before it set rxHeld.
	batchMu sync.Mutex
	err     atomic.Pointer[error]

	frames atomic.Uint64
	bytes  atomic.Uint64

	// chains (transmit and control queues): a transmit queue's group of
	// up to txGroup chains, popped together and then handled in turn; the
	// control queue's command, chains[0].
	chains []vring.Chain
	used   []vring.UsedElem // tx: chains of the current batch, published together
	gather []byte           // tx/ctrl: frame or command split across segments
	stash  []vring.Chain    // rx: popped chains, stash[sh:sh+nstash] held for the frames to come
	nstash int
	sh     int      // rx: where the held chains start in stash
	lens   []uint32 // rx: bytes written per chain of one frame
	hdr    [virtio.NetHdrSize]byte
	irq    bool // rx: used entries published since the last interrupt check
	// segExtra (rx) is the segment room the stash's chains have beyond
	// rxSegs each (their Segs grow when a chain has more segments),
	// segMax what it may keep (rxSpareSegs) and frameMax the segments
	// beyond rxSegs per chain one frame's chains may have. spare holds
	// the rxSegs-room arrays of chains that grew, which trimRx gives
	// back to them. See "Receive chain room" at rxSpareSegs.
	segExtra, segMax, frameMax int
	spare                      [][]vring.Segment
	// pending (rx) are receive chains written and logged but not yet
	// published, in the order they were popped: publishRx returns them
	// with one PushBatch (one used.idx store) every rxPendingMax chains or
	// so and at the end of a transmit batch (where the interrupt check
	// adds the one full barrier), or per frame for a delivery that
	// signals at once.
	pending []vring.UsedElem
	// pendFrames and pendBytes count the frames written into the pending
	// chains (rx; publishRx adds them to frames and bytes) or transmitted
	// in the current batch (tx; added once per batch). Counting with plain
	// adds per frame and one atomic add per run keeps locked instructions
	// off the per-frame path: the first one after a frame is written into
	// guest memory waits for all of its stores to drain, and in a loopback
	// those stores go to cache lines the driver's CPU owns.
	pendFrames, pendBytes uint64
	// replies (rx) counts the transmit workers' replies, for the
	// prefetch stride (deliverLocked).
	replies uint32
	tx      Tx
	// vh (rx) is the header of the frame being written, num_buffers
	// aside.
	vh virtio.NetHdr
	// seg holds a frame the device completes the checksum of, or one
	// segment of a frame it segments (tx: for the handler; rx: for the
	// driver). Made on first use: MaxFrame bytes per queue that needs it.
	seg []byte
}

// txKeepSegs is the most segment room a transmit group's chains other than
// the first keep between groups. A chain longer than the Chain's room
// grows it (vring doubles it, up to MaxChainSegments of the queue size:
// 65,600 segments, 2.6 MB, at 32768 entries), and the room is kept so
// that long chains do not allocate again. One chain per transmit queue
// kept any room before groups; so does the first chain of the group now,
// and the others keep up to txKeepSegs, room for any frame a real driver
// sends (Linux: up to MAX_SKB_FRAGS+2 descriptors, 19 by default, 47 at
// most), so that a driver's chains cannot make a queue hold txGroup times
// the largest room.
const txKeepSegs = 64

// keepGroupRoom, after a transmit group has been handled, gives the
// largest segment room of the group to its first chain and replaces any
// other room beyond txKeepSegs with a new one of workerSegs (see
// txKeepSegs): only chains longer than any real frame allocate again.
func keepGroupRoom(group []vring.Chain) {
	for i := 1; i < len(group); i++ {
		c := &group[i]
		if cap(c.Segs) <= txKeepSegs {
			continue
		}
		if cap(c.Segs) > cap(group[0].Segs) {
			group[0].Segs, c.Segs = c.Segs, group[0].Segs
		}
		if cap(c.Segs) > txKeepSegs {
			c.Segs = make([]vring.Segment, 0, workerSegs)
		}
	}
}

// workerChains returns the worker's n chains (txGroup for a transmit
// queue, 1 for the control queue), allocating them, with room for
// workerSegs segments each, in the queue's first batch.
func (q *queue) workerChains(n int) []vring.Chain {
	if len(q.chains) != n {
		q.chains = make([]vring.Chain, n)
		for i := range q.chains {
			q.chains[i].Segs = make([]vring.Segment, 0, workerSegs)
		}
	}
	return q.chains
}

// segBuf returns the queue's segment buffer.
func (q *queue) segBuf() []byte {
	if q.seg == nil {
		q.seg = make([]byte, MaxFrame)
	}
	return q.seg
}

// Per-queue state sizes, for QueueMemory. A receive queue holds, per entry
// of its ring, a Chain with room for rxSegs segments, a spare slice (see
// rxSpareSegs), a length and a used entry waiting to be published (and
// rxPendingMax more of those), and room for rxSpareSegs segments more; a
// transmit queue txGroup Chains, and the control queue one, with room for
// workerSegs segments each, and both a gather buffer of a header and a
// whole frame. (Chains longer than workerSegs grow their room: see
// txKeepSegs for what a transmit queue keeps.)
const (
	rxSegs     = 4
	workerSegs = 8
	gatherLen  = virtio.NetHdrSize + MaxFrame
	gatherInit = 2048 // a header and a 1514-byte frame
)

// gatherBuf returns n bytes (n <= gatherLen) of the queue's gather buffer,
// growing it first if it is shorter: the first frame or command larger
// than any before allocates, at most a few times per queue (the buffer
// doubles), and the steady state allocates nothing.
func (q *queue) gatherBuf(n int) []byte {
	if n > len(q.gather) {
		q.gather = make([]byte, min(max(2*len(q.gather), n), gatherLen))
	}
	return q.gather[:n]
}

var (
	usedBytes    = uint64(unsafe.Sizeof(vring.UsedElem{}))
	segBytes     = uint64(unsafe.Sizeof(vring.Segment{}))
	rxEntryBytes = uint64(unsafe.Sizeof(vring.Chain{})) + rxSegs*segBytes + uint64(unsafe.Sizeof([]vring.Segment{})) + 4 + usedBytes
	chainBytes   = uint64(unsafe.Sizeof(vring.Chain{})) + workerSegs*segBytes
	queueBytes   = uint64(unsafe.Sizeof(queue{}))
)

// QueueMemory returns the most queue state, in bytes, a device with pairs
// queue pairs (and a control queue if ctrl) of at most size entries holds:
// what it has allocated once the driver has started every queue at that
// size (and, with offload, once every receive and transmit queue has
// needed its segment buffer for a checksum or a segmentation). New
// compares it with Options.MaxQueueMemory.
func QueueMemory(pairs, size uint16, ctrl, offload bool) uint64 {
	p, n := uint64(pairs), uint64(size)
	workers := p // transmit queues, and the control queue
	if ctrl {
		workers++
	}
	rx := p
	m := (rx+workers)*queueBytes + rx*(n*rxEntryBytes+uint64(rxSpareSegs(int(size)))*segBytes+rxPendingMax*usedBytes) +
		workers*gatherLen + (p*txGroup+workers-p)*chainBytes
	if offload {
		m += 2 * p * MaxFrame
	}
	return m
}

// defaultQueueMemory is Options.MaxQueueMemory's default: a quarter of the
// machine's physical memory, or 1 GiB where that is unknown.
func defaultQueueMemory() uint64 {
	if t := sysmem.Total(); t != 0 {
		return t / 4
	}
	return 1 << 30
}

// allocRx gives a receive queue its chain state for size chains, keeping
// what it has when the size is unchanged (a queue stopped and started
// again, as at every vhost-user stop/cont). The segments of all chains
// share one backing array: two allocations per start, not one per entry.
// Called with q.mu held and the queue stopped.
func (q *queue) allocRx(size int) {
	if len(q.stash) == size {
		return
	}
	q.stash = make([]vring.Chain, size)
	segs := make([]vring.Segment, size*rxSegs)
	for i := range q.stash {
		q.stash[i].Segs = segs[i*rxSegs : i*rxSegs : (i+1)*rxSegs]
	}
	q.lens = make([]uint32, size)
	q.spare = make([][]vring.Segment, 0, size)
	q.segExtra = 0
}

// Receive chain room. A chain popped into a stash entry with more than
// rxSegs segments grows the entry's Segs (vring appends), and the entry
// keeps that room, so that a driver whose chains are longer (big-packet
// chains of 19 descriptors and more, without MRG_RXBUF) costs no
// allocation per frame. Three rules keep that from adding up:
//
//   - With MRG_RXBUF, the chains of one frame may have rxFrameSegs(size)
//     segments beyond rxSegs each, in all: a chain as long as the ring, or
//     many a little longer than rxSegs. A frame whose chains have more is
//     dropped (DropRxFragmented) and they go back empty. Drivers use one
//     descriptor or two per mergeable buffer (Linux, DPDK), so none of
//     theirs comes near.
//   - What the stash keeps beyond rxSegs per entry (segExtra) is bounded
//     by rxSpareSegs(size): once it is over, the chains the device is
//     done with get their rxSegs room back (trimRx, as a frame's chains
//     are consumed and when the queue stops; the arrays they grew from
//     are kept in spare for that, so it allocates nothing). Without
//     MRG_RXBUF the stash is one entry, whose room is at most that of the
//     longest chain vring pops, within the bound. It is
//     four times what a frame may take (the chain that goes over the
//     frame's bound is held too, and Segs grows by doubling), so the
//     room of one dropped frame's chains is kept and the next frame,
//     popped into the same entries, grows nothing: a driver that keeps
//     posting such chains costs no allocation per frame either.
//   - Chains popped ahead of their frame (popAhead, rxPopAhead at a time)
//     are taken only into the room their entries already have
//     (PopBatchFit): of each batch only the first, the chain the frame
//     needs now, may grow, as it would popped alone. Popping ahead
//     holds more chains, not more room.
//
// Without them, a split ring naming one long chain of zero-length
// descriptors in every avail entry (a split ring does not track heads in
// flight) made every entry keep a ring's worth of segments: the square of
// the ring size, 44 MiB at 1024 entries, tens of GiB at 32768.

// rxFrameSegs is the number of segments beyond rxSegs per chain that the
// chains of one frame may have on a receive queue of size entries.
func rxFrameSegs(size int) int { return max(size, 64) }

// rxSpareSegs is the segment room beyond rxSegs per entry that a receive
// queue of size entries keeps once it is done with the chains
// (QueueMemory counts it). The chains held for a frame in progress may
// take room beyond it (those of one frame: rxFrameSegs segments and one
// chain more, at most twice that in room).
func rxSpareSegs(size int) int { return 4 * rxFrameSegs(size) }

// grew counts a receive chain's Segs grown by a Pop from old to room for
// n segments, keeping old for trimRx if it was an rxSegs array. Called
// with rx.mu held, rarely: not inlined.
//
//go:noinline
func (rx *queue) grew(old []vring.Segment, n int) {
	rx.segExtra += max(n-rxSegs, 0) - max(cap(old)-rxSegs, 0)
	if cap(old) == rxSegs && len(rx.spare) < cap(rx.spare) {
		rx.spare = append(rx.spare, old[:0])
	}
}

// trimRx gives the chains of s (pushed, given back or not holding any)
// their rxSegs room back, as long as the stash keeps more room than
// segMax. Called with rx.mu held. Not inlined: its callers check
// segExtra > segMax first, which is rare.
//
//go:noinline
func (rx *queue) trimRx(s []vring.Chain) {
	for i := range s {
		if rx.segExtra <= rx.segMax {
			return
		}
		c := &s[i]
		if n := cap(c.Segs); n > rxSegs {
			if k := len(rx.spare); k > 0 {
				c.Segs = rx.spare[k-1]
				rx.spare[k-1] = nil
				rx.spare = rx.spare[:k-1]
			} else {
				c.Segs = make([]vring.Segment, 0, rxSegs)
			}
			rx.segExtra -= n - rxSegs
		}
	}
}

// release drops the queue's chain and gather state (Reset): a device
// whose driver went away holds only its queue structs. The next start
// allocates again. Called with the queue stopped.
func (q *queue) release() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.stash, q.lens, q.nstash, q.sh = nil, nil, 0, 0
	q.spare, q.segExtra = nil, 0
	q.gather, q.seg = nil, nil
	q.used, q.pending = nil, nil
	q.chains = nil
}

func (q *queue) isRunning() bool { return q.running.Load() }

func (q *queue) loadErr() error {
	if p := q.err.Load(); p != nil {
		return *p
	}
	return nil
}

// setErr records the error that stopped the queue and announces it on
// the device's QueueErrNotify channel (q.note; nil in tests that build a
// queue alone).
func (q *queue) setErr(err error) {
	q.err.Store(&err)
	select {
	case q.note <- struct{}{}:
	default: // one is waiting already: the receiver looks at every queue
	}
}

// startRx starts a receive queue that holds up to chains popped chains at
// once: a frame spread over several (MRG_RXBUF) may take every entry of
// the ring; without MRG_RXBUF a frame takes one chain.
func (q *queue) startRx(dq *vring.DeviceQueue, call *vdpa.EventFD, chains int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.allocRx(chains)
	q.segMax, q.frameMax = rxSpareSegs(int(dq.Size())), rxFrameSegs(int(dq.Size()))
	if cap(q.pending) != rxPendingMax+chains {
		q.pending = make([]vring.UsedElem, 0, rxPendingMax+chains)
	}
	q.pending = q.pending[:0]
	q.countPending()
	q.dq, q.call, q.kick = dq, call, nil
	q.nstash, q.sh = 0, 0
	q.irq = false
	q.err.Store(nil)
	// Receive buffers are consumed when frames arrive; the device never
	// needs to be told that the driver added some. This writes guest
	// memory from the caller's goroutine: guarded, a fault breaks the
	// queue (reported by QueueErr) rather than the process.
	if err := vring.Guard(func() error { dq.DisableNotify(); return nil }); err != nil {
		q.setErr(err)
	}
	q.running.Store(true)
}

type batchFunc func(q *queue) (int, error)

func (q *queue) startWorker(d *Device, dq *vring.DeviceQueue, kick, call *vdpa.EventFD, process batchFunc) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.gather == nil {
		// Transmit and control queues (the control queue may have an even
		// index) gather split frames and commands here. It starts with
		// room for a frame of the usual MTU and grows (gatherBuf) to the
		// largest one gathered, at most gatherLen.
		q.gather = make([]byte, gatherInit)
	}
	q.dq, q.kick, q.call = dq, kick, call
	q.stopReq.Store(false)
	q.done = make(chan struct{})
	q.err.Store(nil)
	q.tx = Tx{dev: d, pair: q.idx / 2, q: q}
	q.running.Store(true)
	if g := d.opts.PollGroup; g != nil {
		g.add(&pollEntry{q: q, process: process, done: q.done})
		return
	}
	go d.run(q, process)
}

// stopKickInterval is how long stop waits for the worker before kicking
// it again.
const stopKickInterval = 20 * time.Millisecond

// stop ends processing and returns the exact queue state.
func (q *queue) stop() vring.QueueState {
	if q.done != nil {
		// The worker is woken by a kick of its own: a spurious kick is
		// harmless (the driver's kicks are hints too), and it avoids
		// tearing down a Wait on an eventfd that the next worker reuses.
		//
		// The kick eventfd is shared with the driver's side, which may
		// read it too: QEMU drains a vhost-user ring's kick eventfd when
		// it takes the ring back (its back-end gone, or the device
		// stopping), and can swallow this kick before the worker sees it.
		// So the kick is repeated until the worker has stopped.
		q.stopReq.Store(true)
		if w := q.poller; w != nil {
			// A PollGroup worker re-reads its queues when changed is set
			// (after stopReq, which it then sees), before its next queue.
			w.changed.Store(true)
			q.poller = nil
		}
		for q.kick != nil {
			_ = q.kick.Signal()
			select {
			case <-q.done:
			case <-time.After(stopKickInterval):
				continue
			}
			break
		}
		<-q.done
		q.done = nil
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	// Receive chains written but not yet published go out first, so that
	// every chain before the held ones has been pushed (below). A fault
	// here leaves them unpublished, on a queue that is broken anyway; a
	// queue already broken publishes nothing (see flushLocked).
	if len(q.pending) > 0 {
		if q.loadErr() != nil {
			q.pending = q.pending[:0]
			q.countPending()
		} else if err := vring.Guard(q.publishRx); err != nil {
			q.setErr(err)
			q.pending = q.pending[:0]
			q.countPending()
		}
	}
	st := q.dq.State()
	// Receive chains held for a later frame are the last ones popped, and
	// every chain before them has been pushed (receive chains are pushed in
	// the order they were popped), so giving them back is moving NextAvail
	// back: a restarted queue pops the same chains again. A split ring's
	// position counts chains; a packed ring's counts descriptors and
	// carries a wrap counter, which flips if the move crosses the start.
	if q.dq.Packed() {
		var descs uint16
		for _, c := range q.stash[q.sh : q.sh+q.nstash] {
			descs += c.Descs
		}
		st.NextAvail = vring.PackedBack(st.NextAvail, descs, q.dq.Size())
	} else {
		st.NextAvail -= uint16(q.nstash)
	}
	q.nstash, q.sh = 0, 0
	q.trimRx(q.stash)
	q.dq, q.kick, q.call = nil, nil, nil
	q.running.Store(false)
	return st
}

// run is a transmit or control queue's goroutine.
//
// Guest memory may be a peer's file that the peer truncates under the
// mapping (see vring's "Untrusted memory"). The goroutine turns on
// runtime/debug.SetPanicOnFault for itself, and its loop defers
// vring.CatchFault once for the worker's lifetime (nothing per frame), so
// a fault on a lost page ends the worker with an error matching
// vring.ErrMemoryFault: the queue is reported broken (QueueErr, hence
// DEVICE_NEEDS_RESET) and the process lives on.
func (d *Device) run(q *queue, process batchFunc) {
	defer close(q.done)
	debug.SetPanicOnFault(true) // this goroutine only; it ends with the worker
	var err error
	if d.opts.Mode == ModePoll || q.kick == nil {
		err = d.poll(q, process)
	} else {
		err = d.wait(q, process)
	}
	if err != nil {
		q.setErr(err)
	}
}

// wait processes batches, sleeping on the kick eventfd when the ring is
// empty, until a stop request (nil) or an error.
func (d *Device) wait(q *queue, process batchFunc) (err error) {
	defer vring.CatchFault(&err)
	batch := d.batchSize(q)
	ctx := context.Background()
	for {
		if q.stopReq.Load() {
			return nil
		}
		sw := d.steerWake.Load() // before the batch: a change after it ends sw.ctx
		n, err := process(q)
		if err == errTxHeld {
			// The receive queue the replies go to is stopped: sleep until
			// a kick (the one StartQueue of that receive queue sends, a
			// stop's, or the driver's) or a change of the queue pairs in
			// use (VQ_PAIRS_SET may steer the replies to a running receive
			// queue, and nobody kicks then), then check again.
			// Notifications are left as they are: chains that arrive
			// meanwhile wait.
			if _, err := q.kick.Wait(sw.ctx); err != nil && sw.ctx.Err() == nil {
				return err
			}
			continue
		}
		if err != nil {
			return err
		}
		if n == batch {
			continue
		}
		// Ring empty: ask for a kick, then re-check (EnableNotify reports
		// chains published before the driver could see the request).
		pending, err := q.dq.EnableNotify()
		if err != nil {
			return err
		}
		if !pending {
			if _, err := q.kick.Wait(ctx); err != nil {
				return err
			}
		}
		q.dq.DisableNotify()
	}
}

// poll processes batches without notifications until a stop request (nil)
// or an error.
func (d *Device) poll(q *queue, process batchFunc) (err error) {
	return d.pollWith(q, process, time.Sleep)
}

// pollWith is poll with the function it sleeps with (tests count sleeps).
func (d *Device) pollWith(q *queue, process batchFunc, sleep func(time.Duration)) (err error) {
	defer vring.CatchFault(&err)
	q.dq.DisableNotify()
	spins := d.opts.PollSpins
	idle := 0
	for {
		if q.stopReq.Load() {
			return nil
		}
		n, err := process(q)
		if err == errTxHeld {
			n, err = 0, nil // idle until the receive queue starts again
		}
		if err != nil {
			return err
		}
		if n > 0 {
			idle = 0
			continue
		}
		idle++
		switch {
		case idle < spins:
		case idle < 2*spins || d.opts.PollNoSleep:
			runtime.Gosched()
		default:
			sleep(d.opts.PollSleep)
		}
	}
}

// signal raises the queue's interrupt if the driver wants one.
func (q *queue) signal() {
	if q.call != nil && q.dq.NeedsInterrupt() {
		_ = q.call.Signal()
	}
}

// prefetchAhead is how many chains ahead of the reply being written the
// transmit worker keeps asked for (vring's Prefetch) on the receive ring
// its replies go to.
//
// The transmit ring itself is not prefetched ahead. Switched every 2 s
// inside one run (testpmd virtio-user against the back-end, so both
// settings see the same machine state), prefetching the transmit ring cost
// the macswap loopback 12-18 % with one pair and 10-12 % with two, in both
// of the machine's states, and about 12 % on packed rings (slow state),
// and made no difference to txonly: see docs/performance, "The transmit
// ring is not prefetched". On a split ring, not re-reading avail.idx in it
// won back about a fifth of that (one pair, slow state). What it asked for
// of each chain was its buffer's first 128 bytes: the virtio-net header's
// line and the frame's. A later experiment on the chains already popped
// (txGroup) found that asking for the header's line, which this device
// does not read unless it offers offloads, costs more than the frame's
// line gains, so that line is the likely reason for most of the rest (this
// VM has no counters to confirm it). Reading the ring ahead may add to it:
// that reads the available ring and descriptors up to the driver's newest
// chain, lines the driver is still writing its next chains into, so such
// a line comes here, goes back for the driver's next store and comes here
// again when Pop reads it.
//
// A receive buffer is written, and a PREFETCHW brings its lines here
// writable before the reply's stores reach them. Before txGroup its record
// was mixed (+7-8 % for one pair in the slow state; with two pairs 4-7 %
// lost in one run, nothing in another; no difference otherwise). With the
// transmit frames' lines asked for, switching it off inside one run cost
// about 17 % with one pair and 27 % with two (slow state).
const prefetchAhead = 16

// txGroup is how many transmit chains the worker pops together (one
// PopBatch) before it handles the first. The first line of each one's
// frame, after the virtio-net header, is asked for (Chain.PrefetchReadable)
// as soon as the group is popped, so the group's lines travel from the
// driver's CPU together instead of one at a time as each frame is copied.
// The chains are the ones Pop would have taken, read as Pop reads them:
// nothing is read ahead on the ring (see prefetchAhead). Switched every 2 s
// inside single runs against testpmd virtio-user (docs/performance, "The
// transmit frames' first lines"), the macswap loopback moved 12-14 % more
// frames with one pair and about 40 % more with two in the machine's slow
// state, 2-4 % more with one pair in its fast state, and packed rings
// 27-74 % more in seven window pairs of eight (one lost 10 %); txonly did
// not change. Groups of 4 did about as well as 8, and 16 or 32 less
// well. Asking for the header's line as well (which this device reads only
// when it offers offloads) lost more than the frame's line gained.
const txGroup = 8

// prefetchStride: Prefetch is called on every prefetchStride-th frame
// only, so that its call costs a fraction per frame; the distance stays
// between prefetchAhead-prefetchStride and prefetchAhead.
const prefetchStride = 4

// errTxHeld: txBatch consumed nothing because the receive queue its
// replies go to is stopped (rxHeld).
var errTxHeld = errors.New("softnet: transmit held while its receive queue is stopped")

// batchSize is how many chains a batch of q's worker takes at most:
// Options.BatchSize, and no more than half of q's ring. A transmit queue
// returns a batch's chains together at its end, so a batch that could
// take the whole ring would leave the driver without a free descriptor
// until then; half leaves it the other half to keep sending into (a
// driver that drops what it cannot send, as testpmd's forwarding does,
// otherwise loses frames every batch: see Options.BatchSize).
func (d *Device) batchSize(q *queue) int {
	return min(d.opts.BatchSize, max(int(q.dq.Size())/2, 1))
}

// txBatch processes up to batchSize transmitted chains, or none (errTxHeld)
// while the receive queue that replies go to is stopped by the driver.
func (d *Device) txBatch(q *queue) (int, error) {
	q.batchMu.Lock()
	defer q.batchMu.Unlock()
	if d.queues[2*d.steer(q.tx.pair)].rxHeld.Load() {
		return 0, errTxHeld
	}
	batch := d.batchSize(q)
	hdrLen := int(d.hdrLen.Load())
	box := d.handler.Load()
	h, oh, acc := d.useHandler(q, box)
	defer q.endBatch() // also when a memory fault ends the batch
	f := d.NegotiatedFeatures()
	if cap(q.used) < batch { // the queue's first batch (or BatchSize grew)
		q.used = make([]vring.UsedElem, batch)
	}
	used := q.used[:batch]
	chains := q.workerChains(txGroup)
	n := 0
	var err error
	q.tx.rxPair = -1
	for n < batch {
		want := min(len(chains), batch-n)
		k, perr := q.dq.PopBatch(chains[:want])
		// The group's frames are asked for before the first is handled
		// (see txGroup).
		for i := range k {
			chains[i].PrefetchReadable(uint64(hdrLen))
		}
		for i := range k {
			c := &chains[i]
			// A frame the driver made available after SetHandler returned
			// goes to the new handler, even in a batch that began before,
			// and so does the next frame after a handler that calls
			// SetHandler: the handler is checked before each frame (after
			// the acquire load of avail.idx that found it, in PopBatch,
			// which orders this load after the driver's publication, and
			// so after a SetHandler that preceded it). One pointer compare.
			if b := d.handler.Load(); b != box {
				// The old handler's replies go out first, counted before
				// they are visible as at the batch's end (Stats).
				q.countPending()
				q.tx.flush()
				box = b
				h, oh, acc = d.useHandler(q, box)
			}
			d.transmit(q, c, h, oh, acc, f, hdrLen)
			// Transmit buffers are device-readable only: nothing written.
			// The chains of a batch are returned together, in the order
			// they were taken (IN_ORDER holds), with one used.idx store
			// and one interrupt check (its full barrier), per batch rather
			// than per frame.
			used[n] = vring.UsedElem{Head: c.Head}
			n++
		}
		keepGroupRoom(chains) // all of them: a fault may have left a group unchecked
		if perr != nil {
			err = perr
			break
		}
		if k < want { // nothing more available
			break
		}
	}
	if n > 0 {
		// Replies first: the receive chains the batch wrote are published
		// before the transmit chains that caused them are returned, so a
		// driver that sees a transmit completion finds its reply already
		// there (the causal order the unbatched device kept).
		// Counted before the replies are visible: a driver that sees a
		// reply finds the frame that caused it in Stats.
		q.countPending()
		q.tx.flush()
		if perr := q.dq.PushBatch(used[:n]); perr != nil && err == nil {
			err = perr
		}
		q.signal()
	}
	return n, err
}

// useHandler prepares a transmit batch for the handler in box: it returns
// the handler, the OffloadHandler it is (or nil) and the offloads that one
// takes, and sets whether replies hold the receive queue.
func (d *Device) useHandler(q *queue, box *handlerBox) (FrameHandler, OffloadHandler, virtio.Features) {
	h := box.h
	// The built-in Loopback replies to every frame and runs nothing else
	// between replies, so its replies take the receive queue's lock once
	// for the batch (until the batch ends or the handler changes) instead
	// of once per frame: each lock and unlock is a locked instruction,
	// which waits for the stores of the frame just written (to cache
	// lines the driver's CPU owns) to drain. No handler of the embedder's
	// runs while it is held.
	_, q.tx.hold = h.(loopback)
	oh, _ := h.(OffloadHandler)
	var acc virtio.Features
	if oh != nil {
		acc = oh.TxOffloads() & HostOffloads
	}
	return h, oh, acc
}

// endBatch ends a transmit batch however it ended: the frames it
// transmitted are counted and a receive queue held for it is released
// (unpublished replies stay pending for the receive queue's next
// publication).
func (q *queue) endBatch() {
	q.tx.release()
	q.countPending()
}

// transmit hands the frame of c, a chain q's worker popped, to the handler
// (oh when it is an OffloadHandler taking the offloads acc; f are the
// negotiated features).
func (d *Device) transmit(q *queue, c *vring.Chain, h FrameHandler, oh OffloadHandler, acc, f virtio.Features, hdrLen int) {
	total := c.ReadableLen
	if total < uint64(hdrLen) {
		d.drops.add(DropTxShort)
		return
	}
	if total-uint64(hdrLen) > MaxFrame {
		d.drops.add(DropTxTooBig)
		return
	}
	if !d.linkUp.Load() {
		d.drops.add(DropLinkDown)
		return
	}
	frame := frameSlice(c, hdrLen, int(total)-hdrLen)
	gathered := frame == nil
	if gathered {
		buf := q.gatherBuf(int(total))
		frame = buf[hdrLen:c.Gather(buf)]
	}
	var hdr virtio.NetHdr
	if d.offered&HostOffloads != 0 {
		// A device without transmit offloads ignores the header, which
		// the driver must leave zero (§5.1.6.2.1); one with them checks
		// it against what the driver negotiated.
		hdr = readHdr(c, hdrLen, &q.hdr)
		hdr.NumBuffers = 0
		p, err := checkHdr(&hdr, frame, f, true)
		if err != nil {
			d.drops.add(DropTxBadHeader)
			return
		}
		if !txOffloadOK(&hdr, acc) {
			q.pendFrames++
			q.pendBytes += uint64(len(frame))
			d.txSoftware(q, h, oh, &hdr, &p, frame, gathered)
			return
		}
	}
	q.pendFrames++
	q.pendBytes += uint64(len(frame))
	if oh != nil {
		// The built-in Loopback (hold) replying to a frame without a
		// header, once the batch holds the receive queue: loopReply.
		if q.tx.hold && hdr == (virtio.NetHdr{}) && d.loopReply(q, frame) {
			return
		}
		oh.HandleOffload(&q.tx, hdr, frame)
		return
	}
	h.HandleFrame(&q.tx, frame)
}

// readHdr decodes the virtio-net header at the start of c's readable
// bytes (which hold at least hdrLen), gathering it into buf when the
// first segment is shorter.
func readHdr(c *vring.Chain, hdrLen int, buf *[virtio.NetHdrSize]byte) virtio.NetHdr {
	var b []byte
	if c.Readable > 0 {
		b = c.Segs[0].Buf
	}
	if len(b) < hdrLen {
		var got int
		for i := 0; i < c.Readable && got < hdrLen; i++ {
			got += copy(buf[got:hdrLen], c.Segs[i].Buf)
		}
		b = buf[:hdrLen]
	}
	h, _ := virtio.DecodeNetHdr(b, hdrLen)
	return h
}

// txSoftware does for the handler the offloads it does not take: it
// completes the checksum of a NEEDS_CSUM frame in the device's copy (the
// transmit buffer is the driver's, read-only to the device), or cuts a GSO
// frame into segments, and hands the result over with a zero header.
func (d *Device) txSoftware(q *queue, h FrameHandler, oh OffloadHandler, hdr *virtio.NetHdr, p *gsoPacket, frame []byte, gathered bool) {
	hand := func(fr []byte) {
		if oh != nil {
			oh.HandleOffload(&q.tx, virtio.NetHdr{}, fr)
		} else {
			h.HandleFrame(&q.tx, fr)
		}
	}
	if gsoKind(hdr) == virtio.NetHdrGSONone {
		if !gathered {
			frame = q.segBuf()[:copy(q.segBuf(), frame)]
		}
		completeCsum(hdr, frame)
		hand(frame)
		return
	}
	var s segmenter
	s.init(frame, *p, hdr.GSOSize)
	buf := q.segBuf()
	for seg := s.next(buf); seg != nil; seg = s.next(buf) {
		hand(seg)
	}
}

// frameSlice returns the n frame bytes after hdrLen bytes of the chain's
// readable data when they lie in one segment (zero copy), or nil.
func frameSlice(c *vring.Chain, hdrLen, n int) []byte {
	off := hdrLen
	for i := 0; i < c.Readable; i++ {
		b := c.Segs[i].Buf
		if off > len(b) || (off == len(b) && n > 0) {
			off -= len(b)
			continue
		}
		if len(b)-off >= n {
			return b[off : off+n]
		}
		return nil
	}
	return nil
}

// flushRx raises the receive interrupt of pair after a transmit batch that
// replied into it.
func (d *Device) flushRx(pair int) {
	if pair < 0 {
		return
	}
	rx := d.queues[2*pair]
	rx.mu.Lock()
	defer rx.mu.Unlock()
	d.flushLocked(rx)
}

// flushLocked is flushRx with rx.mu held.
func (d *Device) flushLocked(rx *queue) {
	if rx.dq == nil {
		return
	}
	if len(rx.pending) > 0 {
		if rx.loadErr() != nil {
			// Broken part-way through a frame: its first chains may
			// be here without the rest; nothing more is published.
			rx.pending = rx.pending[:0]
			rx.countPending()
			return
		}
		if err := vring.Guard(rx.publishRx); err != nil {
			rx.pending = rx.pending[:0]
			rx.countPending()
			_ = d.ringErr(rx, err)
			return
		}
	}
	if rx.irq {
		rx.irq = false
		if err := rx.signalGuarded(); err != nil {
			_ = d.ringErr(rx, err)
		}
	}
}

// rxPendingMax is how many receive chains a queue holds written but
// unpublished before it publishes them: writeFrame publishes once a
// frame ends with at least that many waiting, also in the middle of a
// transmit batch that replies into the queue.
//
// It is small on purpose. A driver that forwards what it receives (a
// guest's bridge, testpmd's macswap) and a device that replies to what
// it is sent form a loop: replies held until the end of a batch make the
// two sides take turns, each waiting while the other works through a
// whole batch. Published every few chains, the driver starts on the
// first replies while the device writes the rest. Eight chains are about
// a cache line of split used-ring entries (two of packed descriptors),
// and one release store per eight frames costs little. See
// docs/performance, "Replies published as they are written".
//
// The chains of one frame (MRG_RXBUF) are published together (§5.1.6.4:
// a driver may drop a frame whose num_buffers buffers are not all used
// when it looks), so the queue's pending list has room for rxPendingMax
// chains and then a whole frame's.
const rxPendingMax = 8

// completeRx returns receive chain c with written bytes: it logs the
// bytes written (if the queue logs) and queues the used entry for the
// next publishRx. Called with rx.mu held.
func (rx *queue) completeRx(c *vring.Chain, written uint32) error {
	if err := rx.dq.LogChain(c, written); err != nil {
		return err
	}
	// Never grows: a frame begins with fewer than rxPendingMax chains
	// waiting (writeFrame sees to it), and the list has room for those
	// and for a frame taking every chain of the ring.
	rx.pending = append(rx.pending, vring.UsedElem{Head: c.Head, Len: written})
	return nil
}

// publishRx publishes the pending receive chains with one used.idx
// store. Called with rx.mu held.
func (rx *queue) publishRx() error {
	// Counted before they are visible: a driver that sees a frame finds
	// it in Stats.
	rx.countPending()
	// Emptied before the push: a push that fails or faults part-way
	// (after its used-index store, logging the used ring) must not leave
	// the chains to be pushed again by a later publication.
	p := rx.pending
	rx.pending = rx.pending[:0]
	return rx.dq.PushBatch(p)
}

// countPending adds the frames written since the last call to the
// queue's counters (as soon as they are written, they count, whether or
// not their chains can be published).
func (rx *queue) countPending() {
	if rx.pendFrames != 0 {
		rx.frames.Add(rx.pendFrames)
		rx.bytes.Add(rx.pendBytes)
		rx.pendFrames, rx.pendBytes = 0, 0
	}
}

// signalGuarded is signal for a receive queue from a transmit worker: a
// memory fault reading the ring breaks the receive queue, not the worker's.
func (q *queue) signalGuarded() (err error) {
	defer vring.CatchFault(&err)
	q.signal()
	return nil
}

// deliver writes frame, with hdr if not nil, into pair's receive queue,
// publishes it and raises the receive interrupt if the driver wants one.
func (d *Device) deliver(pair int, hdr *virtio.NetHdr, frame []byte) error {
	return d.deliverVia(nil, nil, pair, hdr, frame)
}

// deliverVia is deliver, or with from a reply of from's transmit batch
// (the interrupt is left for flushRx; the batch's transmit worker may
// hold held's lock for it, nil: none).
func (d *Device) deliverVia(from, held *queue, pair int, hdr *virtio.NetHdr, frame []byte) error {
	if !d.linkUp.Load() {
		d.drops.add(DropLinkDown)
		return ErrLinkDown
	}
	if len(frame) > MaxFrame {
		d.drops.add(DropRxTooBig)
		return ErrFrameTooBig
	}
	var p gsoPacket
	if hdr != nil {
		hdr.NumBuffers = 0
		if *hdr == (virtio.NetHdr{}) {
			hdr = nil
		} else {
			var err error
			if p, err = checkHdr(hdr, frame, 0, false); err != nil {
				d.drops.add(DropRxBadHeader)
				return err
			}
		}
	}
	if !d.accept(frame) {
		d.drops.add(DropFiltered)
		return ErrFiltered
	}
	rx := d.queues[2*pair]
	if rx != held {
		rx.mu.Lock()
		defer rx.mu.Unlock()
	}
	return d.deliverTo(rx, from, hdr, &p, frame)
}

// deliverTo is deliver after the checks, with rx.mu held.
func (d *Device) deliverTo(rx, from *queue, hdr *virtio.NetHdr, p *gsoPacket, frame []byte) error {
	if rx.dq == nil || rx.loadErr() != nil {
		d.drops.add(DropRxNotReady)
		return ErrRxNotReady
	}
	if err := d.deliverLocked(rx, from, hdr, p, frame); err != nil {
		return d.deliverFailed(rx, frame, err)
	}
	return nil
}

// deliverFailed handles err, an error writing frame into rx (with rx.mu
// held): a memory fault breaks rx, unless it is frame's own memory that
// faulted; other errors are returned as they are.
func (d *Device) deliverFailed(rx *queue, frame []byte, err error) error {
	if fe, ok := err.(*vring.FaultError); ok {
		if inSlice(frame, fe.Addr) {
			// The frame's own memory faulted (a transmit buffer of the
			// caller's queue), not the receive queue's: it holds the
			// chains it popped for the next frame, and the fault goes on
			// to the caller's guard (rx.mu is released on the way).
			panic(fe)
		}
		return d.ringErr(rx, err)
	}
	return err
}

// loopReply is the built-in Loopback's reply to frame, a frame of q's
// transmit batch with a zero header, once the batch holds the receive
// queue the reply goes to. It does what HandleOffload, Tx.Reply, reply,
// deliverVia and deliverTo do for such a frame, without the five calls
// and without repeating the checks transmit has just made (the link is
// up, the frame is at most MaxFrame) or that hold for the whole batch (the
// handler, the held queue). It reports false, having done nothing, when
// the batch holds no receive queue yet (its first reply) or the active
// pairs changed since it took it; the general path then takes the frame.
//
// The loop of BenchmarkLoopback (driver side included), alternated with
// the general path in one binary, took 5-15 % less CPU per frame (medians
// of three runs: 11 % on split rings, 10 % on packed ones), and testpmd's
// macswap loopback moved 6-12 % more frames (docs/performance, "Frames in
// circulation").
func (d *Device) loopReply(q *queue, frame []byte) bool {
	t := &q.tx
	rx := t.held
	if rx == nil {
		return false
	}
	if p := d.steer(t.pair); p != t.rxPair || d.queues[2*p] != rx {
		return false
	}
	if !d.accept(frame) {
		d.drops.add(DropFiltered)
		return true
	}
	if rx.dq == nil || rx.loadErr() != nil {
		d.drops.add(DropRxNotReady)
		return true
	}
	if err := d.replyLocked(rx, q, frame); err != nil {
		_ = d.deliverFailed(rx, frame, err)
	}
	return true
}

// replyLocked is deliverLocked for loopReply: a reply of from's transmit
// batch without a header, with rx.mu held.
func (d *Device) replyLocked(rx, from *queue, frame []byte) (err error) {
	defer vring.CatchFault(&err)
	rx.askAhead()
	rx.vh = virtio.NetHdr{}
	return d.writeFrame(rx, from, frame)
}

// askAhead keeps the receive buffers of the replies to come asked for:
// vring's Prefetch, prefetchAhead chains ahead, every prefetchStride
// replies. Called with rx.mu held, under a fault guard (it reads the
// ring).
func (rx *queue) askAhead() {
	if rx.replies%prefetchStride == 0 {
		rx.dq.Prefetch(prefetchAhead)
	}
	rx.replies++
}

// inSlice reports whether host address a lies in b.
func inSlice(b []byte, a uintptr) bool {
	if len(b) == 0 {
		return false
	}
	p := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	return a >= p && a-p < uintptr(len(b))
}

// deliverLocked writes frame (with hdr, validated, packet p, when not nil)
// into rx's chains and raises its interrupt. The calling goroutine has
// SetPanicOnFault on (a transmit worker, or Deliver), so a memory fault
// (guest memory truncated by its owner) is recovered here and returned as
// a *vring.FaultError, which breaks the receive queue (its chains are half
// written) and not the caller's. The deferred recover costs a few
// nanoseconds per frame and allocates nothing.
//
// A reply from a transmit batch (from, not nil) keeps the next receive buffers
// asked for, prefetchAhead chains ahead (vring's Prefetch), so that each
// frame's stores find their lines here rather than each waiting for its
// own in turn, holding up every later store meanwhile. The ring reads that
// takes are under the same fault guard.
func (d *Device) deliverLocked(rx, from *queue, hdr *virtio.NetHdr, p *gsoPacket, frame []byte) (err error) {
	defer vring.CatchFault(&err)
	if from != nil {
		rx.askAhead()
	}
	if from == nil {
		// A delivery that signals at once publishes what it completed
		// even when the frame itself was dropped (an empty chain given
		// back); replies are published by writeFrame every few chains
		// and by flushRx at the batch's end.
		defer func() {
			if len(rx.pending) > 0 && rx.loadErr() == nil {
				if perr := rx.publishRx(); perr != nil {
					err = d.ringErr(rx, perr)
				}
			}
		}()
	}
	rx.vh = virtio.NetHdr{}
	if hdr != nil {
		f := d.NegotiatedFeatures()
		h := *hdr
		if !f.Has(virtio.NetFGuestCsum) {
			h.Flags &^= virtio.NetHdrFDataValid
		}
		if !rxOffloadOK(&h, p, f) {
			return d.rxSoftware(rx, from, &h, p, frame)
		}
		rx.vh = h
	}
	return d.writeFrame(rx, from, frame)
}

// rxSoftware does for the driver the offloads it did not negotiate (see
// DeliverHdr): a completed checksum, or the segments of a GSO frame, each
// with a zero header.
func (d *Device) rxSoftware(rx, from *queue, hdr *virtio.NetHdr, p *gsoPacket, frame []byte) error {
	buf := rx.segBuf()
	if gsoKind(hdr) == virtio.NetHdrGSONone {
		fr := buf[:copy(buf, frame)]
		completeCsum(hdr, fr)
		return d.writeFrame(rx, from, fr)
	}
	var s segmenter
	s.init(frame, *p, hdr.GSOSize)
	for seg := s.next(buf); seg != nil; seg = s.next(buf) {
		if err := d.writeFrame(rx, from, seg); err != nil {
			return err
		}
	}
	return nil
}

// writeFrame writes frame with the header rx.vh into rx's chains, and
// publishes them: at once for a delivery (from nil), or, for a reply of
// from's transmit batch, once rxPendingMax chains wait (the interrupt
// then waits for flushRx).
func (d *Device) writeFrame(rx, from *queue, frame []byte) (err error) {
	if len(rx.pending) >= rxPendingMax {
		// Chains given back empty by frames dropped since the last
		// publication: out first, so the frame's own chains fit the
		// pending list together (see rxPendingMax).
		if err := rx.publishReplies(from); err != nil {
			return d.ringErr(rx, err)
		}
	}
	if d.mrg.Load() {
		err = d.writeMergeable(rx, frame)
	} else {
		err = d.writeSingle(rx, frame)
	}
	if err != nil {
		return err
	}
	rx.pendFrames++
	rx.pendBytes += uint64(len(frame))
	rx.irq = true
	switch {
	case from == nil:
		if err := rx.publishRx(); err != nil {
			return d.ringErr(rx, err)
		}
		rx.irq = false
		rx.signal()
	case len(rx.pending) >= rxPendingMax:
		// A reply in a transmit batch: published now rather than at
		// the batch's end (see rxPendingMax).
		if err := rx.publishReplies(from); err != nil {
			return d.ringErr(rx, err)
		}
	}
	return nil
}

// publishReplies is publishRx in the middle of from's transmit batch (nil:
// not in one). The frames the batch transmitted so far are counted first:
// a driver that sees a reply finds the frame that caused it in Stats, as
// when replies are published at the batch's end. from's pending counts
// are its own worker's (this goroutine's) to add.
func (rx *queue) publishReplies(from *queue) error {
	if from != nil {
		from.countPending()
	}
	return rx.publishRx()
}

// ringErr records a ring error that stops the receive queue.
func (d *Device) ringErr(rx *queue, err error) error {
	rx.setErr(err)
	d.drops.add(DropRxNotReady)
	return err
}

// writeSingle places hdr+frame in one receive chain (no MRG_RXBUF). The
// chain is held (nstash 1) until it is pushed, so that one whose frame
// could not be read (a fault on the frame's memory) serves the next frame.
func (d *Device) writeSingle(rx *queue, frame []byte) error {
	c := &rx.stash[0]
	if rx.nstash == 0 {
		// The one chain's room is not trimmed: it is at most that of
		// the longest chain vring pops, within segMax (rxSpareSegs).
		old := c.Segs
		ok, err := rx.dq.Pop(c)
		if cap(c.Segs) != cap(old) {
			rx.grew(old, cap(c.Segs))
		}
		if err != nil {
			return d.ringErr(rx, err)
		}
		if !ok {
			d.drops.add(DropRxNoBuffer)
			return ErrNoBuffer
		}
		rx.nstash = 1
	}
	hdrLen := int(d.hdrLen.Load())
	need := uint64(hdrLen + len(frame))
	if c.WritableLen < need {
		// The kernel's vdpa_sim_net and QEMU drop too; the chain goes back
		// empty so the driver can recycle it.
		d.drops.add(DropRxTooSmall)
		rx.nstash = 0
		if err := rx.completeRx(c, 0); err != nil {
			return d.ringErr(rx, err)
		}
		return ErrBufferTooSmall
	}
	h := rx.vh
	h.NumBuffers = 1
	_ = h.Encode(rx.hdr[:], hdrLen)
	scatterAt(c, 0, rx.hdr[:hdrLen])
	scatterAt(c, uint64(hdrLen), frame)
	rx.nstash = 0
	if err := rx.completeRx(c, uint32(need)); err != nil {
		return d.ringErr(rx, err)
	}
	return nil
}

// writeMergeable spreads hdr+frame over as many receive chains as needed
// (MRG_RXBUF) and sets num_buffers in the first header. It pops chains
// rxPopAhead at a time (popAhead); those a frame does not take, and those
// popped for a frame that then finds the ring empty, are held
// (stash[sh:sh+nstash], in pop order) for the frames to come rather than
// returned half-used.
func (d *Device) writeMergeable(rx *queue, frame []byte) error {
	hdrLen := int(d.hdrLen.Load())
	need := uint64(hdrLen + len(frame))
	var got uint64
	n, extra := 0, 0
	for got < need {
		if n >= rx.nstash {
			if err := rx.popAhead(); err != nil {
				return d.ringErr(rx, err)
			}
			if n >= rx.nstash {
				d.drops.add(DropRxNoBuffer)
				return ErrNoBuffer
			}
		}
		c := &rx.stash[rx.sh+n]
		n++
		if c.WritableLen < uint64(hdrLen) {
			// With MRG_RXBUF every buffer must hold at least the header
			// (§5.1.6.3.1, a driver requirement): this one cannot take
			// part in a frame. It goes back empty, and so do the chains
			// held before it (chains are used in the order they were
			// popped: see stop); those held after it stay.
			return d.giveBack(rx, n, DropRxTooSmall)
		}
		if extra += max(len(c.Segs)-rxSegs, 0); extra > rx.frameMax {
			// The frame's chains have more segments than a frame may
			// take (see rxFrameSegs): back empty.
			return d.giveBack(rx, n, DropRxFragmented)
		}
		got += c.WritableLen
	}
	var off uint64
	h := rx.vh
	h.NumBuffers = uint16(n)
	held := rx.stash[rx.sh : rx.sh+n]
	if c := &held[0]; n == 1 && c.Readable < len(c.Segs) {
		// The common case: one chain whose first writable buffer takes
		// the header and the frame. Both are written there directly,
		// without the header's staging copy and the segment walks below
		// (in-process A/B over BenchmarkLoopback's loop: 9-12 % less CPU
		// per frame).
		if b := c.Segs[c.Readable].Buf; uint64(len(b)) >= need {
			_ = h.Encode(b, hdrLen)
			copy(b[hdrLen:], frame)
			if err := rx.completeRx(c, uint32(need)); err != nil {
				return d.ringErr(rx, err)
			}
			rx.consume(1)
			return nil
		}
	}
	_ = h.Encode(rx.hdr[:], hdrLen)
	for i := range held {
		c := &held[i]
		take := min(c.WritableLen, need-off)
		// Copy the part of the virtual stream hdr||frame in [off, off+take).
		var w uint64
		if off < uint64(hdrLen) {
			w = uint64(scatterAt(c, 0, rx.hdr[off:hdrLen]))
		}
		if w < take {
			fo := off + w - uint64(hdrLen)
			scatterAt(c, w, frame[fo:fo+(take-w)])
		}
		rx.lens[i] = uint32(take)
		off += take
	}
	for i := range held {
		if err := rx.completeRx(&held[i], rx.lens[i]); err != nil {
			return d.ringErr(rx, err)
		}
	}
	rx.consume(n)
	return nil
}

// rxPopAhead is how many receive chains writeMergeable pops at a time:
// one PopBatchFit instead of a Pop per chain. A frame of a chain or two
// leaves the rest held for the frames after it. Measured with testpmd's
// macswap loopback, switching between 8 and 1 within runs
// (docs/performance): 8 at a time moved 3-4 % more frames in the median
// (5-9 % in a first experiment), on split and packed rings; that is within
// the test VM's spread from one 2-s window to the next, and one run showed
// no difference.
const rxPopAhead = 8

// popAhead pops up to rxPopAhead receive chains after the held ones
// (moving the held ones to the stash's start first, so that the entries in
// use stay the first few, in cache). The first may grow its Segs as Pop's
// chain does (rx.grew counts it); PopBatchFit takes the others only into
// the room their entries have, so that chains popped ahead of their frame
// hold no more memory than the stash already does (see "Receive chain
// room"). Finding the ring empty adds nothing. Called with rx.mu held.
func (rx *queue) popAhead() error {
	if rx.sh != 0 {
		rx.compact()
	}
	at := rx.nstash
	batch := rx.stash[at:min(at+rxPopAhead, len(rx.stash))]
	if len(batch) == 0 {
		return nil // every entry holds a chain: the frame is as large as the ring
	}
	old := batch[0].Segs
	mark := rx.dq.State().NextAvail
	defer func() {
		if r := recover(); r != nil {
			rx.poppedBeforeFault(batch, old, mark)
			panic(r)
		}
	}()
	k, err := rx.dq.PopBatchFit(batch)
	if cap(batch[0].Segs) != cap(old) {
		rx.grew(old, cap(batch[0].Segs))
	}
	rx.nstash += k
	return err
}

// poppedBeforeFault is popAhead's bookkeeping when guest memory faulted
// inside PopBatchFit (a peer truncated it; the fault goes on to the
// caller's CatchFault, which breaks the queue). The chains popped before
// the fault are held, as any popped chains are, so that stop gives them
// back: they are those the queue's avail position moved past since mark
// (each complete; the loop that faulted had not moved it for its own).
// A grown first chain is counted, so segExtra stays the stash's room.
//
//go:noinline
func (rx *queue) poppedBeforeFault(batch []vring.Chain, old []vring.Segment, mark uint16) {
	if cap(batch[0].Segs) != cap(old) {
		rx.grew(old, cap(batch[0].Segs))
	}
	now := rx.dq.State().NextAvail
	if !rx.dq.Packed() {
		rx.nstash += int(now - mark)
		return
	}
	// A packed position counts descriptors: count the chains they hold.
	size := rx.dq.Size()
	descs := (now&^vring.PackedWrapBit + size - mark&^vring.PackedWrapBit) % size
	if descs == 0 && now != mark {
		descs = size
	}
	for _, c := range batch {
		if descs < c.Descs || c.Descs == 0 {
			break
		}
		descs -= c.Descs
		rx.nstash++
	}
}

// giveBack returns the first n held chains empty (used length 0, in the
// order they were popped), drops the frame for reason and returns
// ErrBufferTooSmall.
func (d *Device) giveBack(rx *queue, n int, reason DropReason) error {
	d.drops.add(reason)
	for i := range n {
		if err := rx.completeRx(&rx.stash[rx.sh+i], 0); err != nil {
			return d.ringErr(rx, err)
		}
	}
	rx.consume(n)
	return ErrBufferTooSmall
}

// consume drops the first n held chains (pushed by the caller); the rest
// stay held, in order. The dropped chains get their rxSegs room back if
// the stash keeps too much (trimRx).
func (rx *queue) consume(n int) {
	if rx.segExtra > rx.segMax {
		rx.trimRx(rx.stash[rx.sh : rx.sh+n])
	}
	if n >= rx.nstash {
		rx.nstash, rx.sh = 0, 0
		return
	}
	rx.sh += n
	rx.nstash -= n
}

// compact moves the held chains, in order, to the stash's start (sh > 0):
// held chain i (entry sh+i) swaps places with entry i. The entries before
// sh hold chains already pushed, whose contents are dead but whose Segs
// arrays are kept: the swaps permute the entries, allocating nothing.
// Done in ascending order, entry sh+i still holds chain i when its turn
// comes (only entries below sh+i have moved), also when the two ranges
// overlap.
func (rx *queue) compact() {
	s, sh := rx.stash, rx.sh
	for i := range rx.nstash {
		s[i], s[sh+i] = s[sh+i], s[i]
	}
	rx.sh = 0
}

// scatterAt copies p into c's writable segments starting at byte offset
// off of the writable area and returns the bytes copied.
func scatterAt(c *vring.Chain, off uint64, p []byte) int {
	done := 0
	for i := c.Readable; i < len(c.Segs) && done < len(p); i++ {
		b := c.Segs[i].Buf
		if off >= uint64(len(b)) {
			off -= uint64(len(b))
			continue
		}
		done += copy(b[off:], p[done:])
		off = 0
	}
	return done
}

// accept applies the receive filter (virtio 1.2 §5.1.6.5.1 and .2).
func (d *Device) accept(frame []byte) bool {
	mode := d.rxMode.Load()
	if mode&rxPromisc != 0 || len(frame) < 6 {
		return true
	}
	dst := frame[:6]
	if dst[0]&1 != 0 {
		if dst[0]&dst[1]&dst[2]&dst[3]&dst[4]&dst[5] == 0xff {
			return mode&rxNoBcast == 0
		}
		if mode&rxNoMulti != 0 {
			return false
		}
		if mode&rxAllMulti != 0 {
			return true
		}
		t := d.tables.Load()
		return t.allMulti || inTable(t.multi, dst)
	}
	if mode&rxNoUni != 0 {
		return false
	}
	if mode&rxAllUni != 0 || macToU64(dst) == d.mac.Load() {
		return true
	}
	t := d.tables.Load()
	return t.allUni || inTable(t.uni, dst)
}

func inTable(t [][6]byte, m []byte) bool {
	for i := range t {
		if string(t[i][:]) == string(m) {
			return true
		}
	}
	return false
}
