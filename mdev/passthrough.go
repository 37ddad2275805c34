package mdev

import (
	"errors"
	"fmt"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// ErrQueueLayout: a queue the driver enabled has a size or ring address the
// spec forbids (§2.7 split rings: power-of-two size, 16/2/4 alignment;
// §2.8 packed rings: size 1..32768, 16/4/4 alignment) or that lies outside
// guest memory. The device sets DEVICE_NEEDS_RESET.
var ErrQueueLayout = errors.New("mdev: invalid queue layout")

// ErrNoMemory: the device went live without Options.Memory.
var ErrNoMemory = errors.New("mdev: no guest memory")

// ringAreas returns the byte sizes and alignments of a queue's three areas
// (queue_desc, queue_driver, queue_device) for the features f. Split rings
// (§2.7): descriptor table 16*n, available ring 6+2*n, used ring 6+8*n (each
// with its event-index field), aligned 16/2/4. Packed rings (§2.8.10.1):
// descriptor ring 16*n, driver and device event suppression structures of 4
// bytes each, aligned 16/4/4.
func ringAreas(n uint16, f virtio.Features) (size, align [3]uint64) {
	if f.Has(virtio.FRingPacked) {
		ds, drv, dev := vring.PackedSizes(n)
		return [3]uint64{ds, drv, dev}, [3]uint64{vring.PackedDescAlign, vring.PackedEventAlign, vring.PackedEventAlign}
	}
	ds, as, us := vring.SplitSizes(n)
	return [3]uint64{ds, as, us}, [3]uint64{16, 2, 4}
}

// validateQueue checks an enabled queue's layout against the spec and guest
// memory.
func (d *Device) validateQueue(i int) error {
	q := &d.queues[i]
	f := d.driverFeatures
	if q.size == 0 || q.size > d.maxQueue || !vring.ValidQueueSizeFor(q.size, f) {
		return fmt.Errorf("%w: queue %d size %d", ErrQueueLayout, i, q.size)
	}
	sizes, aligns := ringAreas(q.size, f)
	for j, a := range []struct {
		name string
		addr uint64
	}{{"desc", q.desc}, {"driver", q.driver}, {"device", q.device}} {
		align, size := aligns[j], sizes[j]
		if a.addr%align != 0 {
			return fmt.Errorf("%w: queue %d %s area %#x not %d-aligned", ErrQueueLayout, i, a.name, a.addr, align)
		}
		if a.addr+size < a.addr {
			return fmt.Errorf("%w: queue %d %s area %#x overflows", ErrQueueLayout, i, a.name, a.addr)
		}
		if _, err := d.opts.Memory.Slice(vring.GuestAddr(a.addr), size); err != nil {
			return fmt.Errorf("%w: queue %d %s area %#x+%d: %w", ErrQueueLayout, i, a.name, a.addr, size, err)
		}
	}
	return nil
}

// checkQueues checks every enabled queue's layout against guest memory:
// what DRIVER_OK requires of the driver's rings.
func (d *Device) checkQueues() error {
	if d.opts.Memory == nil {
		return ErrNoMemory
	}
	for i := range d.queues {
		if d.queues[i].enabled {
			if err := d.validateQueue(i); err != nil {
				return err
			}
		}
	}
	return nil
}

// goLive runs when the driver sets DRIVER_OK (or when a migrated device
// resumes): it validates every enabled queue and programs the backing device
// so the data path runs without this layer.
func (d *Device) goLive() error {
	if err := d.checkQueues(); err != nil {
		return err
	}
	if !d.negotiated {
		if err := d.negotiateBacking(); err != nil {
			return err
		}
	}
	if err := d.programBacking(); err != nil {
		_ = d.bk.SetStatus(0)
		d.negotiated = false
		return err
	}
	d.live = true
	d.startWatch()
	return nil
}

// programBacking hands the backing device the guest memory and every
// enabled queue, then sets DRIVER_OK on it. In relay mode the backing device
// gets the shadow rings instead and the relay serves the guest's rings.
func (d *Device) programBacking() error {
	b := d.bk
	if d.relay != nil {
		if err := d.relay.program(d); err != nil {
			return err
		}
	} else {
		if err := b.SetMemory(d.opts.Memory); err != nil {
			return backingErr("set memory", err)
		}
		for i := range d.queues {
			q := &d.queues[i]
			if !q.enabled {
				continue
			}
			addr := vdpa.QueueAddr{Desc: vring.GuestAddr(q.desc), Avail: vring.GuestAddr(q.driver), Used: vring.GuestAddr(q.device)}
			if err := d.programQueue(i, q.size, addr, q.base, d.kicks[i], d.queueCallFD(i)); err != nil {
				return err
			}
		}
	}
	st := virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK | virtio.StatusDriverOK
	if err := b.SetStatus(st); err != nil {
		return backingErr("set status DRIVER_OK", err)
	}
	// Kick every queue once: a notification the guest sent while the
	// device was stopped (migration, relay switch) must not be lost.
	for i := range d.queues {
		if d.queues[i].enabled {
			_ = d.kicks[i].Signal()
		}
	}
	return nil
}

func (d *Device) programQueue(i int, size uint16, addr vdpa.QueueAddr, base vring.QueueState, kick, call *vdpa.EventFD) error {
	b := d.bk
	if err := b.SetQueueNum(i, size); err != nil {
		return backingErr(fmt.Sprintf("queue %d num", i), err)
	}
	if err := b.SetQueueAddr(i, addr); err != nil {
		return backingErr(fmt.Sprintf("queue %d addr", i), err)
	}
	if err := b.SetQueueBase(i, base); err != nil {
		return backingErr(fmt.Sprintf("queue %d base", i), err)
	}
	if err := b.SetQueueKick(i, kick); err != nil {
		return backingErr(fmt.Sprintf("queue %d kick", i), err)
	}
	if err := b.SetQueueCall(i, call); err != nil {
		return backingErr(fmt.Sprintf("queue %d call", i), err)
	}
	if err := b.EnableQueue(i, true); err != nil {
		return backingErr(fmt.Sprintf("queue %d enable", i), err)
	}
	return nil
}

// rewireCall points the backing device's interrupt for queue q at the
// eventfd of the queue's current vector.
func (d *Device) rewireCall(q int) error {
	if d.relay != nil {
		d.relay.setGuestCall(q, d.queueCallFD(q))
		return nil
	}
	return backingErr(fmt.Sprintf("queue %d call", q), d.bk.SetQueueCall(q, d.queueCallFD(q)))
}

// quiesce stops the data path at a consistent point and records every
// enabled queue's position in queues[].base. It uses the backing device's
// Suspender when it has one; otherwise it reads the positions (which stops
// vhost rings) and resets the backing device.
func (d *Device) quiesce() error {
	if !d.live {
		return nil
	}
	if d.relay != nil {
		if err := d.relay.stop(d); err != nil {
			return err
		}
		d.live = false
		return nil
	}
	if err := d.suspendBacking(); err != nil {
		return err
	}
	bases, err := d.readBases()
	if err != nil {
		return err
	}
	for i, st := range bases {
		if !d.queues[i].enabled {
			continue
		}
		// A chain the device consumed but did not complete would be lost
		// when the device restarts from this position.
		if st.NextAvail != st.NextUsed {
			return fmt.Errorf("%w: queue %d next avail %d, next used %d", ErrInFlight, i, st.NextAvail, st.NextUsed)
		}
		d.queues[i].base = st
	}
	// Whether suspended or not, the backing device is re-programmed from
	// scratch when the data path restarts, so that the same path serves a
	// resume on the source, a relay switch and a restore on the
	// destination.
	if err := d.bk.SetStatus(0); err != nil {
		return backingErr("reset", err)
	}
	d.live = false
	d.negotiated = false
	return nil
}

// suspendBacking stops the backing device's data path without a reset when
// it can (vdpa.Suspender). A device without suspend support (VDUSE behind
// vhost-vdpa, older kernels) is stopped queue by queue by readBases
// instead.
func (d *Device) suspendBacking() error {
	if _, err := d.bk.Suspend(); err != nil && !errors.Is(err, errors.ErrUnsupported) {
		return backingErr("suspend", err)
	}
	return nil
}

// readBases reads every enabled queue's position. On vhost devices this
// stops each queue (GET_VRING_BASE), so it goes from the highest queue
// down: for virtio-net the transmit queue (odd) stops before its receive
// queue, and a frame transmitted before the stop still finds its receive
// queue running.
func (d *Device) readBases() ([]vring.QueueState, error) {
	bases := make([]vring.QueueState, len(d.queues))
	for i := len(d.queues) - 1; i >= 0; i-- {
		if !d.queues[i].enabled {
			continue
		}
		st, err := d.bk.QueueBase(i)
		if err != nil {
			return nil, backingErr(fmt.Sprintf("queue %d base", i), err)
		}
		bases[i] = st
	}
	return bases, nil
}

// restart resumes the data path after quiesce, from the recorded queue
// positions.
func (d *Device) restart() error {
	if !d.restartGoesLive() {
		return nil
	}
	return d.goLive()
}

// restartGoesLive reports whether restart would start the data path.
func (d *Device) restartGoesLive() bool {
	return !d.live && d.status&virtio.StatusDriverOK != 0 && d.status&(virtio.StatusDeviceNeedsReset|virtio.StatusFailed) == 0
}

// CheckRings makes the check a restart of the data path makes first (the
// one DRIVER_OK makes: every enabled queue's rings lie in guest memory,
// laid out as their format requires) without restarting anything. It
// returns nil when the check passes or when a restart would not start the
// data path (no DRIVER_OK, NEEDS_RESET, or already live); otherwise the
// error the restart would fail with (matching ErrQueueLayout or
// ErrNoMemory). A VMM that stopped the device to unmap guest memory can so
// wait until the rings are mapped again before it returns the device to
// RUNNING, where a restart now would put it in ERROR.
func (d *Device) CheckRings() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.restartGoesLive() {
		return nil
	}
	return d.checkQueues()
}
