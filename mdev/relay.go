package mdev

import (
	"context"
	"errors"
	"fmt"
	"math"
	"runtime/debug"
	"sync"
	"sync/atomic"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Relay errors.
var (
	// ErrRelayChain: a guest chain has more buffers than the shadow ring
	// can ever hold.
	ErrRelayChain = errors.New("mdev: guest chain too long for the shadow ring")
	// ErrInFlight: the backing device stopped with chains it consumed but
	// did not complete, so its position cannot be handed over without
	// losing them.
	ErrInFlight = errors.New("mdev: backing device stopped with chains in flight")
)

// shadowAlign aligns the shadow rings' address space above guest memory.
const shadowAlign = 1 << 21

// relaySlotSegs is the segment room each in-flight slot starts with, and
// relayKeepSegs the longest chain whose room a slot keeps once the chain
// is completed. A slot's
// Segs grows to hold a longer chain (no allocation for the next chain as
// long), so a guest's usual chains, one to a few descriptors or the 19 to
// 47 of a Linux big-packet receive buffer, allocate nothing in steady
// state; a slot that held a longer one gets relaySlotSegs back when it is
// completed. Without the bound every slot kept the largest chain it had
// ever held, up to the shadow ring's size in segments each: the square of
// the ring size in all (40 bytes a segment): 2.5 MiB for 256 entries,
// 40 GiB for 32768. With it a queue keeps at most relayKeepSegs segments
// per slot, rounded up by append to at most about twice that (80 to
// 160 MiB for 32768 entries, what big-packet chains in every slot take
// anyway), and the chains in flight, which take one shadow
// descriptor per segment, no more than the ring's size in all.
const (
	relaySlotSegs = 4
	relayKeepSegs = 64
)

// relay is the shadow virtqueue data path used for dirty tracking when the
// backing device cannot log its writes.
//
// Design: the backing device is programmed with shadow rings that live in a
// memfd region placed just above the highest guest address, and with a
// memory map made of the guest's regions plus that region. The relay is the
// driver of each shadow ring and the device of the matching guest ring: it
// pops the guest's chains and adds them to the shadow ring with the very
// same guest buffer addresses (no bounce buffers: the backing device can see
// guest memory, since it could before), and when the backing device uses a
// shadow chain it pushes the guest chain to the guest's used ring with the
// same length. The guest side is a vring.DeviceQueue whose WriteLogger is the
// dirty bitmap, so the used-ring writes and the first `len` bytes of each
// chain's writable buffers — exactly what the backing device wrote — are
// marked.
//
// Handover (in and out) happens with the backing device stopped: its ring
// position is read back, and chains the relay had taken from the guest but
// the backing device never consumed are given back by rewinding the guest
// queue's next-avail index, so nothing is lost or done twice.
type relay struct {
	log *dirty.Bitmap
	run *relayRun
}

type relayRun struct {
	region *vring.Region
	mem    *vring.Memory // guest regions + shadow region (does not own the guest's)
	queues []*relayQueue // by queue index; nil for disabled queues
	// stopping tells the goroutines to exit; they are woken by a Signal
	// on the eventfds they wait on. (They wait with context.Background():
	// cancelling an EventFD.Wait through a context leaves a read deadline
	// on the shared descriptor, which would break the next waiter.)
	stopping atomic.Bool
	started  bool
	wake     chan struct{} // capacity 1: a pass is due
	wg       sync.WaitGroup
	failed   atomic.Pointer[error]
	// gen is the device's relayGen when this run was programmed: a
	// failure report from a run that is no longer current is dropped.
	gen uint64
	// reported is closed once the run's failure report was delivered or
	// dropped.
	reported chan struct{}
}

type relayQueue struct {
	idx        int
	guest      *vring.DeviceQueue
	shadow     *vring.DriverQueue
	guestKick  *vdpa.EventFD
	guestCall  atomic.Pointer[vdpa.EventFD]
	shadowKick *vdpa.EventFD
	shadowCall *vdpa.EventFD
	inflight   []vring.Chain // guest chain by shadow head
	pending    vring.Chain   // popped from the guest, not yet in the shadow ring
	hasPending bool
	// inflightDescs is the number of guest ring descriptors of the chains
	// in the shadow ring (Chain.Descs: packed guest rings only, 0 for
	// split ones), by which stop rewinds a packed guest queue.
	inflightDescs uint32
	added         bool // chains added to the shadow ring since the last publish
	bufs          []vring.Buffer
	used          [relayReclaimBatch]vring.UsedElem // complete's batch of shadow used entries
}

// program builds the shadow rings and programs the backing device with
// them. Called with d.mu held, after feature negotiation.
func (r *relay) program(d *Device) error {
	if r.run != nil {
		r.teardown(d)
	}
	guest := d.opts.Memory
	var top uint64 // one past guest memory's last byte (at most MaxUint64)
	for _, g := range guest.Regions() {
		last := uint64(g.Last())
		top = max(top, last+min(1, math.MaxUint64-last))
	}
	var size uint64
	for i := range d.queues {
		if d.queues[i].enabled {
			size += (vring.ContiguousLayoutBytes(shadowSize(d.queues[i].size)) + 4095) &^ 4095
		}
	}
	if size == 0 {
		size = 4096
	}
	// The shadow rings go at the first boundary above guest memory; memory
	// that reaches the top of the address space leaves no room (a hostile
	// DMA map can place it there).
	if top > math.MaxUint64-shadowAlign-size {
		return fmt.Errorf("mdev: shadow rings: guest memory reaches %#x, no room above it for %d bytes: %w", top, size, vring.ErrOverflow)
	}
	base := (top + shadowAlign - 1) &^ (shadowAlign - 1)
	region, err := vring.NewMemfdRegion(vring.GuestAddr(base), size, &vring.RegionOptions{Name: "mdev-shadow"})
	if err != nil {
		return fmt.Errorf("mdev: shadow rings: %w", err)
	}
	mem, err := vring.NewMemory(append(guest.Regions(), region)...)
	if err != nil {
		_ = region.Close()
		return fmt.Errorf("mdev: shadow memory map: %w", err)
	}
	d.relayGen++
	run := &relayRun{region: region, mem: mem, queues: make([]*relayQueue, len(d.queues)),
		gen: d.relayGen, reported: make(chan struct{})}
	r.run = run
	fail := func(err error) error {
		r.teardown(d)
		return err
	}
	if err := d.bk.SetMemory(mem); err != nil {
		return fail(backingErr("set memory", err))
	}
	var logger vring.WriteLogger
	if r.log != nil {
		logger = r.log
	}
	shadowFeatures := d.driverFeatures & virtio.FEventIdx.Bit()
	next := vring.GuestAddr(base)
	for i := range d.queues {
		q := &d.queues[i]
		if !q.enabled {
			continue
		}
		gl := vring.Layout{Size: q.size, Desc: vring.GuestAddr(q.desc), Avail: vring.GuestAddr(q.driver), Used: vring.GuestAddr(q.device)}
		gq, err := vring.NewDeviceQueue(guest, vring.DeviceQueueOptions{
			Index: i, Layout: gl, Features: d.driverFeatures, Log: logger, State: q.base,
		})
		if err != nil {
			return fail(fmt.Errorf("%w: %w", ErrQueueLayout, err))
		}
		ss := shadowSize(q.size)
		sl := vring.ContiguousLayout(next, ss)
		next += vring.GuestAddr((vring.ContiguousLayoutBytes(ss) + 4095) &^ 4095)
		sq, err := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Index: i, Layout: sl, Features: shadowFeatures})
		if err != nil {
			return fail(fmt.Errorf("mdev: shadow queue %d: %w", i, err))
		}
		rq := newRelayQueue(i, gq, sq)
		rq.guestKick = d.kicks[i]
		rq.guestCall.Store(d.queueCallFD(i))
		if rq.shadowKick, err = vdpa.NewEventFD(); err != nil {
			return fail(err)
		}
		if rq.shadowCall, err = vdpa.NewEventFD(); err != nil {
			_ = rq.shadowKick.Close()
			return fail(err)
		}
		run.queues[i] = rq
		addr := vdpa.QueueAddr{Desc: sl.Desc, Avail: sl.Avail, Used: sl.Used}
		if err := d.programQueue(i, ss, addr, vring.QueueState{}, rq.shadowKick, rq.shadowCall); err != nil {
			return fail(err)
		}
	}
	run.started = true
	run.wake = make(chan struct{}, 1)
	for _, rq := range run.queues {
		if rq == nil {
			continue
		}
		run.wg.Add(2)
		go run.waiter(rq.guestKick)
		go run.waiter(rq.shadowCall)
	}
	run.wg.Add(1)
	go run.worker(d)
	return nil
}

