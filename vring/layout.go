package vring

import (
	"fmt"

	"github.com/vdpakit/vdpakit/virtio"
)

// MaxQueueSize is the largest split virtqueue size (virtio 1.2 §2.7).
const MaxQueueSize = 32768

// Descriptor flags (virtio 1.2 §2.7.5).
const (
	DescFNext     uint16 = 1 // VIRTQ_DESC_F_NEXT: the chain continues via the next field
	DescFWrite    uint16 = 2 // VIRTQ_DESC_F_WRITE: device-writable buffer
	DescFIndirect uint16 = 4 // VIRTQ_DESC_F_INDIRECT: the buffer is a descriptor table
)

// Ring flags (virtio 1.2 §2.7.6, §2.7.8).
const (
	AvailFNoInterrupt uint16 = 1 // VIRTQ_AVAIL_F_NO_INTERRUPT: driver asks for no interrupts
	UsedFNoNotify     uint16 = 1 // VIRTQ_USED_F_NO_NOTIFY: device asks for no kicks
)

// Ring alignments required by virtio 1.x (§2.7, table "Virtqueue Part Alignment").
const (
	DescAlign  = 16
	AvailAlign = 2
	UsedAlign  = 4
)

// Layout is where a virtqueue lives in guest memory. It is plain,
// untrusted data (it comes from the driver); Validate checks it and the queue
// constructors check it again against guest memory. The comments give the
// split ring's meaning; for a packed queue (VIRTIO_F_RING_PACKED) Desc is
// the descriptor ring (16*Size bytes, 16-aligned), Avail the driver event
// suppression area and Used the device event suppression area (4 bytes,
// 4-aligned each), and Size is 1..32768, not necessarily a power of two
// (see packed.go, ValidateFor).
type Layout struct {
	Size  uint16    // number of descriptors: a power of two, 1..32768
	Desc  GuestAddr // descriptor table: Size*16 bytes, 16-aligned
	Avail GuestAddr // available ring: 4+2*Size bytes (6+2*Size with EVENT_IDX), 2-aligned
	Used  GuestAddr // used ring: 4+8*Size bytes (6+8*Size with EVENT_IDX), 4-aligned
}

// QueueState is a virtqueue's device-side position: the next available
// ring index the device will consume and the next used ring index it will
// publish. It is what migration saves and restores (vhost's VRING_BASE holds
// NextAvail). Like Layout it is plain, untrusted data. For a packed queue
// each field is a ring index (bits 0..14) with its wrap counter in bit 15,
// the vhost encoding (PackedIndex, InitialState).
type QueueState struct {
	NextAvail uint16
	NextUsed  uint16
}

// SplitSizes returns the byte sizes of the descriptor table, available ring
// (flags, idx, ring[size], used_event) and used ring (flags, idx,
// ring[size] of {id, len}, avail_event) for a queue of the given size: the
// areas as large as any features make them (RingSizes with EVENT_IDX).
func SplitSizes(size uint16) (desc, avail, used uint64) {
	n := uint64(size)
	return 16 * n, 6 + 2*n, 6 + 8*n
}

// RingSizes returns the byte sizes of the three areas of a queue of the
// given size with the negotiated features f: the event fields (used_event
// at the end of the available ring, avail_event at the end of the used
// ring) are part of the rings only with VIRTIO_F_EVENT_IDX (virtio 1.2
// §2.7.6, §2.7.8), as Linux vhost sizes them. The queue constructors check
// exactly these bytes against guest memory.
func RingSizes(size uint16, f virtio.Features) (desc, avail, used uint64) {
	if f.Has(virtio.FRingPacked) {
		return PackedSizes(size) // packed: descriptor ring, driver and device event suppression
	}
	d, a, u := SplitSizes(size)
	if !f.Has(virtio.FEventIdx) {
		a, u = a-2, u-2
	}
	return d, a, u
}

// ContiguousLayout places a queue of the given size at base (which should be
// 64-aligned): the descriptor table, then the available ring, then the used
// ring at the next 64-byte boundary. The spec only needs 4; starting the
// used ring (written by the device) on its own cache line keeps it from
// sharing a line with the end of the available ring (written by the driver).
func ContiguousLayout(base GuestAddr, size uint16) Layout {
	d, a, _ := SplitSizes(size)
	used := (uint64(base) + d + a + 63) &^ 63
	return Layout{Size: size, Desc: base, Avail: base + GuestAddr(d), Used: GuestAddr(used)}
}

// ContiguousLayoutBytes is the number of bytes ContiguousLayout uses from a
// 64-aligned base.
func ContiguousLayoutBytes(size uint16) uint64 {
	d, a, u := SplitSizes(size)
	return (d+a+63)&^63 + u
}

// ValidQueueSize reports whether size is a valid split queue size.
func ValidQueueSize(size uint16) bool { return size != 0 && size&(size-1) == 0 }

// Validate checks the size, the alignments and that the three areas neither
// overflow the address space nor overlap, with the areas as large as any
// features make them (ValidateFor with EVENT_IDX). It does not check that
// they lie in guest memory; the queue constructors do.
func (l Layout) Validate() error {
	return l.ValidateFor(virtio.Features(0).With(virtio.FEventIdx))
}

// ValidateFor is Validate with the areas sized for the negotiated features
// f (RingSizes). With VIRTIO_F_RING_PACKED in f it applies the packed
// rules: size 1..32768, descriptor ring 16-aligned, event suppression
// areas 4-aligned.
func (l Layout) ValidateFor(f virtio.Features) error {
	if f.Has(virtio.FRingPacked) {
		return l.validatePacked()
	}
	if !ValidQueueSize(l.Size) {
		return fmt.Errorf("%w: %d", ErrQueueSize, l.Size)
	}
	if l.Desc%DescAlign != 0 {
		return fmt.Errorf("%w: descriptor table %v not %d-aligned", ErrMisaligned, l.Desc, DescAlign)
	}
	if l.Avail%AvailAlign != 0 {
		return fmt.Errorf("%w: available ring %v not %d-aligned", ErrMisaligned, l.Avail, AvailAlign)
	}
	if l.Used%UsedAlign != 0 {
		return fmt.Errorf("%w: used ring %v not %d-aligned", ErrMisaligned, l.Used, UsedAlign)
	}
	d, a, u := RingSizes(l.Size, f)
	return checkAreas([3]area{{"descriptor table", l.Desc, d}, {"available ring", l.Avail, a}, {"used ring", l.Used, u}})
}
