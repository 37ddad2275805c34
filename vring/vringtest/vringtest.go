// Package vringtest is a test kit for code that sits on the device side of a
// virtqueue (devices, vhost back-ends, relays): a driver-side helper that
// writes chains with real content into guest memory and reads completions
// back, and a Harness that wires memfd-backed guest memory, a ring, a Driver
// and a vring.DeviceQueue together. It is meant for tests, fuzzers and
// benchmarks of other packages; it is an ordinary importable package.
package vringtest

import (
	"errors"
	"fmt"

	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// MaxSegs is the largest number of readable plus writable segments a Driver
// chain may have.
const MaxSegs = 16

// DriverOptions configure a Driver.
type DriverOptions struct {
	// Index is the queue index.
	Index int
	// Layout is the ring; it must lie in Mem.
	Layout vring.Layout
	// Features are the negotiated features (EVENT_IDX, INDIRECT_DESC,
	// RING_PACKED, IN_ORDER).
	Features virtio.Features
	// Data is the guest address of the buffer area: Layout.Size slots of
	// SlotSize bytes, followed by Layout.Size indirect tables of MaxSegs*16
	// bytes. DataBytes reports how much that is.
	Data vring.GuestAddr
	// SlotSize is the bytes of buffer space per chain (readable and
	// writable segments together). Default 4096.
	SlotSize uint32
	// Indirect makes Send use indirect tables (needs INDIRECT_DESC).
	Indirect bool
}

// DataBytes is the size of the buffer area a Driver with these options uses.
func (o *DriverOptions) DataBytes() uint64 {
	ss := o.SlotSize
	if ss == 0 {
		ss = 4096
	}
	return uint64(o.Layout.Size) * (uint64(ss) + MaxSegs*16)
}

type slotInfo struct {
	slot uint16
	nw   int
	bufs [MaxSegs]vring.Buffer
}

// Driver is the driver side of a queue with buffer management: each chain
// gets a private slot of buffer space, so chains can carry real content.
// It writes split or packed chains, as the features say (heads are buffer
// ids on a packed queue). A Driver is owned by one goroutine.
type Driver struct {
	Queue *vring.DriverQueue
	Mem   *vring.Memory

	opts      DriverOptions
	slotSize  uint32
	freeSlots []uint16
	byHead    []slotInfo
	bufs      [MaxSegs]vring.Buffer
}

// NewDriver creates a driver-side queue on layout (zeroing the ring) with a
// buffer area at opts.Data.
func NewDriver(mem *vring.Memory, opts DriverOptions) (*Driver, error) {
	q, err := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Index: opts.Index, Layout: opts.Layout, Features: opts.Features})
	if err != nil {
		return nil, err
	}
	if opts.SlotSize == 0 {
		opts.SlotSize = 4096
	}
	if !mem.Contains(opts.Data, opts.DataBytes()) {
		return nil, fmt.Errorf("vringtest: buffer area %v+%#x: %w", opts.Data, opts.DataBytes(), vring.ErrOutOfRange)
	}
	if opts.Indirect && !opts.Features.Has(virtio.FIndirectDesc) {
		return nil, fmt.Errorf("vringtest: Indirect without VIRTIO_F_INDIRECT_DESC: %w", vring.ErrIndirectNotNegotiated)
	}
	d := &Driver{Queue: q, Mem: mem, opts: opts, slotSize: opts.SlotSize,
		byHead: make([]slotInfo, opts.Layout.Size)}
	for i := int(opts.Layout.Size) - 1; i >= 0; i-- {
		d.freeSlots = append(d.freeSlots, uint16(i))
	}
	return d, nil
}

// ErrFull is returned by Send when the queue or the buffer slots are full.
var ErrFull = errors.New("vringtest: queue full")

// ErrTooBig is returned by Send when the segments do not fit a slot or
// there are more than MaxSegs of them.
var ErrTooBig = errors.New("vringtest: chain does not fit a slot")

// Add writes a chain with one readable segment per element of readable
// (content copied into guest memory) and one writable segment per element of
// writable (that many bytes of space, zeroed), and adds it without
// publishing. It returns the head.
func (d *Driver) Add(readable [][]byte, writable []uint32) (uint16, error) {
	n := len(readable) + len(writable)
	if n == 0 || n > MaxSegs {
		return 0, fmt.Errorf("%w: %d segments", ErrTooBig, n)
	}
	if len(d.freeSlots) == 0 || (!d.opts.Indirect && d.Queue.NumFree() < n) || d.Queue.NumFree() < 1 {
		return 0, ErrFull
	}
	var total uint64
	for _, r := range readable {
		total += uint64(len(r))
	}
	for _, w := range writable {
		total += uint64(w)
	}
	if total > uint64(d.slotSize) {
		return 0, fmt.Errorf("%w: %d bytes, slot is %d", ErrTooBig, total, d.slotSize)
	}
	slot := d.freeSlots[len(d.freeSlots)-1]
	addr := d.opts.Data + vring.GuestAddr(uint64(slot)*uint64(d.slotSize))
	bufs := d.bufs[:0]
	for _, r := range readable {
		if err := d.Mem.Write(addr, r); err != nil {
			return 0, err
		}
		bufs = append(bufs, vring.Buffer{Addr: addr, Len: uint32(len(r))})
		addr += vring.GuestAddr(len(r))
	}
	for _, w := range writable {
		b, err := d.Mem.Slice(addr, uint64(w))
		if err != nil {
			return 0, err
		}
		clear(b)
		bufs = append(bufs, vring.Buffer{Addr: addr, Len: w, Writable: true})
		addr += vring.GuestAddr(w)
	}
	var head uint16
	var err error
	if d.opts.Indirect {
		table := d.opts.Data + vring.GuestAddr(uint64(d.opts.Layout.Size)*uint64(d.slotSize)+uint64(slot)*MaxSegs*16)
		head, err = d.Queue.AddIndirect(table, bufs)
	} else {
		head, err = d.Queue.Add(bufs)
	}
	if err != nil {
		return 0, err
	}
	d.freeSlots = d.freeSlots[:len(d.freeSlots)-1]
	si := &d.byHead[head]
	si.slot = slot
	si.nw = copy(si.bufs[:], bufs[len(readable):])
	return head, nil
}