// newRelayQueue returns the relay between guest queue idx and its shadow
// ring, with an in-flight slot (and its starting segment room) for every
// shadow descriptor; the caller sets the eventfds.
func newRelayQueue(idx int, guest *vring.DeviceQueue, shadow *vring.DriverQueue) *relayQueue {
	rq := &relayQueue{idx: idx, guest: guest, shadow: shadow,
		inflight: make([]vring.Chain, shadow.Size()), bufs: make([]vring.Buffer, 0, 8)}
	for j := range rq.inflight {
		rq.inflight[j].Segs = make([]vring.Segment, 0, relaySlotSegs)
	}
	return rq
}

// shadowSize is the size of the split shadow ring serving a guest queue of
// size n: n itself, or for a packed guest ring (any size, §2.8) the next
// power of two (§2.7), which the backing device takes, since the device's
// maximum queue size is a power of two not below n.
func shadowSize(n uint16) uint16 {
	s := uint16(1)
	for s < n {
		s <<= 1
	}
	return s
}

// halt stops the goroutines and waits for them.
func (run *relayRun) halt() {
	if !run.started {
		return
	}
	run.started = false
	run.stopping.Store(true)
	for _, rq := range run.queues {
		if rq != nil {
			_ = rq.guestKick.Signal()
			_ = rq.shadowCall.Signal()
		}
	}
	select {
	case run.wake <- struct{}{}:
	default:
	}
	run.wg.Wait()
}

