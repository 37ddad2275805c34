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
