package vring

import (
	"errors"
	"fmt"
)

// usedMark is what a DeviceQueue writes into the Element Address of every
// used descriptor of a packed ring, which is unused in a used descriptor
// (virtio 1.2 §2.8.5): the high 32 bits are this tag ("vdpa"), far above
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

// PackedUsedPosition reads the descriptor ring of a packed virtqueue laid
// out at l and returns the device's used position as the ring itself
// records it: the position (ring index and wrap counter, as
// QueueState.NextUsed encodes it) just after the used descriptors the
// last device of this package wrote there, or, where the driver has
// reused all of their slots, where its oldest available descriptor is. ok
// is false when the ring records no position (a ring no DeviceQueue of
// this package has used; one the driver re-initialized, which it zeroes,
// §2.8.13: "The descriptor ring is zero-initialized", and has not filled;
// one whose used descriptors another implementation wrote).
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
// where the used position stands: the position the new device resumes
// from (NextAvail = NextUsed = that position: chains the old device
// popped and never used are popped again, as QEMU does with a split
// ring's used index).
//
// The walk starts at the first used descriptor with the mark from l's
// first descriptor on and follows the recorded counts, each used
// descriptor in the lap its position is in (its AVAIL and USED bits equal
// to the wrap counter there), until a position holds no used descriptor
// of that lap. A driver that keeps the ring full (a receive ring) reuses
// every used slot, so no used descriptor is left: a ring whose every
// descriptor is available and none chained gives the position of the
// oldest available one, where the device's lap begins (see
// fullPosition; with chains, a leftover descriptor of a used chain could
// be taken for it, so such a ring gives ok false). A ring read while the
// driver writes it is read again until two reads agree.
//
// A ring whose run does not add up (a count of 0 or more than the ring, a
// run longer than the ring, or a used descriptor of the lap without the
// mark where the run ends: written by another implementation), or that
// keeps changing under the reads, gives ErrUsedRun. The driver can write
// anything into the ring; whatever it wrote, the result is a valid
// position of the ring or an error, after at most nine passes over the
// ring: a driver that forges marks only misplaces its own device.
func PackedUsedPosition(mem *Memory, l Layout) (pos uint16, ok bool, err error) {
	r, err := newPackedRing(mem, l)
	if err != nil {
		return 0, false, err
	}
	err = Guard(func() error {
		// The driver may be writing the ring meanwhile (reusing used
		// slots for new buffers, as far as the used position at most):
		// a read it overtook could end the run early, so the answer is
		// the one two reads in a row agree on.
		pos, ok, err = r.usedPosition()
		for range packedReadTries {
			p2, ok2, err2 := r.usedPosition()
			if p2 == pos && ok2 == ok && (err2 == nil) == (err == nil) {
				return err
			}
			pos, ok, err = p2, ok2, err2
		}
		return fmt.Errorf("%w: the ring changed under %d reads", ErrUsedRun, packedReadTries+1)
	})
	return pos, ok, err
}

// packedReadTries bounds PackedUsedPosition's re-reads.
const packedReadTries = 8

// usedPosition is PackedUsedPosition on a mapped ring.
func (r *packedRing) usedPosition() (uint16, bool, error) {
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
		a := r.descs[i].addr
		if a&usedMarkMask != usedMark {
			return true, 0
		}
		return true, uint16(a)
	}
	// One pass: the first marked used descriptor, of either lap, and
	// what the ring holds otherwise.
	start, bits := uint16(0), uint16(0)
	found, usedLooking, chained := false, false, false
	for i := uint16(0); i < size; i++ {
		_, flags := r.loadWord(i)
		switch b := flags & availUsed; b {
		case 0, availUsed:
			usedLooking = true
			if _, n := used(i, b); n != 0 && !found {
				start, bits, found = i, b, true
			}
		default:
			chained = chained || flags&DescFNext != 0
		}
	}
	if !found {
		if usedLooking || chained {
			return 0, false, nil
		}
		return r.fullPosition()
	}
	pos, walked := start, uint32(0)
	for {
		isUsed, n := used(pos, bits)
		if !isUsed {
			return PackedIndex(pos, bits != 0), true, nil
		}
		if n == 0 {
			return 0, false, fmt.Errorf("%w: descriptor %d (wrap %v) is a used descriptor without a count", ErrUsedRun, pos, bits != 0)
		}
		if n > size {
			return 0, false, fmt.Errorf("%w: descriptor %d (wrap %v) records %d descriptors, the ring has %d", ErrUsedRun, pos, bits != 0, n, size)
		}
		if walked += uint32(n); walked > uint32(size) {
			return 0, false, fmt.Errorf("%w: the run from descriptor %d is longer than the ring (%d descriptors)", ErrUsedRun, start, size)
		}
		next := uint32(pos) + uint32(n)
		if next >= uint32(size) {
			next -= uint32(size)
			bits ^= availUsed
		}
		pos = uint16(next)
	}
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
// which it hands out again first). Otherwise ok is false. What these
// checks cannot see is a driver that changed from chains to single
// descriptors just before and has not reused a left-over chain's id yet.
func (r *packedRing) fullPosition() (uint16, bool, error) {
	seen := make([]uint64, (int(r.size)+63)/64)
	for i := uint16(0); i < r.size; i++ {
		id, _ := r.loadWord(i)
		if id >= r.size || seen[id/64]&(1<<(id%64)) != 0 {
			return 0, false, nil
		}
		seen[id/64] |= 1 << (id % 64)
	}
	_, last := r.loadWord(r.size - 1)
	lap := last & DescFAvail
	for i := uint16(0); i < r.size; i++ {
		if _, flags := r.loadWord(i); flags&DescFAvail == lap {
			return PackedIndex(i, lap != 0), true, nil
		}
	}
	return 0, false, nil // the last descriptor changed under the read
}