// waiter turns signals on one eventfd into wake-ups of the worker.
func (run *relayRun) waiter(ev *vdpa.EventFD) {
	defer run.wg.Done()
	for {
		if _, err := ev.Wait(context.Background()); err != nil || run.stopping.Load() {
			return // closed or stopping
		}
		select {
		case run.wake <- struct{}{}:
		default: // a pass is already due
		}
	}
}

// worker runs relay passes, one per wake-up, until the relay stops.
//
// Guest memory may be a file its owner (a VMM, a vhost-user front-end)
// truncates under the mapping. The worker turns on
// runtime/debug.SetPanicOnFault for its goroutine and loop recovers a
// fault once for the worker's lifetime (nothing per pass or chain): it
// fails the relay with an error matching vring.ErrMemoryFault, reported
// like any relay error, and the process lives on.
func (run *relayRun) worker(d *Device) {
	defer run.wg.Done()
	debug.SetPanicOnFault(true) // this goroutine only; it ends with the relay
	if err := run.loop(); err != nil {
		run.fail(d, err)
	}
}

// loop runs the passes until the relay stops (nil) or one fails.
func (run *relayRun) loop() (err error) {
	defer vring.CatchFault(&err)
	for range run.wake {
		if run.stopping.Load() {
			return nil
		}
		if err := run.pass(); err != nil {
			return err
		}
	}
	return nil
}

// fail records the relay's first error and reports it to the device. It is
// a separate function so that the error escapes only on this path.
func (run *relayRun) fail(d *Device, err error) {
	if run.failed.CompareAndSwap(nil, &err) {
		// Reported without d.mu held by this goroutine: stop() may hold
		// d.mu while waiting for us. By the time the report gets the lock
		// the run may be gone (device reset, closed, relay stopped or
		// reprogrammed): relayFailed drops it then.
		go func() {
			defer close(run.reported)
			d.relayFailed(run.gen, err)
		}()
	}
}

// pass completes what the backing device used, then forwards what the
// guest made available.
//
// Cross-queue order: a driver may make buffers available on one queue and
// then chains on another that depend on them (virtio-net posts receive
// buffers, then transmits frames the device loops back into them). The
// relay must not let the backing device see the second before the first.
// It pops the guest queues in descending index order and publishes the
// shadow rings in ascending order: a chain popped from a higher queue was
// published by the guest before the relay's (later) look at the lower
// queues, so whatever the guest published on those before it is forwarded
// in the same pass, and its shadow ring is published first. virtio-net
// numbers receive queues below their transmit queues, which is the order
// this serves.
func (run *relayRun) pass() error {
	for _, rq := range run.queues {
		if rq != nil {
			if err := rq.complete(); err != nil {
				return err
			}
		}
	}
	for i := len(run.queues) - 1; i >= 0; i-- {
		if rq := run.queues[i]; rq != nil {
			if err := rq.forward(); err != nil {
				return err
			}
		}
	}
	for _, rq := range run.queues {
		if rq != nil {
			if err := rq.publish(); err != nil {
				return err
			}
		}
	}
	return nil
}

