package vfiousertest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/vdpakit/vdpakit/mdev/vfiouser"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// ErrDriver: the device did not behave as a virtio-pci device should.
var ErrDriver = errors.New("vfiousertest: driver bring-up failed")

// Guest memory layout of the Driver.
const (
	GuestMemSize = 4 << 20
	rxRing       = 0x10000
	txRing       = 0x20000
	rxBufs       = 0x100000
	txBufs       = 0x200000
	bufSize      = 2048
	queueSize    = 64  // default ring size
	maxQueueSize = 256 // buffers per queue the layout holds
	netHdrLen    = 12
)

// Cap is a virtio PCI capability found in configuration space.
type Cap struct {
	Offset              int // in config space
	CfgType, Bar        uint8
	BarOffset, Length   uint32
	NotifyOffMultiplier uint32
}

// DriverOptions configure NewDriver.
type DriverOptions struct {
	// INTx uses the line interrupt instead of MSI-X.
	INTx bool
	// ReplaceIRQs registers new interrupt eventfds after DRIVER_OK (QEMU
	// re-registers its MSI-X eventfds when the guest unmasks vectors, while
	// the data path runs).
	ReplaceIRQs bool
	// Packed negotiates VIRTIO_F_RING_PACKED and runs both queues as
	// packed virtqueues (virtio 1.2 §2.8); bring-up fails with ErrDriver
	// when the device does not offer it.
	Packed bool
	// QueueSize is both queues' size (default 64, at most 256); a packed
	// queue's need not be a power of two.
	QueueSize uint16
}

// Driver is a virtio-net driver running over vfio-user with guest memory
// in a memfd it DMA-maps: receive queue 0 and transmit queue 1.
type Driver struct {
	C        *Client
	Mem      *vring.Memory
	Region   *vring.Region
	Caps     []Cap
	MSIXCap  int // offset of the MSI-X capability, 0 if none
	Config   []byte
	Features virtio.Features
	irqs     []*vdpa.EventFD // per MSI-X vector, or [0] = INTx
	intx     bool
	rx, tx   *vring.DriverQueue
	packed   bool
	qsize    uint16
	rxAddr   []vring.GuestAddr // receive buffer by buffer id (head)
	common   Cap
	notify   Cap
	isr      Cap
	device   Cap

	Sent, Received uint64
}

// NewDriver negotiates the protocol, maps guest memory and brings the
// device up to DRIVER_OK the way Linux's virtio_pci and virtio_net do.
func NewDriver(ctx context.Context, c *Client, opts *DriverOptions) (*Driver, error) {
	d := &Driver{C: c}
	var o DriverOptions
	if opts != nil {
		o = *opts
	}
	d.intx = o.INTx
	d.packed = o.Packed
	d.qsize = o.QueueSize
	if d.qsize == 0 {
		d.qsize = queueSize
	}
	if d.qsize > maxQueueSize {
		return nil, fmt.Errorf("%w: queue size %d > %d", ErrDriver, d.qsize, maxQueueSize)
	}
	if _, err := c.Negotiate(ctx); err != nil {
		return nil, err
	}
	r, err := vring.NewMemfdRegion(0, GuestMemSize, nil)
	if err != nil {
		return nil, err
	}
	d.Region = r
	if d.Mem, err = vring.NewMemory(r); err != nil {
		_ = r.Close()
		return nil, err
	}
	if err := c.DMAMap(ctx, 0, GuestMemSize, r.Fd(), 0); err != nil {
		d.Close()
		return nil, err
	}
	if err := d.bringUp(ctx); err != nil {
		d.Close()
		return nil, err
	}
	if o.ReplaceIRQs {
		if err := d.replaceIRQs(ctx); err != nil {
			d.Close()
			return nil, err
		}
	}
	return d, nil
}

// Close releases the driver's memory and eventfds (not the client).
func (d *Driver) Close() {
	for _, e := range d.irqs {
		_ = e.Close()
	}
	if d.Mem != nil {
		_ = d.Mem.Close()
	}
}

