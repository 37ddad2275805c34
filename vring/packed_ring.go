package vring

import (
	"fmt"

	"github.com/vdpakit/vdpakit/internal/guestatomic"
	"github.com/vdpakit/vdpakit/virtio"
)

// Memory ordering protocol of a packed ring
//
// A packed ring is one descriptor ring both agents write, plus two event
// suppression structures, each written by one agent only (virtio 1.2
// §2.8.1, §2.8.10, §2.8.21). What publishes a descriptor, in either
// direction, is its flags word: the little-endian 32-bit word at offset
// 12 of the 16-byte descriptor, id (offset 12) | flags (offset 14) << 16.
// It is 4-aligned (the ring is 16-aligned, checked host-side too), so it
// is accessed with 32-bit atomic operations: no 16-bit atomics are
// needed.
//
//  1. Driver publishes: write addr, len, id and flags of every descriptor
//     of the chain but the head's flags word (plain stores), then store
//     the head's id|flags word with storeRelease32 (release: the rest
//     of the chain becomes visible no later than the head). A batch of
//     chains (DriverQueue.Publish) stores its later heads first and its
//     first head last, so one release publishes the batch.
//  2. Device consumes: load the head's word with a 32-bit atomic load
//     (acquire); only when its AVAIL/USED bits show it available for the
//     device's avail wrap counter does it read addr and len (plain
//     loads) and the chain's other descriptors (whose words it also loads
//     atomically, to check their AVAIL/USED bits).
//  3. Device completes: write addr (the used mark: how far the used
//     position moved, see usedMark; the field is unused in a used
//     descriptor) and len of the used descriptor (plain stores), then
//     store its id|flags word atomically (release). A batch
//     (PushBatch) stores the first used descriptor's word last (the
//     "multi-buffer request" rule of §2.8.9: the driver never sees part of
//     a batch).
//  4. Driver reclaims: load the word at its next used position atomically
//     (acquire), then read len.
//  5. Notification suppression: each event suppression structure is one
//     4-aligned 32-bit word, off_wrap | flags << 16, stored whole with
//     a 32-bit atomic store by its writer and loaded with a 32-bit
//     atomic load by the other side. As in the split ring (ring.go rule
//     5), the event word stores are sequentially consistent (amd64 XCHG,
//     arm64 STLR), the publications of rules 1 and 3 are releases that
//     NeedsKick and NeedsInterrupt follow with a full barrier
//     (storeLoadFence) before they load the other side's event word, and
//     every load is an acquire load, so of two agents each doing "store
//     mine, load theirs" (publish a descriptor then read the other's event
//     structure; enable events then re-check the descriptor) at least one
//     sees the other's store.
//
// A descriptor changes hands with its flags word: the driver writes a
// slot only after loading a used word there (or before it ever made the
// slot available), the device writes one only after loading an available
// word there, so the plain field accesses never race with each other.

// packedDesc is a packed-ring descriptor as it lies in guest memory
// (virtio 1.2 §2.8.13: le64 addr, le32 len, le16 id, le16 flags).
type packedDesc struct {
	addr  uint64
	len   uint32
	id    uint16
	flags uint16
}

const availUsed = DescFAvail | DescFUsed

// packedRing holds a validated packed ring's areas.
type packedRing struct {
	size     uint16
	desc     []byte       // 16*size bytes
	descs    []packedDesc // typed view of desc
	drvEvent *uint32      // driver event suppression: off_wrap | flags<<16, written by the driver
	devEvent *uint32      // device event suppression, written by the device
}

