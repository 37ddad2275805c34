// Package vhostcore is the logic vdpakit's vhost-kernel back-ends
// (vdpa/kernel over /dev/vhost-vdpa-N, vdpa/vhostnet over /dev/vhost-net)
// share above the ioctl layer of internal/vhostsys: programming a queue in
// the virtio initialization order, passing eventfds to the kernel, reading a
// stopped queue's used index back from guest memory and naming a closed
// device's errors.
package vhostcore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"github.com/vdpakit/vdpakit/internal/vhostsys"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// SetupQueue configures and enables queue q of dev from a ring layout in
// one call, in the order of the virtio initialization sequence: size,
// ring addresses, base, kick, call, enable. It stops at the first error.
func SetupQueue(dev vdpa.Device, q int, l vring.Layout, st vdpa.QueueState, kick, call *vdpa.EventFD) error {
	if err := dev.SetQueueNum(q, l.Size); err != nil {
		return err
	}
	if err := dev.SetQueueAddr(q, vdpa.QueueAddr{Desc: l.Desc, Avail: l.Avail, Used: l.Used}); err != nil {
		return err
	}
	if err := dev.SetQueueBase(q, st); err != nil {
		return err
	}
	if err := dev.SetQueueKick(q, kick); err != nil {
		return err
	}
	if err := dev.SetQueueCall(q, call); err != nil {
		return err
	}
	return dev.EnableQueue(q, true)
}

// Fd is the descriptor to hand the kernel for e: e's own, or
// vhostsys.FileUnbind for nil, which unbinds.
func Fd(e *vdpa.EventFD) int {
	if e == nil {
		return vhostsys.FileUnbind
	}
	return e.Fd()
}

// ClosedErr maps the error of a call on a closed vhost file (os.ErrClosed)
// to vdpa.ErrClosed and passes every other error through unchanged.
func ClosedErr(err error) error {
	if errors.Is(err, os.ErrClosed) {
		return vdpa.ErrClosed
	}
	return err
}

// UsedIdx reads the idx field of the split ring's used ring at used in
// mem: a little-endian 16-bit value after the 16-bit flags (virtio 1.2
// §2.7.8). It is where a vhost device publishes how far it got, which
// VHOST_GET_VRING_BASE does not report for a split ring.
func UsedIdx(mem *vring.Memory, used vring.GuestAddr) (uint16, error) {
	var b [2]byte
	if err := mem.Read(used+2, b[:]); err != nil {
		return 0, fmt.Errorf("reading used idx: %w", err)
	}
	return binary.LittleEndian.Uint16(b[:]), nil
}

// ErrBaseRange is returned by BaseState for a split queue's
// VHOST_GET_VRING_BASE answer that does not fit the 16-bit avail index.
var ErrBaseRange = errors.New("vhostcore: vring base beyond 16 bits for a split ring")

// VringBase is the num of VHOST_SET_VRING_BASE (and of vhost-user's
// SET_VRING_BASE) for a queue at st with the negotiated features f.
//
// Split ring: the next avail index; the used index is not carried (the
// used ring's idx in guest memory holds it). Packed ring (Linux
// drivers/vhost/vhost.c, QEMU's virtio_queue_get_last_avail_idx): bits
// 0..15 are the next avail position, bits 16..31 the next used position,
// each in the 16-bit encoding of vring.QueueState for packed queues (bits
// 0..14 the descriptor ring index, bit 15 the wrap counter).
func VringBase(st vdpa.QueueState, f virtio.Features) uint32 {
	if f.Has(virtio.FRingPacked) {
		return uint32(st.NextAvail) | uint32(st.NextUsed)<<16
	}
	return uint32(st.NextAvail)
}

// BaseState decodes the num of VHOST_GET_VRING_BASE for features f, the
// inverse of VringBase. For a split ring NextUsed is left equal to
// NextAvail: the caller reads the used ring's idx (UsedIdx) for the real
// value. A split num beyond 16 bits is ErrBaseRange.
func BaseState(num uint32, f virtio.Features) (vdpa.QueueState, error) {
	if f.Has(virtio.FRingPacked) {
		return vdpa.QueueState{NextAvail: uint16(num), NextUsed: uint16(num >> 16)}, nil
	}
	if num > 0xffff {
		return vdpa.QueueState{}, fmt.Errorf("%w: %#x", ErrBaseRange, num)
	}
	return vdpa.QueueState{NextAvail: uint16(num), NextUsed: uint16(num)}, nil
}