// forward moves available guest chains to the shadow ring (unpublished).
// Only the relay's worker (or stop, after it) calls it.
func (rq *relayQueue) forward() error {
	for {
		if !rq.hasPending {
			ok, err := rq.guest.Pop(&rq.pending)
			if err != nil {
				return err
			}
			if !ok {
				break
			}
			rq.hasPending = true
		}
		c := &rq.pending
		if len(c.Segs) > int(rq.shadow.Size()) || len(c.Segs) == 0 {
			return fmt.Errorf("%w: queue %d head %d has %d buffers, shadow ring %d",
				ErrRelayChain, rq.idx, c.Head, len(c.Segs), rq.shadow.Size())
		}
		if rq.shadow.NumFree() < len(c.Segs) {
			break // wait for completions to free descriptors
		}
		rq.bufs = rq.bufs[:0]
		for _, s := range c.Segs {
			rq.bufs = append(rq.bufs, vring.Buffer{Addr: s.Addr, Len: s.Len, Writable: s.Writable})
		}
		head, err := rq.shadow.Add(rq.bufs)
		if err != nil {
			return err
		}
		dst := &rq.inflight[head]
		dst.Head, dst.Readable, dst.ReadableLen, dst.WritableLen = c.Head, c.Readable, c.ReadableLen, c.WritableLen
		dst.Descs = c.Descs
		dst.Segs = append(dst.Segs[:0], c.Segs...)
		rq.inflightDescs += uint32(c.Descs)
		rq.hasPending = false
		rq.added = true
	}
	return nil
}

// publish makes the added chains visible to the backing device and kicks
// it if it asks to be.
func (rq *relayQueue) publish() error {
	if !rq.added {
		return nil
	}
	rq.added = false
	rq.shadow.Publish()
	if rq.shadow.NeedsKick() {
		return rq.shadowKick.Signal()
	}
	return nil
}

// relayReclaimBatch is how many shadow used entries complete takes per
// ReclaimBatch: the burst DPDK and the back-ends here use. ReclaimBatch
// also asks for the next lines ahead, which matters here: the backing
// device runs on another CPU.
const relayReclaimBatch = 32

// complete returns every chain the backing device used to the guest's used
// ring (logging the written bytes) and interrupts the guest if it asked.
func (rq *relayQueue) complete() error {
	pushed := false
	for {
		k, rerr := rq.shadow.ReclaimBatch(rq.used[:])
		// The entries taken before a bad one (rerr) are delivered first.
		// An error ends the relay (its worker fails and stop tears it
		// down), so complete is never retried: the entries after one
		// PushChain refused need not be kept.
		for _, e := range rq.used[:k] {
			c := &rq.inflight[e.Head]
			if err := rq.guest.PushChain(c, e.Len); err != nil {
				return err
			}
			rq.inflightDescs -= uint32(c.Descs)
			if len(c.Segs) > relayKeepSegs {
				// A long chain's room goes (see relayKeepSegs): only
				// after one, never for the usual chains. The test is on
				// the chain's length, not the room: append rounds room up
				// to its size classes (58 segments get 67), so a test on
				// cap would drop, and allocate again, for chains within
				// the bound.
				c.Segs = make([]vring.Segment, 0, relaySlotSegs)
			}
			pushed = true
		}
		if rerr != nil {
			return rerr
		}
		if k < len(rq.used) {
			break
		}
	}
	if pushed && rq.guest.NeedsInterrupt() {
		return signalGuest(&rq.guestCall)
	}
	return nil
}

// signalGuest signals the guest interrupt that call holds. The vector may
// change under the relay (setGuestCall, after a guest's queue_msix_vector
// write or VectorsChanged), and the embedder may then close the eventfd
// it replaced, before or while this signals it: a signal that fails on an
// eventfd no longer current goes to the current one instead, and only a
// failure of the current one is the relay's.
func signalGuest(call *atomic.Pointer[vdpa.EventFD]) error {
	fd := call.Load()
	for fd != nil {
		err := fd.Signal()
		if err == nil {
			return nil
		}
		cur := call.Load()
		if cur == fd {
			return err
		}
		fd = cur
	}
	return nil
}

// setGuestCall changes the guest interrupt of queue q (a new MSI-X vector).
func (r *relay) setGuestCall(q int, fd *vdpa.EventFD) {
	if r.run != nil && q < len(r.run.queues) && r.run.queues[q] != nil {
		r.run.queues[q].guestCall.Store(fd)
	}
}

