package vring

import (
	"fmt"

	"github.com/vdpakit/vdpakit/virtio"
)

// Packed virtqueues (virtio 1.2 §2.8, VIRTIO_F_RING_PACKED).
//
// A packed queue is one descriptor ring that both sides write, plus two
// 4-byte event suppression structures. The package reuses Layout for it:
//
//	Layout.Desc  descriptor ring, 16*Size bytes, 16-aligned (virtio-pci queue_desc)
//	Layout.Avail driver event suppression, 4 bytes, 4-aligned (queue_driver): written by the driver
//	Layout.Used  device event suppression, 4 bytes, 4-aligned (queue_device): written by the device
//
// which is what virtio-pci's queue_desc/queue_driver/queue_device and
// vhost(-user)'s desc/avail/used ring addresses carry for a packed queue.
// The size is 1..32768 and need not be a power of two.
//
// DeviceQueue and DriverQueue handle both formats: NewDeviceQueue and
// NewDriverQueue build a packed queue when the features have
// VIRTIO_F_RING_PACKED, and Packed reports which one a queue is.

// MaxPackedQueueSize is the largest packed virtqueue size (virtio 1.2 §2.8:
// up to 2^15 entries).
const MaxPackedQueueSize = 32768

// Packed descriptor flags (virtio 1.2 §2.8.1). DescFNext, DescFWrite and
// DescFIndirect keep their split-ring values.
const (
	DescFAvail uint16 = 1 << 7  // VIRTQ_DESC_F_AVAIL
	DescFUsed  uint16 = 1 << 15 // VIRTQ_DESC_F_USED
)

// Event suppression flags (virtio 1.2 §2.8.10, desc_event_flags): the low
// two bits of the flags half of an event suppression structure.
const (
	EventFlagsEnable  uint16 = 0 // RING_EVENT_FLAGS_ENABLE: notify
	EventFlagsDisable uint16 = 1 // RING_EVENT_FLAGS_DISABLE: do not notify
	// EventFlagsDesc (RING_EVENT_FLAGS_DESC) asks for a notification when
	// the descriptor at the event offset and wrap counter is made
	// available (device area) or used (driver area). Only valid with
	// VIRTIO_F_EVENT_IDX; without it a side reading DESC treats it as
	// ENABLE, like the reserved value 3.
	EventFlagsDesc uint16 = 2
)

// Packed ring alignments (virtio 1.2 §2.8.10.1).
const (
	PackedDescAlign  = 16 // descriptor ring
	PackedEventAlign = 4  // driver and device event suppression structures
)

// PackedSizes returns the byte sizes of a packed queue's descriptor ring,
// driver event suppression area and device event suppression area.
func PackedSizes(size uint16) (desc, driverEvent, deviceEvent uint64) {
	return 16 * uint64(size), 4, 4
}

// ValidPackedQueueSize reports whether size is a valid packed queue size
// (1..32768; not necessarily a power of two).
func ValidPackedQueueSize(size uint16) bool { return size != 0 && size <= MaxPackedQueueSize }

// ContiguousPackedLayout places a packed queue of the given size at base
// (which should be 64-aligned): the descriptor ring, then the driver event
// suppression area at the next 64-byte boundary, then the device event
// suppression area on a 64-byte line of its own (each side's writes stay
// off the other side's cache lines).
func ContiguousPackedLayout(base GuestAddr, size uint16) Layout {
	d := (uint64(base) + 16*uint64(size) + 63) &^ 63
	return Layout{Size: size, Desc: base, Avail: GuestAddr(d), Used: GuestAddr(d + 64)}
}

// ContiguousPackedLayoutBytes is the number of bytes ContiguousPackedLayout
// uses from a 64-aligned base.
func ContiguousPackedLayoutBytes(size uint16) uint64 {
	return (16*uint64(size)+63)&^63 + 64 + 4
}

// LayoutFor is ContiguousLayout or, with VIRTIO_F_RING_PACKED in f,
// ContiguousPackedLayout.
func LayoutFor(base GuestAddr, size uint16, f virtio.Features) Layout {
	if f.Has(virtio.FRingPacked) {
		return ContiguousPackedLayout(base, size)
	}
	return ContiguousLayout(base, size)
}

// LayoutBytesFor is ContiguousLayoutBytes or, with VIRTIO_F_RING_PACKED in
// f, ContiguousPackedLayoutBytes.
func LayoutBytesFor(size uint16, f virtio.Features) uint64 {
	if f.Has(virtio.FRingPacked) {
		return ContiguousPackedLayoutBytes(size)
	}
	return ContiguousLayoutBytes(size)
}

// validatePacked is ValidateFor for a packed layout.
func (l Layout) validatePacked() error {
	if !ValidPackedQueueSize(l.Size) {
		return fmt.Errorf("%w: packed queue size %d not in 1..%d", ErrQueueSize, l.Size, MaxPackedQueueSize)
	}
	if l.Desc%PackedDescAlign != 0 {
		return fmt.Errorf("%w: descriptor ring %v not %d-aligned", ErrMisaligned, l.Desc, PackedDescAlign)
	}
	if l.Avail%PackedEventAlign != 0 {
		return fmt.Errorf("%w: driver event suppression area %v not %d-aligned", ErrMisaligned, l.Avail, PackedEventAlign)
	}
	if l.Used%PackedEventAlign != 0 {
		return fmt.Errorf("%w: device event suppression area %v not %d-aligned", ErrMisaligned, l.Used, PackedEventAlign)
	}
	d, a, u := PackedSizes(l.Size)
	return checkAreas([3]area{{"descriptor ring", l.Desc, d}, {"driver event suppression area", l.Avail, a},
		{"device event suppression area", l.Used, u}})
}