// Send adds a chain (see Add), publishes it and reports whether the device
// wants a kick.
func (d *Driver) Send(readable [][]byte, writable []uint32) (head uint16, kick bool, err error) {
	head, err = d.Add(readable, writable)
	if err != nil {
		return 0, false, err
	}
	d.Queue.Publish()
	return head, d.Queue.NeedsKick(), nil
}

// Completion is a reclaimed chain.
type Completion struct {
	Head uint16
	Len  uint32 // length the device reported
	// Data is a copy of the first Len bytes of the chain's writable
	// segments (nil when Len is 0).
	Data []byte
}

// Receive reclaims the next used chain and copies what the device wrote.
func (d *Driver) Receive() (Completion, bool, error) {
	head, n, ok, err := d.Queue.Reclaim()
	if err != nil || !ok {
		return Completion{}, ok, err
	}
	si := &d.byHead[head]
	c := Completion{Head: head, Len: n}
	if n > 0 {
		c.Data = make([]byte, 0, n)
		left := n
		for _, b := range si.bufs[:si.nw] {
			k := min(left, b.Len)
			p := make([]byte, k)
			if err := d.Mem.Read(b.Addr, p); err != nil {
				return Completion{}, false, err
			}
			c.Data = append(c.Data, p...)
			left -= k
		}
	}
	d.freeSlots = append(d.freeSlots, si.slot)
	return c, true, nil
}

// Options configure a Harness.
type Options struct {
	// Size is the queue size (default 256). A packed queue's size need not
	// be a power of two.
	Size uint16
	// Features are the negotiated features. With VIRTIO_F_RING_PACKED the
	// ring is a packed one (vring.ContiguousPackedLayout) and the device
	// side starts from vring.InitialState.
	Features virtio.Features
	// SlotSize is the buffer space per chain (default 4096).
	SlotSize uint32
	// Indirect makes the driver use indirect tables (needs INDIRECT_DESC).
	Indirect bool
	// Log is the device side's WriteLogger.
	Log vring.WriteLogger
	// Base is the guest address of guest memory (default 0).
	Base vring.GuestAddr
	// NoDevice leaves Harness.Device nil, for tests that attach their own
	// device side to Harness.Mem and Harness.Layout.
	NoDevice bool
}

// Harness is a ring (split or packed) in memfd-backed guest memory with
// both sides attached.
type Harness struct {
	Mem    *vring.Memory
	Layout vring.Layout
	Driver *Driver
	Device *vring.DeviceQueue
}

// New builds a Harness: one memfd region at opts.Base holding the ring
// (page 0) and the driver's buffer area. A nil opts means defaults.
func New(opts *Options) (*Harness, error) {
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.Size == 0 {
		o.Size = 256
	}
	if o.SlotSize == 0 {
		o.SlotSize = 4096
	}
	ringBytes := (vring.LayoutBytesFor(o.Size, o.Features) + 4095) &^ 4095
	layout := vring.LayoutFor(o.Base, o.Size, o.Features)
	dopts := DriverOptions{Layout: layout, Features: o.Features, Data: o.Base + vring.GuestAddr(ringBytes),
		SlotSize: o.SlotSize, Indirect: o.Indirect}
	total := ringBytes + dopts.DataBytes()
	r, err := vring.NewMemfdRegion(o.Base, (total+4095)&^4095, &vring.RegionOptions{Name: "vringtest"})
	if err != nil {
		return nil, err
	}
	mem, err := vring.NewMemory(r)
	if err != nil {
		r.Close()
		return nil, err
	}
	drv, err := NewDriver(mem, dopts)
	if err != nil {
		mem.Close()
		return nil, err
	}
	h := &Harness{Mem: mem, Layout: layout, Driver: drv}
	if !o.NoDevice {
		h.Device, err = vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: layout, Features: o.Features, Log: o.Log,
			State: vring.InitialState(o.Features)})
		if err != nil {
			mem.Close()
			return nil, err
		}
	}
	return h, nil
}

// Close releases the guest memory.
func (h *Harness) Close() error { return h.Mem.Close() }
