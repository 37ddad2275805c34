package softnet

import (
	"fmt"
	"runtime/debug"

	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// FrameHandler receives the frames the driver transmits.
//
// HandleFrame is called on the transmit queue's goroutine, so calls for
// different queue pairs run concurrently; calls for one pair are
// sequential. frame (without the virtio-net header) is only valid during
// the call; it may point straight into guest memory. The transmit chain is
// completed after HandleFrame returns, so a reply sent with tx.Reply is
// copied from the transmit buffer into the receive buffer directly.
type FrameHandler interface {
	HandleFrame(tx *Tx, frame []byte)
}

// FrameHandlerFunc adapts a function to FrameHandler.
type FrameHandlerFunc func(tx *Tx, frame []byte)

// HandleFrame calls f.
func (f FrameHandlerFunc) HandleFrame(tx *Tx, frame []byte) { f(tx, frame) }

// OffloadHandler is a FrameHandler that also takes transmitted frames
// with their virtio-net header, so that checksum and segmentation offloads
// reach a back-end that does them itself (a tap device, another device's
// driver) instead of being done by this device.
//
// When the device's handler is an OffloadHandler, every transmitted frame
// goes to HandleOffload, with a zero header when there is nothing to do.
// The header has been validated against the frame (a header that lies is
// dropped and counted as DropTxBadHeader before any handler sees it):
// csum_start+csum_offset+2 lies within the frame, gso_type is NONE, TCPV4,
// TCPV6 or UDP_L4 (possibly with the ECN bit) of a feature the driver
// negotiated, gso_size is not zero, and the frame is the TCP or UDP packet
// over IPv4 or IPv6 its gso_type says, with csum_start and csum_offset at
// its transport checksum. num_buffers is zero, flags hold NEEDS_CSUM or
// nothing (the device ignores the others, §5.1.6.2.2), and hdr_len is the
// length of a GSO frame's headers as the device parsed them (the driver's
// value is a hint), zero for a frame without GSO whose hint exceeded it.
//
// TxOffloads returns the offloads (a subset of HostOffloads) the handler
// takes as they come: the device completes the checksum of a NEEDS_CSUM
// frame when CSUM is not in it, and segments a GSO frame whose HOST_TSO4,
// HOST_TSO6, HOST_USO (or, with the ECN bit, HOST_ECN) is not in it; the
// handler then gets the resulting frames with a zero header, checksums
// complete. It is called once per transmit batch, and again after any
// SetHandler call during one (even one that sets the same handler).
type OffloadHandler interface {
	FrameHandler
	TxOffloads() virtio.Features
	HandleOffload(tx *Tx, hdr virtio.NetHdr, frame []byte)
}

// Tx is the context of a transmitted frame: the device and queue pair it
// came from. It is owned by the transmit queue; do not keep it after
// HandleFrame returns.
type Tx struct {
	dev    *Device
	q      *queue // the transmit queue whose batch this is
	pair   int
	rxPair int // receive pair with a deferred interrupt, or -1
	// hold: replies keep the receive queue's lock until the end of the
	// batch (set for the built-in Loopback, which runs nothing between
	// replies); held is the receive queue so locked, or nil.
	hold bool
	held *queue
}

// flush publishes the replies of the batch so far and raises the receive
// interrupt if the driver wants one, releasing a held receive queue.
func (t *Tx) flush() {
	if rx := t.held; rx != nil {
		t.held = nil
		t.dev.flushLocked(rx)
		rx.mu.Unlock()
	} else {
		t.dev.flushRx(t.rxPair)
	}
	t.rxPair = -1
}

// release unlocks a held receive queue without publishing anything (a
// batch ended by a memory fault).
func (t *Tx) release() {
	if rx := t.held; rx != nil {
		t.held = nil
		rx.mu.Unlock()
	}
}

// reply delivers a reply on the steered pair, flushing the replies made
// to another pair first.
func (t *Tx) reply(hdr *virtio.NetHdr, frame []byte) error {
	p := t.dev.steer(t.pair)
	rx := t.dev.queues[2*p]
	if t.held != nil && t.held != rx {
		t.flush() // the active pairs changed during the batch
	}
	if t.rxPair >= 0 && t.rxPair != p {
		t.dev.flushRx(t.rxPair)
	}
	if t.hold && t.held == nil {
		rx.mu.Lock()
		t.held = rx
	}
	t.rxPair = p
	return t.dev.deliverVia(t.q, t.held, p, hdr, frame)
}

// Device returns the device that transmitted the frame.
func (t *Tx) Device() *Device { return t.dev }

// Pair returns the queue pair the frame was transmitted on.
func (t *Tx) Pair() int { return t.pair }

// Reply delivers frame to the driver on the receive queue of the same
// queue pair (or, if the driver reduced the active pairs below it, of pair
// Pair() mod active pairs). The receive interrupt is raised once at the
// end of the transmit batch. Errors (ErrNoBuffer, ErrFiltered, ...) are
// also counted in Stats.
func (t *Tx) Reply(frame []byte) error { return t.reply(nil, frame) }

// ReplyHdr is Reply for a frame with a virtio-net header: a partial
// checksum (NEEDS_CSUM) or a GSO frame reaches a driver that negotiated
// the matching GUEST_* offload as it is, and is completed or segmented by
// the device for one that did not (as DeliverHdr does).
func (t *Tx) ReplyHdr(hdr virtio.NetHdr, frame []byte) error { return t.reply(&hdr, frame) }

// Deliver writes frame to the driver's receive queue of queue pair pair
// (mod the active pairs) and raises the receive interrupt if the driver
// wants one. It is safe for concurrent use and copies frame before
// returning. If guest memory faults (its owner truncated the file behind
// it), the receive queue breaks (QueueErr) and Deliver returns an error
// matching vring.ErrMemoryFault; a fault reading frame itself returns such
// an error too, with the receive queue intact. The calling goroutine's
// runtime/debug.SetPanicOnFault setting is turned on for the call and
// restored.
func (d *Device) Deliver(pair int, frame []byte) (err error) {
	if pair < 0 {
		return fmt.Errorf("%w: pair %d", ErrQueueIndex, pair)
	}
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer vring.CatchFault(&err) // a fault reading frame itself
	return d.deliver(d.steer(pair), nil, frame)
}

// DeliverHdr is Deliver for a frame with a virtio-net header, as a host
// back-end (a tap device) hands them over. The header is validated against
// the frame first: one that lies (an unknown flag, csum_start or
// csum_offset beyond the frame, an unknown gso_type, gso_size 0 with a
// gso_type, a frame that is not the packet its gso_type says or a partial
// checksum that is not its transport checksum) is dropped, counted as
// DropRxBadHeader, and an error matching ErrBadHeader returned.
// num_buffers is ignored (the device sets it); hdr_len is set to the
// length of a GSO frame's headers (§5.1.6.4.2: not less than them).
//
// What the driver negotiated decides the rest: with GUEST_CSUM, NEEDS_CSUM
// and DATA_VALID reach it as they are, and a GSO frame whose GUEST_TSO4,
// GUEST_TSO6, GUEST_USO4/6 (and, with the ECN bit, GUEST_ECN) it
// negotiated reaches it whole, provided it has NEEDS_CSUM (a device MUST
// set it on a GSO frame, §5.1.6.4.2). Otherwise the device does the offload in
// software: it completes the checksum, or segments the frame into gso_size
// payloads with every header and checksum rewritten (the segments count as
// delivered frames; the first that finds no buffer ends the frame with one
// drop), and the driver sees a zero header.
func (d *Device) DeliverHdr(pair int, hdr virtio.NetHdr, frame []byte) (err error) {
	if pair < 0 {
		return fmt.Errorf("%w: pair %d", ErrQueueIndex, pair)
	}
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer vring.CatchFault(&err) // a fault reading frame itself
	return d.deliver(d.steer(pair), &hdr, frame)
}

func (d *Device) steer(pair int) int {
	n := int(d.activePairs.Load())
	if pair < n {
		return pair
	}
	return pair % n
}

// Loopback sends every transmitted frame back to the driver on the same
// queue pair, like the kernel's vdpa_sim_net. It is an OffloadHandler that
// takes every offload: a header the driver transmits comes back with the
// frame (ReplyHdr), so a GSO frame reaches a driver with the GUEST_*
// offloads whole and is segmented for one without.
var Loopback FrameHandler = loopback{}

type loopback struct{}

func (loopback) HandleFrame(tx *Tx, frame []byte) { _ = tx.Reply(frame) }
func (loopback) TxOffloads() virtio.Features      { return HostOffloads }
func (loopback) HandleOffload(tx *Tx, hdr virtio.NetHdr, frame []byte) {
	if hdr == (virtio.NetHdr{}) {
		// The common case, compared in registers: taking hdr's address
		// (ReplyHdr) spills it to the stack field by field and reloads it
		// whole, a load the store buffer cannot forward, which waits for
		// every earlier store, the last frame's into the driver's cache
		// lines included, to drain.
		_ = tx.Reply(frame)
		return
	}
	_ = tx.ReplyHdr(hdr, frame)
}

// Discard drops every transmitted frame (it is still counted as
// transmitted).
var Discard FrameHandler = FrameHandlerFunc(func(*Tx, []byte) {})

// ForwardTo returns a handler that delivers every transmitted frame to
// peer, on the same queue pair number: a cable from this device to peer.
// It is an OffloadHandler taking every offload: headers go to peer with
// their frames (DeliverHdr). A memory fault reading the frame (this
// device's guest memory) breaks this device's transmit queue, not peer's
// receive queue.
func ForwardTo(peer *Device) FrameHandler { return forwarder{peer} }

type forwarder struct{ peer *Device }

func (f forwarder) HandleFrame(tx *Tx, frame []byte) {
	forwardErr(frame, f.peer.Deliver(tx.Pair(), frame))
}
func (f forwarder) TxOffloads() virtio.Features { return HostOffloads }
func (f forwarder) HandleOffload(tx *Tx, hdr virtio.NetHdr, frame []byte) {
	forwardErr(frame, f.peer.DeliverHdr(tx.Pair(), hdr, frame))
}

func forwardErr(frame []byte, err error) {
	if fe, ok := err.(*vring.FaultError); ok && inSlice(frame, fe.Addr) {
		panic(fe) // to the transmit worker's guard
	}
}

// Link connects a and b in both directions with ForwardTo.
func Link(a, b *Device) {
	a.SetHandler(ForwardTo(b))
	b.SetHandler(ForwardTo(a))
}