// area is one of a layout's three areas, for checkAreas.
type area struct {
	name string
	addr GuestAddr
	n    uint64
}

// checkAreas checks that no area overflows the address space and that no
// two overlap (ValidateFor, split and packed).
func checkAreas(areas [3]area) error {
	for _, ar := range areas {
		if err := checkRange(ar.addr, ar.n); err != nil {
			return fmt.Errorf("%s %v+%#x: %w", ar.name, ar.addr, ar.n, err)
		}
	}
	for i := range areas {
		for j := i + 1; j < len(areas); j++ {
			x, y := areas[i], areas[j]
			if uint64(x.addr) <= uint64(y.addr)+y.n-1 && uint64(y.addr) <= uint64(x.addr)+x.n-1 {
				return fmt.Errorf("%w: %s %v+%#x and %s %v+%#x", ErrRingOverlap, x.name, x.addr, x.n, y.name, y.addr, y.n)
			}
		}
	}
	return nil
}

// Packed queue state encoding.
//
// A packed queue's position is a ring index and a wrap counter per side.
// QueueState carries them in the vhost encoding (what vhost-user's
// GET/SET_VRING_BASE, vhost-vdpa and QEMU use): bits 0..14 are the ring
// index, bit 15 the wrap counter:
//
//	NextAvail = next avail index | avail wrap counter << 15
//	NextUsed  = next used index  | used wrap counter << 15
//
// A fresh packed queue starts at index 0 with both wrap counters 1
// (virtio 1.2 §2.8.1): InitialState.

// PackedWrapBit is the wrap counter bit of a packed position.
const PackedWrapBit uint16 = 1 << 15

// PackedIndex encodes a packed ring position: idx (< 32768) with the wrap
// counter in bit 15.
func PackedIndex(idx uint16, wrap bool) uint16 {
	v := idx &^ PackedWrapBit
	if wrap {
		v |= PackedWrapBit
	}
	return v
}

// PackedPosition splits an encoded packed position into the ring index and
// the wrap counter.
func PackedPosition(v uint16) (idx uint16, wrap bool) {
	return v &^ PackedWrapBit, v&PackedWrapBit != 0
}

// PackedBack returns the packed position v moved back by n descriptors on
// a ring of size descriptors: the wrap counter flips where the move
// crosses the ring's start. It gives chains back (a device that popped
// chains and stops before using them moves its avail position back by the
// descriptors they occupy, Chain.Descs). n must not exceed size, nor v's
// index be size or more.
func PackedBack(v, n, size uint16) uint16 {
	idx, wrap := PackedPosition(v)
	if n > idx {
		idx += size
		wrap = !wrap
	}
	return PackedIndex(idx-n, wrap)
}

// InitialState is the QueueState of a queue that has not been used yet:
// {0, 0} for a split queue, {0x8000, 0x8000} (index 0, wrap counters 1)
// with VIRTIO_F_RING_PACKED in f.
func InitialState(f virtio.Features) QueueState {
	if f.Has(virtio.FRingPacked) {
		return QueueState{NextAvail: PackedWrapBit, NextUsed: PackedWrapBit}
	}
	return QueueState{}
}

// AvailIndex is the ring index of a packed state's NextAvail.
func (s QueueState) AvailIndex() uint16 { return s.NextAvail &^ PackedWrapBit }

// AvailWrap is the avail wrap counter of a packed state's NextAvail.
func (s QueueState) AvailWrap() bool { return s.NextAvail&PackedWrapBit != 0 }

// UsedIndex is the ring index of a packed state's NextUsed.
func (s QueueState) UsedIndex() uint16 { return s.NextUsed &^ PackedWrapBit }

// UsedWrap is the used wrap counter of a packed state's NextUsed.
func (s QueueState) UsedWrap() bool { return s.NextUsed&PackedWrapBit != 0 }

// PackedInFlight returns the number of ring descriptors between a packed
// state's NextUsed and NextAvail (descriptors of chains popped and not yet
// returned), or ok == false when the state is impossible for a queue of
// the given size: an index >= size, or NextAvail behind NextUsed or more
// than size descriptors ahead of it.
func (s QueueState) PackedInFlight(size uint16) (n uint16, ok bool) {
	ai, aw := PackedPosition(s.NextAvail)
	ui, uw := PackedPosition(s.NextUsed)
	if size == 0 || ai >= size || ui >= size {
		return 0, false
	}
	switch {
	case aw == uw && ai >= ui:
		return ai - ui, true // same lap
	case aw != uw && ai <= ui:
		return size - ui + ai, true // avail one lap ahead
	}
	return 0, false
}

// validatePackedState checks a packed QueueState for a queue of size.
func validatePackedState(st QueueState, size uint16) error {
	if _, ok := st.PackedInFlight(size); !ok {
		ai, aw := PackedPosition(st.NextAvail)
		ui, uw := PackedPosition(st.NextUsed)
		return fmt.Errorf("%w: packed next avail %d wrap %v, next used %d wrap %v, size %d", ErrInvalidState,
			ai, aw, ui, uw, size)
	}
	return nil
}