// ParseCaps walks the capability list of a configuration space image.
func ParseCaps(cfg []byte) (caps []Cap, msix int, err error) {
	off := int(cfg[0x34])
	for hops := 0; off != 0; hops++ {
		if off < 0x40 || off+4 > len(cfg) || hops > 48 {
			return nil, 0, fmt.Errorf("%w: capability at %#x", ErrDriver, off)
		}
		switch cfg[off] {
		case 0x09:
			c := Cap{Offset: off, CfgType: cfg[off+3], Bar: cfg[off+4],
				BarOffset: binary.LittleEndian.Uint32(cfg[off+8:]), Length: binary.LittleEndian.Uint32(cfg[off+12:])}
			if c.CfgType == 2 {
				c.NotifyOffMultiplier = binary.LittleEndian.Uint32(cfg[off+16:])
			}
			caps = append(caps, c)
		case 0x11:
			msix = off
		}
		off = int(cfg[off+1])
	}
	return caps, msix, nil
}

func (d *Driver) wc(ctx context.Context, off uint64, size int, v uint64) error {
	return d.C.WriteN(ctx, uint32(d.common.Bar), uint64(d.common.BarOffset)+off, size, v)
}

func (d *Driver) rc(ctx context.Context, off uint64, size int) (uint64, error) {
	return d.C.ReadN(ctx, uint32(d.common.Bar), uint64(d.common.BarOffset)+off, size)
}

func (d *Driver) bringUp(ctx context.Context) error {
	c := d.C
	cfg, err := c.Read(ctx, vfiouser.RegionConfig, 0, 256)
	if err != nil {
		return err
	}
	d.Config = cfg
	if binary.LittleEndian.Uint16(cfg) != 0x1af4 {
		return fmt.Errorf("%w: vendor %#x", ErrDriver, binary.LittleEndian.Uint16(cfg))
	}
	if d.Caps, d.MSIXCap, err = ParseCaps(cfg); err != nil {
		return err
	}
	for _, cp := range d.Caps {
		switch cp.CfgType {
		case 1:
			d.common = cp
		case 2:
			d.notify = cp
		case 3:
			d.isr = cp
		case 4:
			d.device = cp
		}
	}
	if d.common.Length == 0 || d.notify.Length == 0 || d.isr.Length == 0 {
		return fmt.Errorf("%w: missing virtio capabilities", ErrDriver)
	}
	// Memory space and bus master.
	if err := c.WriteN(ctx, vfiouser.RegionConfig, 4, 2, 0x6); err != nil {
		return err
	}
	// Interrupts.
	if d.intx {
		e, err := vdpa.NewEventFD()
		if err != nil {
			return err
		}
		d.irqs = []*vdpa.EventFD{e}
		if err := c.SetIRQEventfds(ctx, vfiouser.IRQIntx, 0, 1, []int{e.Fd()}); err != nil {
			return err
		}
	} else {
		if d.MSIXCap == 0 {
			return fmt.Errorf("%w: no MSI-X capability", ErrDriver)
		}
		n := int(binary.LittleEndian.Uint16(cfg[d.MSIXCap+2:])&0x7ff) + 1
		fds := make([]int, n)
		for i := 0; i < n; i++ {
			e, err := vdpa.NewEventFD()
			if err != nil {
				return err
			}
			d.irqs = append(d.irqs, e)
			fds[i] = e.Fd()
		}
		if err := c.SetIRQEventfds(ctx, vfiouser.IRQMSIX, 0, uint32(n), fds); err != nil {
			return err
		}
		if err := c.WriteN(ctx, vfiouser.RegionConfig, uint64(d.MSIXCap+2), 2, 0x8000|uint64(n-1)); err != nil {
			return err
		}
	}
	// virtio 1.2 §3.1.1.
	steps := []struct {
		off  uint64
		size int
		v    uint64
	}{{mdevOffStatus, 1, 0}, {mdevOffStatus, 1, uint64(virtio.StatusAcknowledge)},
		{mdevOffStatus, 1, uint64(virtio.StatusAcknowledge | virtio.StatusDriver)}}
	for _, s := range steps {
		if err := d.wc(ctx, s.off, s.size, s.v); err != nil {
			return err
		}
	}
	var offered virtio.Features
	for sel := uint64(0); sel < 2; sel++ {
		if err := d.wc(ctx, 0x00, 4, sel); err != nil {
			return err
		}
		v, err := d.rc(ctx, 0x04, 4)
		if err != nil {
			return err
		}
		offered |= virtio.Features(v) << (32 * sel)
	}
	want := virtio.Features(0).With(virtio.FVersion1).With(virtio.NetFMAC).With(virtio.NetFStatus).With(virtio.NetFMTU)
	if d.packed {
		want = want.With(virtio.FRingPacked)
	}
	d.Features = offered & want
	if d.packed && !d.Features.Has(virtio.FRingPacked) {
		return fmt.Errorf("%w: device does not offer RING_PACKED", ErrDriver)
	}
	if !vring.ValidQueueSizeFor(d.qsize, d.Features) {
		return fmt.Errorf("%w: queue size %d", ErrDriver, d.qsize)
	}
	for sel := uint64(0); sel < 2; sel++ {
		if err := d.wc(ctx, 0x08, 4, sel); err != nil {
			return err
		}
		if err := d.wc(ctx, 0x0c, 4, uint64(d.Features)>>(32*sel)&0xffffffff); err != nil {
			return err
		}
	}
	st := virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK
	if err := d.wc(ctx, mdevOffStatus, 1, uint64(st)); err != nil {
		return err
	}
	if v, err := d.rc(ctx, mdevOffStatus, 1); err != nil || virtio.Status(v)&virtio.StatusFeaturesOK == 0 {
		return fmt.Errorf("%w: FEATURES_OK refused (status %v, %v)", ErrDriver, virtio.Status(v), err)
	}
	if !d.intx {
		if err := d.wc(ctx, 0x10, 2, 0); err != nil { // msix_config = vector 0
			return err
		}
	}
	for q, base := range []uint64{rxRing, txRing} {
		l := vring.LayoutFor(vring.GuestAddr(base), d.qsize, d.Features)
		dq, err := vring.NewDriverQueue(d.Mem, vring.DriverQueueOptions{Index: q, Layout: l, Features: d.Features})
		if err != nil {
			return err
		}
		if q == 0 {
			d.rx = dq
		} else {
			d.tx = dq
		}
		vec := uint64(0xffff)
		if !d.intx {
			vec = uint64(q + 1)
		}
		for _, w := range []struct {
			off  uint64
			size int
			v    uint64
		}{{0x16, 2, uint64(q)}, {0x18, 2, uint64(d.qsize)}, {0x1a, 2, vec},
			{0x20, 8, uint64(l.Desc)}, {0x28, 8, uint64(l.Avail)}, {0x30, 8, uint64(l.Used)}, {0x1c, 2, 1}} {
			if err := d.wc(ctx, w.off, w.size, w.v); err != nil {
				return err
			}
		}
	}
	if err := d.wc(ctx, mdevOffStatus, 1, uint64(st|virtio.StatusDriverOK)); err != nil {
		return err
	}
	if v, err := d.rc(ctx, mdevOffStatus, 1); err != nil || virtio.Status(v)&virtio.StatusDeviceNeedsReset != 0 {
		return fmt.Errorf("%w: DRIVER_OK: status %v, %v", ErrDriver, virtio.Status(v), err)
	}
	if v, err := d.rc(ctx, 0x18, 2); err != nil || uint16(v) != d.qsize {
		return fmt.Errorf("%w: queue_size %d not taken (reads %d, %v)", ErrDriver, d.qsize, v, err)
	}
	// Fill the receive queue.
	d.rxAddr = make([]vring.GuestAddr, d.qsize)
	for i := 0; i < int(d.qsize); i++ {
		if err := d.postRx(vring.GuestAddr(rxBufs + i*bufSize)); err != nil {
			return err
		}
	}
	d.rx.Publish()
	return d.Kick(0)
}

