package vring

import (
	"errors"
	"fmt"
)

// usedMark is what a DeviceQueue writes into the Element Address of every
// used descriptor of a packed ring, which is unused in a used descriptor
// (virtio 1.2 §2.8.4): the high 32 bits are this tag ("vdpa"), far above
// any guest-physical address a buffer can have, and the low 16 bits the
// number of ring descriptors the used position moved by (the chain's
// descriptors, or more when a first used descriptor also covers chains
// whose ids a restore lost). The ring so records where the device's used
// position stands, which PackedUsedPosition reads back for a device that
// takes the ring over without being told (see there).
const (
	usedMark     = uint64(0x76647061) << 32
	usedMarkMask = ^uint64(0xffff)
)

// ErrUsedRun is returned by PackedUsedPosition for a descriptor ring whose
// used descriptors do not form one run the way a DeviceQueue writes them.
var ErrUsedRun = errors.New("vring: used descriptors in the packed ring do not form one run")

// PositionSource says how a packed ring recorded a used position
// (PackedUsedPosition).
type PositionSource int

const (
	// NoPosition: the ring records none.
	NoPosition PositionSource = iota
	// UsedRun: the end of the run of used descriptors a DeviceQueue
	// wrote. Exact.
	UsedRun
	// CutBatch: the first descriptor of a batch of used descriptors whose
	// publication was cut short (a device that died between writing the
	// batch and storing its first flags word, which publishes it): the
	// driver has seen none of the batch. Exact.
	CutBatch
	// OldestAvailable: a ring whose every descriptor is available, the
	// driver having reused every used slot: the oldest available
	// descriptor. Not exact: a slot a used chain of several descriptors
	// left over looks the same (see PackedUsedPosition).
	OldestAvailable
)

func (s PositionSource) String() string {
	switch s {
	case NoPosition:
		return "none"
	case UsedRun:
		return "used run"
	case CutBatch:
		return "cut batch"
	case OldestAvailable:
		return "oldest available"
	}
	return fmt.Sprintf("PositionSource(%d)", int(s))
}

// PackedUsedPosition reads the descriptor ring of a packed virtqueue laid
// out at l and returns the device's used position as the ring itself
// records it: the position (ring index and wrap counter, as
// QueueState.NextUsed encodes it) and how the ring recorded it.
//
// A device that takes a packed ring over is told where to start by the
// front-end (vhost-user SET_VRING_BASE), which learned it from the device
// before (GET_VRING_BASE). When that device died instead of answering,
// the front-end has nothing to tell: a split ring's used index is in
// guest memory (QEMU restores the position from it), but a packed ring
// keeps its positions in the two sides only, and QEMU hands the new
// device the position of the last hand-over it saw, one the device before
// may have gone past many descriptors ago. A device started there finds
// no descriptor available and the queue stays dead. Every used descriptor
// a DeviceQueue writes records how far it moved the used position (see
// usedMark), so the run of them, walked from any one of them, ends exactly
// where the used position stands (UsedRun): where a new device resumes
// (chains the old device popped and never used are popped again, as QEMU
// does with a split ring's used index). See PackedResumePosition.
//
// The walk starts at the first used descriptor with the mark from l's
// first descriptor on and follows the recorded counts, each used
// descriptor in the lap its position is in (its AVAIL and USED bits equal
// to the wrap counter there), until a position holds no used descriptor
// of that lap. A descriptor whose flags still say available but which
// holds the mark is the first of a batch the device wrote and never
// published (it stores that descriptor's flags last): the driver's used
// position is there (CutBatch), wherever a walk would end. A driver that
// keeps the ring full (a receive ring) reuses every used slot, so no used
// descriptor is left: a ring whose every descriptor is available, none
// chained, all ids distinct, gives the oldest available one, where the
// device's lap begins (OldestAvailable, see fullPosition). That one is not
// exact: a chain of several descriptors leaves the slots its used
// descriptor did not overwrite looking available until the driver reuses
// them (so do chains an IN_ORDER device covered with one used
// descriptor), and the checks cannot exclude every such leftover. A ring
// read while the driver writes it is read again until two reads agree.
//
// NoPosition is a ring that records none: one no DeviceQueue of this
// package has used; one the driver re-initialized, which it zeroes
// (§2.8.13: "The descriptor ring is zero-initialized"), and has not
// filled; one whose used descriptors another implementation wrote. A ring
// whose run does not add up (a count of 0 or more than the ring, a run
// longer than the ring, a used descriptor of the lap without the mark
// where the run ends, two cut batches), or that keeps changing under the
// reads, gives ErrUsedRun. The driver can write anything into the ring;
// whatever it wrote, the result is a valid position of the ring or an
// error, after at most nine reads of the ring (each of at most three
// passes over it): a driver that forges marks only misplaces its own
// device.
func PackedUsedPosition(mem *Memory, l Layout) (pos uint16, src PositionSource, err error) {
	r, err := newPackedRing(mem, l)
	if err != nil {
		return 0, NoPosition, err
	}
	err = Guard(func() error {
		pos, src, err = r.readUsedPosition()
		return err
	})
	return pos, src, err
}