// stop hands the data path back: the relay's goroutines stop, the backing
// device is suspended (or its rings stopped) and reset, the completions it
// made are delivered to the guest, and each guest queue's position —
// rewound over chains the backing device never consumed — is recorded in
// d.queues[].base for the next programming. Called with d.mu held.
func (r *relay) stop(d *Device) error {
	run := r.run
	if run == nil {
		return nil
	}
	run.halt()
	if p := run.failed.Load(); p != nil {
		r.teardown(d)
		return *p
	}
	if err := d.suspendBacking(); err != nil {
		r.teardown(d)
		return err
	}
	bases, err := d.readBases()
	var firstErr error
	if err != nil {
		firstErr = err
	}
	for _, rq := range run.queues {
		if rq == nil || firstErr != nil {
			continue
		}
		st := bases[rq.idx]
		// On the caller's goroutine: guarded against a memory fault.
		if err := vring.Guard(rq.complete); err != nil {
			firstErr = err
			break
		}
		if st.NextAvail != st.NextUsed {
			firstErr = fmt.Errorf("%w: queue %d shadow next avail %d, next used %d", ErrInFlight, rq.idx, st.NextAvail, st.NextUsed)
			break
		}
		// Everything the backing device consumed is now complete; what
		// remains outstanding on the shadow ring (and a chain popped but
		// not yet added) goes back to the guest ring.
		// Chains added but never published were never seen by the backing
		// device either.
		gs, err := rq.rewind()
		if err != nil {
			firstErr = err
			break
		}
		d.queues[rq.idx].base = gs
	}
	if err := d.bk.SetStatus(0); err != nil && firstErr == nil {
		firstErr = backingErr("reset", err)
	}
	d.negotiated = false
	r.teardown(d)
	return firstErr
}

// rewind returns the guest queue's position with the chains the relay took
// but the backing device never consumed given back: those outstanding on
// the shadow ring and a chain popped but not yet added. Every other chain
// the relay took was pushed, so the rewound avail position must equal the
// used position. A split guest ring rewinds by chain count (one avail ring
// entry each); a packed one by descriptor count (Chain.Descs each, §2.8:
// the driver's ring position moves by the descriptors a chain occupies),
// and its positions carry wrap counters, so it is checked through
// PackedInFlight rather than subtracted.
func (rq *relayQueue) rewind() (vring.QueueState, error) {
	gs := rq.guest.State()
	if rq.guest.Packed() {
		back := rq.inflightDescs
		if rq.hasPending {
			back += uint32(rq.pending.Descs)
		}
		n, ok := gs.PackedInFlight(rq.guest.Size())
		if !ok || uint32(n) != back {
			return gs, fmt.Errorf("%w: queue %d guest next avail %#x, next used %#x, %d descriptors given back",
				ErrInFlight, rq.idx, gs.NextAvail, gs.NextUsed, back)
		}
		gs.NextAvail = gs.NextUsed
		return gs, nil
	}
	back := uint16(rq.shadow.Outstanding())
	if rq.hasPending {
		back++
	}
	gs.NextAvail -= back
	if gs.NextAvail != gs.NextUsed {
		return gs, fmt.Errorf("%w: queue %d guest next avail %d, next used %d", ErrInFlight, rq.idx, gs.NextAvail, gs.NextUsed)
	}
	return gs, nil
}

// teardown stops the relay goroutines, resets the backing device and frees
// the shadow rings, in that order: the backing device processes the shadow
// rings until it is reset, so unmapping them first would pull its memory
// from under it. A reset of an already reset device is harmless.
func (r *relay) teardown(d *Device) {
	run := r.run
	if run == nil {
		return
	}
	r.run = nil
	d.relayGen++ // reports from run are stale from now on
	run.halt()
	_ = d.bk.SetStatus(0)
	for _, rq := range run.queues {
		if rq == nil {
			continue
		}
		if rq.shadowKick != nil {
			_ = rq.shadowKick.Close()
		}
		if rq.shadowCall != nil {
			_ = rq.shadowCall.Close()
		}
	}
	_ = run.region.Close()
}

// relayFailed reports the failure of relay run gen, unless that run is no
// longer the device's current one.
func (d *Device) relayFailed(gen uint64, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed || d.relay == nil || d.relay.run == nil || d.relayGen != gen {
		return
	}
	d.needsReset(backingErr("data path", err))
}

// stopRelay abandons a running relay (device reset, FAILED, Close): the
// backing device is reset by the caller, so no state is read back.
func (d *Device) stopRelay() {
	if d.relay != nil {
		d.relay.teardown(d)
	}
}