// postRx adds the receive buffer at addr and remembers it by the id (the
// head, a packed ring's buffer id) the queue gave it.
func (d *Driver) postRx(addr vring.GuestAddr) error {
	id, err := d.rx.Add([]vring.Buffer{{Addr: addr, Len: bufSize, Writable: true}})
	if err != nil {
		return err
	}
	if int(id) >= len(d.rxAddr) {
		return fmt.Errorf("%w: receive buffer id %d beyond the ring", ErrDriver, id)
	}
	d.rxAddr[id] = addr
	return nil
}

const mdevOffStatus = 0x14

// replaceIRQs registers fresh eventfds for every interrupt and closes the
// old ones.
func (d *Driver) replaceIRQs(ctx context.Context) error {
	fresh := make([]*vdpa.EventFD, len(d.irqs))
	fds := make([]int, len(d.irqs))
	for i := range fresh {
		e, err := vdpa.NewEventFD()
		if err != nil {
			for _, f := range fresh[:i] {
				_ = f.Close()
			}
			return err
		}
		fresh[i], fds[i] = e, e.Fd()
	}
	index := uint32(vfiouser.IRQMSIX)
	if d.intx {
		index = vfiouser.IRQIntx
	}
	if err := d.C.SetIRQEventfds(ctx, index, 0, uint32(len(fds)), fds); err != nil {
		for _, f := range fresh {
			_ = f.Close()
		}
		return err
	}
	for _, e := range d.irqs {
		_ = e.Close()
	}
	d.irqs = fresh
	return nil
}

