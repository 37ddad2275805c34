package vringtest

import (
	"encoding/binary"
	"fmt"

	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// RawRing writes and reads a split ring's fields directly, with no
// validation: for tests and fuzzers that feed a device hostile ring contents
// (loops, out-of-range indices, bad indirect tables, avail.idx jumps) and
// inspect exactly what it wrote back. It is not synchronized with anything;
// use it from the goroutine that drives the device under test.
type RawRing struct {
	Mem    *vring.Memory
	Layout vring.Layout
}

// NewRawRing checks that layout is valid and lies in mem.
func NewRawRing(mem *vring.Memory, layout vring.Layout) (*RawRing, error) {
	// The areas as large as any features make them (Validate's sizes).
	return newRawRing(mem, layout, virtio.Features(0).With(virtio.FEventIdx))
}

// newRawRing checks layout for the format and sizes f selects.
func newRawRing(mem *vring.Memory, layout vring.Layout, f virtio.Features) (*RawRing, error) {
	if err := layout.ValidateFor(f); err != nil {
		return nil, err
	}
	d, a, u := vring.RingSizes(layout.Size, f)
	for _, ar := range []struct {
		addr vring.GuestAddr
		n    uint64
	}{{layout.Desc, d}, {layout.Avail, a}, {layout.Used, u}} {
		if !mem.Contains(ar.addr, ar.n) {
			return nil, fmt.Errorf("vringtest: ring area %v+%#x: %w", ar.addr, ar.n, vring.ErrOutOfRange)
		}
	}
	return &RawRing{Mem: mem, Layout: layout}, nil
}

func (r *RawRing) put16(addr vring.GuestAddr, v uint16) error {
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], v)
	return r.Mem.Write(addr, b[:])
}

func (r *RawRing) get(addr vring.GuestAddr, n int) ([]byte, error) {
	b := make([]byte, n)
	return b, r.Mem.Read(addr, b)
}

// WriteDesc writes descriptor i of the table at table (the ring's own
// descriptor table is Layout.Desc; an indirect table is anywhere).
func (r *RawRing) WriteDesc(table vring.GuestAddr, i int, addr vring.GuestAddr, length uint32, flags, next uint16) error {
	var b [16]byte
	binary.LittleEndian.PutUint64(b[0:], uint64(addr))
	binary.LittleEndian.PutUint32(b[8:], length)
	binary.LittleEndian.PutUint16(b[12:], flags)
	binary.LittleEndian.PutUint16(b[14:], next)
	return r.Mem.Write(table+vring.GuestAddr(16*i), b[:])
}

// SetAvail writes head into available ring entry idx mod size.
func (r *RawRing) SetAvail(idx uint16, head uint16) error {
	slot := int(idx & (r.Layout.Size - 1))
	return r.put16(r.Layout.Avail+vring.GuestAddr(4+2*slot), head)
}

// SetAvailIdx writes avail.idx.
func (r *RawRing) SetAvailIdx(idx uint16) error { return r.put16(r.Layout.Avail+2, idx) }

// SetAvailFlags writes avail.flags.
func (r *RawRing) SetAvailFlags(flags uint16) error { return r.put16(r.Layout.Avail, flags) }

// SetUsedEvent writes used_event (the last field of the available ring).
func (r *RawRing) SetUsedEvent(v uint16) error {
	return r.put16(r.Layout.Avail+vring.GuestAddr(4+2*int(r.Layout.Size)), v)
}

// UsedIdx reads used.flags and used.idx.
func (r *RawRing) UsedIdx() (flags, idx uint16, err error) {
	b, err := r.get(r.Layout.Used, 4)
	if err != nil {
		return 0, 0, err
	}
	return binary.LittleEndian.Uint16(b), binary.LittleEndian.Uint16(b[2:]), nil
}