// PackedResumePosition is the position a device taking over the packed
// ring at l should resume from when the front-end says base (a
// QueueState position with no chain in flight): the used position the
// ring records (PackedUsedPosition) where it is exact; an OldestAvailable
// one only when base's own descriptor is not available in base's lap (a
// base the driver has moved past, or one from a lost hand-over: a base
// that is right has its descriptor available unless the ring is empty,
// and an empty ring holds used descriptors, so it never gives
// OldestAvailable); base itself otherwise. It reports where the position
// came from (NoPosition: base). Errors are PackedUsedPosition's, or
// ErrInvalidState for a base outside the ring; the caller then has only
// base.
func PackedResumePosition(mem *Memory, l Layout, base uint16) (pos uint16, src PositionSource, err error) {
	r, err := newPackedRing(mem, l)
	if err != nil {
		return base, NoPosition, err
	}
	if idx, _ := PackedPosition(base); idx >= l.Size {
		return base, NoPosition, fmt.Errorf("%w: packed position %#x on a ring of %d", ErrInvalidState, base, l.Size)
	}
	err = Guard(func() error {
		pos, src, err = r.readUsedPosition()
		if err != nil || src != OldestAvailable {
			return err
		}
		idx, wrap := PackedPosition(base)
		_, flags := r.loadWord(idx)
		if avail := (flags&DescFAvail != 0) == wrap && (flags&DescFUsed != 0) != wrap; avail {
			pos, src = base, NoPosition
		}
		return nil
	})
	if err != nil || src == NoPosition {
		return base, NoPosition, err
	}
	return pos, src, nil
}

// packedReadTries bounds the re-reads of readUsedPosition.
const packedReadTries = 8

// readUsedPosition is usedPosition until two reads in a row agree: the
// driver may be writing the ring meanwhile (reusing used slots for new
// buffers, as far as the used position at most), and a read it overtook
// could end the run early.
func (r *packedRing) readUsedPosition() (uint16, PositionSource, error) {
	pos, src, err := r.usedPosition()
	for range packedReadTries {
		p2, s2, err2 := r.usedPosition()
		if p2 == pos && s2 == src && (err2 == nil) == (err == nil) {
			return pos, src, err
		}
		pos, src, err = p2, s2, err2
	}
	return 0, NoPosition, fmt.Errorf("%w: the ring changed under %d reads", ErrUsedRun, packedReadTries+1)
}