// Kick notifies queue q with a posted write, as QEMU forwards doorbells.
func (d *Driver) Kick(q int) error {
	return d.C.PostWriteN(uint32(d.notify.Bar), uint64(d.notify.BarOffset)+uint64(q)*uint64(d.notify.NotifyOffMultiplier), 2, uint64(q))
}

// IRQ returns the eventfd of MSI-X vector v (or the INTx eventfd).
func (d *Driver) IRQ(v int) *vdpa.EventFD { return d.irqs[v] }

// ReadISR reads (and so clears) the ISR status.
func (d *Driver) ReadISR(ctx context.Context) (uint8, error) {
	v, err := d.C.ReadN(ctx, uint32(d.isr.Bar), uint64(d.isr.BarOffset), 1)
	return uint8(v), err
}

// SendFrames transmits frames (each prefixed with a zero virtio-net
// header), reclaiming completed ones as it goes. When the transmit queue is
// full it publishes what it added, kicks, and waits for completions (up to
// the client's Timeout: a device that never completes is an error).
func (d *Driver) SendFrames(frames [][]byte) error {
	for _, f := range frames {
		var deadline time.Time
		for d.tx.NumFree() == 0 {
			_, _, ok, err := d.tx.Reclaim()
			if err != nil {
				return err
			}
			if ok {
				continue
			}
			if deadline.IsZero() {
				deadline = time.Now().Add(d.C.Timeout)
				d.tx.Publish()
				if err := d.Kick(1); err != nil {
					return err
				}
			} else if time.Now().After(deadline) {
				return fmt.Errorf("%w: transmit queue full, no completion in %v", ErrDriver, d.C.Timeout)
			}
			time.Sleep(50 * time.Microsecond)
		}
		i := d.Sent % uint64(d.qsize)
		addr := vring.GuestAddr(txBufs + i*bufSize)
		buf := make([]byte, netHdrLen+len(f))
		copy(buf[netHdrLen:], f)
		if err := d.Mem.Write(addr, buf); err != nil {
			return err
		}
		if _, err := d.tx.Add([]vring.Buffer{{Addr: addr, Len: uint32(len(buf))}}); err != nil {
			return err
		}
		d.Sent++
	}
	d.tx.Publish()
	return d.Kick(1)
}

// Receive collects received frames until want have arrived or ctx ends,
// waiting on the receive queue's interrupt (MSI-X vector 1, or INTx with
// an ISR read as the guest's handler does).
func (d *Driver) Receive(ctx context.Context, want uint64, fn func(frame []byte)) error {
	for d.Received < want {
		got := false
		for {
			head, n, ok, err := d.rx.Reclaim()
			if err != nil {
				return err
			}
			if !ok {
				break
			}
			got = true
			if int(head) >= len(d.rxAddr) {
				return fmt.Errorf("%w: receive id %d beyond the ring", ErrDriver, head)
			}
			addr := d.rxAddr[head]
			if n >= netHdrLen && fn != nil {
				b := make([]byte, n)
				if err := d.Mem.Read(addr, b); err != nil {
					return err
				}
				fn(b[netHdrLen:])
			}
			d.Received++
			if err := d.postRx(addr); err != nil {
				return err
			}
		}
		if got {
			d.rx.Publish()
			if err := d.Kick(0); err != nil {
				return err
			}
			continue
		}
		if d.Received >= want {
			break
		}
		e := d.irqs[0]
		if !d.intx {
			e = d.irqs[1]
		}
		if _, err := e.Wait(ctx); err != nil {
			return fmt.Errorf("%w: %d of %d frames received: %w", ErrDriver, d.Received, want, err)
		}
		if d.intx {
			if _, err := d.ReadISR(ctx); err != nil {
				return err
			}
			if err := d.C.SetIRQs(ctx, vfiouser.IRQIntx, vfiouser.IRQSetActionUnmask, 0, 1); err != nil {
				return err
			}
		}
	}
	return nil
}