// newPackedRing validates l as a packed layout against mem and builds the
// ring. Each area must lie in one region and be host-aligned like its
// guest alignment.
func newPackedRing(mem *Memory, l Layout) (packedRing, error) {
	var r packedRing
	if mem == nil {
		return r, fmt.Errorf("%w: nil memory", ErrInvalidRegion)
	}
	if err := l.validatePacked(); err != nil {
		return r, fmt.Errorf("vring: layout: %w", err)
	}
	d, a, u := PackedSizes(l.Size)
	var hint uint32
	var err error
	if r.desc, err = mem.slice(l.Desc, d, &hint); err != nil {
		return r, fmt.Errorf("vring: descriptor ring %v+%#x: %w", l.Desc, d, err)
	}
	drv, err := mem.slice(l.Avail, a, &hint)
	if err != nil {
		return r, fmt.Errorf("vring: driver event suppression area %v+%#x: %w", l.Avail, a, err)
	}
	dev, err := mem.slice(l.Used, u, &hint)
	if err != nil {
		return r, fmt.Errorf("vring: device event suppression area %v+%#x: %w", l.Used, u, err)
	}
	if m := hostMisalign(r.desc, PackedDescAlign); m != 0 {
		return r, fmt.Errorf("%w: descriptor ring is at host address ≡ %d mod %d", ErrMisaligned, m, PackedDescAlign)
	}
	if r.drvEvent, err = ptr32(drv, 0); err != nil {
		return r, err
	}
	if r.devEvent, err = ptr32(dev, 0); err != nil {
		return r, err
	}
	if r.descs, err = packedDescs(r.desc, int(l.Size)); err != nil {
		return r, err
	}
	r.size = l.Size
	return r, nil
}

// word returns a pointer to descriptor i's id|flags word. i < size,
// checked by the caller (the index expression re-checks).
func (r *packedRing) word(i uint16) *uint32 { return descWord(&r.descs[i]) }

// loadWord loads descriptor i's id|flags word (acquire): id, flags.
func (r *packedRing) loadWord(i uint16) (id, flags uint16) {
	w := guestatomic.Load32(r.word(i))
	return uint16(w), uint16(w >> 16)
}

// storeWord stores descriptor i's id|flags word (release only: rules 1
// and 3; the notification decisions fence, rule 5).
func (r *packedRing) storeWord(i, id, flags uint16) {
	storeRelease32(r.word(i), uint32(id)|uint32(flags)<<16)
}

// setWord writes descriptor i's id|flags word with a plain store: for
// the words of a batch that a later storeWord (the batch's first
// descriptor, published last) releases. The other side reads them only
// after it loaded that word, so the plain store never races with its
// atomic load.
func (r *packedRing) setWord(i, id, flags uint16) {
	*r.word(i) = uint32(id) | uint32(flags)<<16
}

// eventWord builds an event suppression word.
func eventWord(offWrap, flags uint16) uint32 { return uint32(offWrap) | uint32(flags)<<16 }

// packedNeedEvent is vring_need_event for a packed ring: the other side
// asked (off_wrap, RING_EVENT_FLAGS_DESC) to be notified when the
// descriptor at that offset and wrap counter is made available or used;
// newIdx (with wrap counter wrap) is the position after the n descriptors
// just made available/used. Offsets of the other lap are moved one ring
// size back, as Linux's virtqueue_kick_prepare_packed does, so that the
// uint16 arithmetic of vring_need_event sees old <= event < new.
func packedNeedEvent(offWrap uint16, size, newIdx uint16, wrap bool, n uint32) bool {
	if n >= uint32(size) {
		return true // a whole lap or more since the last check: every offset was passed
	}
	event, ewrap := PackedPosition(offWrap)
	if ewrap != wrap {
		event -= size
	}
	return needEvent(event, newIdx, newIdx-uint16(n))
}

// eventWanted decides a notification from the other side's event
// suppression word w: DISABLE never, DESC (with EVENT_IDX) by offset,
// ENABLE (and DESC without EVENT_IDX, and the reserved 3) always.
func eventWanted(w uint32, eventIdx bool, size, newIdx uint16, wrap bool, n uint32) bool {
	switch uint16(w>>16) & 3 {
	case EventFlagsDisable:
		return false
	case EventFlagsDesc:
		if eventIdx {
			return packedNeedEvent(uint16(w), size, newIdx, wrap, n)
		}
	}
	return true
}

// isPacked reports whether f selects the packed format.
func isPacked(f virtio.Features) bool { return f.Has(virtio.FRingPacked) }