// Used reads used ring entry idx mod size.
func (r *RawRing) Used(idx uint16) (id, length uint32, err error) {
	slot := int(idx & (r.Layout.Size - 1))
	b, err := r.get(r.Layout.Used+vring.GuestAddr(4+8*slot), 8)
	if err != nil {
		return 0, 0, err
	}
	return binary.LittleEndian.Uint32(b), binary.LittleEndian.Uint32(b[4:]), nil
}

// AvailEvent reads avail_event (the last field of the used ring).
func (r *RawRing) AvailEvent() (uint16, error) {
	b, err := r.get(r.Layout.Used+vring.GuestAddr(4+8*int(r.Layout.Size)), 2)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint16(b), nil
}

// Packed rings (VIRTIO_F_RING_PACKED). A RawRing over a packed layout
// (NewRawPackedRing) writes and reads descriptors in the packed format
// (le64 addr, le32 len, le16 id, le16 flags) and the two event
// suppression structures (le16 off_wrap, le16 flags): Layout.Avail is the
// driver's, Layout.Used the device's.

// NewRawPackedRing checks that layout is a valid packed layout and lies in
// mem.
func NewRawPackedRing(mem *vring.Memory, layout vring.Layout) (*RawRing, error) {
	return newRawRing(mem, layout, virtio.Features(0).With(virtio.FRingPacked))
}

// PackedAvail is the AVAIL/USED bits of a descriptor the driver makes
// available with its wrap counter wrap: AVAIL = wrap, USED = !wrap.
func PackedAvail(wrap bool) uint16 {
	if wrap {
		return vring.DescFAvail
	}
	return vring.DescFUsed
}

// PackedUsed is the AVAIL/USED bits of a descriptor the device marks used
// with its wrap counter wrap: both equal to wrap.
func PackedUsed(wrap bool) uint16 {
	if wrap {
		return vring.DescFAvail | vring.DescFUsed
	}
	return 0
}

// WritePackedDesc writes descriptor i of a packed table at table (the
// ring's own descriptor ring is Layout.Desc; an indirect table is
// anywhere). The 16 bytes are written with one copy; a test that races a
// device against it must order the two itself.
func (r *RawRing) WritePackedDesc(table vring.GuestAddr, i int, addr vring.GuestAddr, length uint32, id, flags uint16) error {
	var b [16]byte
	binary.LittleEndian.PutUint64(b[0:], uint64(addr))
	binary.LittleEndian.PutUint32(b[8:], length)
	binary.LittleEndian.PutUint16(b[12:], id)
	binary.LittleEndian.PutUint16(b[14:], flags)
	return r.Mem.Write(table+vring.GuestAddr(16*i), b[:])
}

// PackedDesc reads descriptor i of the packed descriptor ring.
func (r *RawRing) PackedDesc(i int) (addr vring.GuestAddr, length uint32, id, flags uint16, err error) {
	b, err := r.get(r.Layout.Desc+vring.GuestAddr(16*i), 16)
	if err != nil {
		return 0, 0, 0, 0, err
	}
	return vring.GuestAddr(binary.LittleEndian.Uint64(b)), binary.LittleEndian.Uint32(b[8:]),
		binary.LittleEndian.Uint16(b[12:]), binary.LittleEndian.Uint16(b[14:]), nil
}

// SetDriverEvent writes the driver event suppression structure
// (desc_event_off_wrap, desc_event_flags).
func (r *RawRing) SetDriverEvent(offWrap, flags uint16) error {
	var b [4]byte
	binary.LittleEndian.PutUint16(b[0:], offWrap)
	binary.LittleEndian.PutUint16(b[2:], flags)
	return r.Mem.Write(r.Layout.Avail, b[:])
}

// DeviceEvent reads the device event suppression structure.
func (r *RawRing) DeviceEvent() (offWrap, flags uint16, err error) {
	b, err := r.get(r.Layout.Used, 4)
	if err != nil {
		return 0, 0, err
	}
	return binary.LittleEndian.Uint16(b), binary.LittleEndian.Uint16(b[2:]), nil
}