// usedPosition reads the position once (PackedUsedPosition).
func (r *packedRing) usedPosition() (uint16, PositionSource, error) {
	size := r.size
	// used reports whether descriptor i is a used descriptor of the lap
	// with wrap bits bits (AVAIL and USED both equal to them), and its
	// mark's count (0 without the mark). Rule 2's order: the word first,
	// then the address.
	used := func(i uint16, bits uint16) (isUsed bool, n uint16) {
		_, flags := r.loadWord(i)
		if flags&availUsed != bits {
			return false, 0
		}
		return true, markCount(r.descs[i].addr)
	}
	// One pass: the first marked used descriptor, of either lap, a
	// marked one still flagged available (a cut batch), and what the
	// ring holds otherwise.
	start, bits := uint16(0), uint16(0)
	found, usedLooking, chained := false, false, false
	cut, cutPos := 0, uint16(0)
	for i := uint16(0); i < size; i++ {
		_, flags := r.loadWord(i)
		switch b := flags & availUsed; b {
		case 0, availUsed:
			usedLooking = true
			if !found && markCount(r.descs[i].addr) != 0 {
				start, bits, found = i, b, true
			}
		default:
			chained = chained || flags&DescFNext != 0
			if markCount(r.descs[i].addr) != 0 {
				cut++
				cutPos = PackedIndex(i, flags&DescFAvail != 0)
			}
		}
	}
	switch {
	case cut > 1:
		return 0, NoPosition, fmt.Errorf("%w: %d descriptors flagged available hold the used mark (one batch at most is cut short)", ErrUsedRun, cut)
	case cut == 1:
		return cutPos, CutBatch, nil
	case !found && (usedLooking || chained):
		return 0, NoPosition, nil
	case !found:
		return r.fullPosition()
	}
	pos, walked := start, uint32(0)
	for {
		isUsed, n := used(pos, bits)
		if !isUsed {
			return PackedIndex(pos, bits != 0), UsedRun, nil
		}
		if n == 0 {
			return 0, NoPosition, fmt.Errorf("%w: descriptor %d (wrap %v) is a used descriptor without a count", ErrUsedRun, pos, bits != 0)
		}
		if n > size {
			return 0, NoPosition, fmt.Errorf("%w: descriptor %d (wrap %v) records %d descriptors, the ring has %d", ErrUsedRun, pos, bits != 0, n, size)
		}
		if walked += uint32(n); walked > uint32(size) {
			return 0, NoPosition, fmt.Errorf("%w: the run from descriptor %d is longer than the ring (%d descriptors)", ErrUsedRun, start, size)
		}
		next := uint32(pos) + uint32(n)
		if next >= uint32(size) {
			next -= uint32(size)
			bits ^= availUsed
		}
		pos = uint16(next)
	}
}

// markCount is the count an Element Address holding the used mark
// records, 0 for any other address.
func markCount(addr uint64) uint16 {
	if addr&usedMarkMask != usedMark {
		return 0
	}
	return uint16(addr)
}

// fullPosition is the used position of a ring every descriptor of which
// is available, none chained to the next: the driver made the whole ring
// available (a receive ring it keeps full), which overwrote every used
// descriptor, so the used position is where the oldest available
// descriptor is. The descriptors from it to the ring's end are of the
// device's lap, those before it of the next (their AVAIL bit is the other
// one): it is the first descriptor whose AVAIL bit is the last
// descriptor's, in the lap of that bit.
//
// A chain of several descriptors leaves its others (the used descriptor
// overwrites only its first) looking available until the driver reuses
// their slots, and one left at the boundary would be taken for the oldest
// available descriptor. So the ring must hold what a full ring of
// one-descriptor buffers holds: no descriptor chained to the next (a
// driver that builds chains shows it in the ones it made available), and
// size distinct buffer ids (the buffers outstanding; a descriptor left
// over from a used chain carries the id of a buffer the driver got back,
// which a driver that hands the last freed id out first, as Linux does,
// has reused). Otherwise there is no position. What these checks cannot
// see is a left-over slot whose id the driver has not reused (a driver
// that hands ids out first-in first-out, or changed from chains to single
// descriptors): PackedResumePosition therefore takes this position only
// for a base that cannot be right.
func (r *packedRing) fullPosition() (uint16, PositionSource, error) {
	seen := make([]uint64, (int(r.size)+63)/64)
	for i := uint16(0); i < r.size; i++ {
		id, _ := r.loadWord(i)
		if id >= r.size || seen[id/64]&(1<<(id%64)) != 0 {
			return 0, NoPosition, nil
		}
		seen[id/64] |= 1 << (id % 64)
	}
	_, last := r.loadWord(r.size - 1)
	lap := last & DescFAvail
	for i := uint16(0); i < r.size; i++ {
		if _, flags := r.loadWord(i); flags&DescFAvail == lap {
			return PackedIndex(i, lap != 0), OldestAvailable, nil
		}
	}
	return 0, NoPosition, nil // the last descriptor changed under the read
}
