package softnet

import (
	"fmt"
	"runtime/debug"

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

// Tx is the context of a transmitted frame: the device and queue pair it
// came from. It is owned by the transmit queue; do not keep it after
// HandleFrame returns.
type Tx struct {
	dev    *Device
	pair   int
	rxPair int // receive pair with a deferred interrupt, or -1
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
func (t *Tx) Reply(frame []byte) error {
	p := t.dev.steer(t.pair)
	if t.rxPair >= 0 && t.rxPair != p {
		t.dev.flushRx(t.rxPair)
	}
	t.rxPair = p
	return t.dev.deliver(p, frame, true)
}

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
	return d.deliver(d.steer(pair), frame, false)
}

func (d *Device) steer(pair int) int {
	n := int(d.activePairs.Load())
	if pair < n {
		return pair
	}
	return pair % n
}

// Loopback sends every transmitted frame back to the driver on the same
// queue pair, like the kernel's vdpa_sim_net.
var Loopback FrameHandler = FrameHandlerFunc(func(tx *Tx, frame []byte) { _ = tx.Reply(frame) })

// Discard drops every transmitted frame (it is still counted as
// transmitted).
var Discard FrameHandler = FrameHandlerFunc(func(*Tx, []byte) {})

// ForwardTo returns a handler that delivers every transmitted frame to
// peer, on the same queue pair number: a cable from this device to peer.
// A memory fault reading the frame (this device's guest memory) breaks
// this device's transmit queue, not peer's receive queue.
func ForwardTo(peer *Device) FrameHandler {
	return FrameHandlerFunc(func(tx *Tx, frame []byte) {
		if err := peer.Deliver(tx.Pair(), frame); err != nil {
			if fe, ok := err.(*vring.FaultError); ok && inSlice(frame, fe.Addr) {
				panic(fe) // to the transmit worker's guard
			}
		}
	})
}

// Link connects a and b in both directions with ForwardTo.
func Link(a, b *Device) {
	a.SetHandler(ForwardTo(b))
	b.SetHandler(ForwardTo(a))
}
