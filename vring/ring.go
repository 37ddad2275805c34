package vring

import (
	"encoding/binary"
	"fmt"

	"github.com/vdpakit/vdpakit/internal/guestatomic"
	"github.com/vdpakit/vdpakit/virtio"
)

// Memory ordering protocol
//
// A split ring is shared by two agents: the driver writes the descriptor
// table and the available ring, the device writes the used ring. The other
// agent may be another goroutine, another process or the kernel, so every
// index and event field crossing between them is accessed atomically, and the
// rules are those of virtio 1.2 §2.7.13 and §2.7.7-2.7.10:
//
//  1. Driver publishes: write descriptors and the avail ring entry (plain
//     stores), then store avail.idx with an atomic release store
//     (storeRelease32: the entries become visible no later than the index).
//  2. Device consumes: load avail.idx atomically (acquire), then read the
//     entries it covers and the descriptors they name (plain loads).
//  3. Device completes: write used ring entries (plain stores), then store
//     used.idx with an atomic release store.
//  4. Driver reclaims: load used.idx atomically (acquire), then read entries.
//  5. Notification suppression needs store->load ordering: the device stores
//     used.idx and then loads avail.flags/used_event; the driver stores
//     avail.idx and then loads used.flags/avail_event; a side re-enabling
//     notifications stores its flag/event field and then re-loads the other
//     side's index. The index stores of rules 1 and 3 are releases only, so
//     NeedsInterrupt and NeedsKick run a full barrier (storeLoadFence)
//     before the load that decides a "no" (a first load without it that
//     says "yes" is at worst stale, which makes a spurious notification:
//     drivers must handle those, §2.7.7, and a spurious kick costs a device
//     a look at its ring); the flag and event stores of a side re-enabling
//     notifications are sequentially consistent (store16: amd64 XCHG, arm64
//     STLR, which a later LDAR is ordered after). So of two agents each
//     doing "store mine; load theirs", at least one sees the other's store:
//     no lost notification. The barrier sits where the load is, not in the
//     index store, as in Linux's virtio_ring and vhost: a side that publishes
//     per chain but decides on a notification per burst pays it per burst,
//     and two agents that both poll (no notification decisions at all) pay
//     it never.
//
// sync/atomic has no 16-bit operations, so the fields are accessed as follows
// (offsets are into the area; areas are validated host-aligned to their
// virtio alignment, and each lies inside one region's mapping):
//
//   - avail.idx (offset 2, area 2-aligned): the 4-aligned 32-bit word that
//     contains it always lies inside the available ring: it is [flags, idx]
//     when the ring is 4-aligned and [idx, ring[0]] when it is only
//     2-aligned (ring[0] exists since size >= 1). Both halves are written
//     only by the driver, so the driver stores the whole word with
//     storeRelease32 (the other half re-read from its own last write)
//     and the device loads it with a 32-bit atomic load and extracts idx.
//     When the word is [idx, ring[0]], ring[0] is accessed only through
//     the word, on both sides (availEntry, setAvailEntry): a plain 16-bit
//     access to it would race, under the Go memory model, with the other
//     side's 32-bit atomic access to the same bytes.
//   - used.flags and used.idx (offsets 0 and 2, area 4-aligned) form one word
//     written only by the device, which keeps both in shadow copies and
//     publishes used.idx by storing the word with storeRelease32; the
//     driver loads the word with a 32-bit atomic load. Changing only the flags
//     (notification enable/disable) is a 16-bit store16 of used.flags, so
//     used.idx in memory is never rewritten from a shadow outside publish.
//   - avail.flags, used_event (end of the available ring) and avail_event
//     (the last 2 bytes of the used ring): the containing 4-aligned word may
//     extend past the ring, so a 32-bit access there could read or write
//     bytes outside the ring. These fields use true 16-bit atomics,
//     load16/store16, implemented in assembly on amd64 (MOVW / XCHGW) and
//     arm64 (LDARH / STLRH) with the same ordering as sync/atomic's 32-bit
//     operations on those architectures (atomic16_*.s).
//
// The Go race detector does not check this protocol on guest memory as
// devices use it: it sees only accesses to the Go heap, stacks and globals,
// never those to mmap'd memory (memfd regions, peer mappings), racy or not.
// On a region over a Go heap slice (NewRegion) it does: there the 32-bit
// atomic operations on the index words are what orders the plain
// descriptor, ring entry and buffer accesses for it (a race build
// publishes the indexes with guestatomic.Store32, which tells the detector
// about the release, not storeRelease32's assembly, for this reason), and
// the tests run the cross-goroutine traffic over such a region too
// (TestCrossGoroutine's heap variants, TestRaceDetectorSeesHeapRings). The
// 16-bit assembly accesses (load16, store16) are invisible to it everywhere;
// they carry notification state only, never data another access depends on.

// ring holds a validated split ring's three areas and pointers to its shared
// fields.
type ring struct {
	size, mask uint16
	desc       []byte // 16*size bytes
	avail      []byte // 4+2*size bytes, 6+2*size with EVENT_IDX
	used       []byte // 4+8*size bytes, 6+8*size with EVENT_IDX

	// Typed views of the same memory (ringViews), len size each: the hot
	// paths index them with idx&mask or a checked head, one bounds check.
	descs     []descEntry
	availRing []uint16    // avail.ring[]
	usedRing  []usedEntry // used.ring[]

	availIdxWord  *uint32 // 4-aligned word containing avail.idx
	availIdxShift uint32  // bit position of avail.idx in that word
	usedWord      *uint32 // used.flags | used.idx<<16
	usedFlags     *uint16 // used.flags alone (the low half of usedWord)
	availFlags    *uint16
	// The event fields, nil without EVENT_IDX (the rings then end before
	// them, RingSizes).
	usedEvent  *uint16 // avail ring: used_event
	availEvent *uint16 // used ring: avail_event
}

// newRing validates l, sized for the features f, against mem and builds
// the ring. Each area must lie in a single region and be host-aligned like
// its guest alignment.
func newRing(mem *Memory, l Layout, f virtio.Features) (ring, error) {
	var r ring
	if mem == nil {
		return r, fmt.Errorf("%w: nil memory", ErrInvalidRegion)
	}
	if err := l.ValidateFor(f); err != nil {
		return r, fmt.Errorf("vring: layout: %w", err)
	}
	d, a, u := RingSizes(l.Size, f)
	var hint uint32
	var err error
	if r.desc, err = mem.slice(l.Desc, d, &hint); err != nil {
		return r, fmt.Errorf("vring: descriptor table %v+%#x: %w", l.Desc, d, err)
	}
	if r.avail, err = mem.slice(l.Avail, a, &hint); err != nil {
		return r, fmt.Errorf("vring: available ring %v+%#x: %w", l.Avail, a, err)
	}
	if r.used, err = mem.slice(l.Used, u, &hint); err != nil {
		return r, fmt.Errorf("vring: used ring %v+%#x: %w", l.Used, u, err)
	}
	if m := hostMisalign(r.desc, DescAlign); m != 0 {
		return r, fmt.Errorf("%w: descriptor table is at host address ≡ %d mod %d", ErrMisaligned, m, DescAlign)
	}
	r.size, r.mask = l.Size, l.Size-1
	n := int(l.Size)
	if r.descs, r.availRing, r.usedRing, err = ringViews(r.desc, r.avail, r.used, n); err != nil {
		return r, err
	}
	idxWordOff := 0
	r.availIdxShift = 16
	if hostMisalign(r.avail, 4) == 2 {
		idxWordOff, r.availIdxShift = 2, 0
	}
	if r.availIdxWord, err = ptr32(r.avail, idxWordOff); err != nil {
		return r, err
	}
	if r.availFlags, err = ptr16(r.avail, 0); err != nil {
		return r, err
	}
	if r.usedWord, err = ptr32(r.used, 0); err != nil {
		return r, err
	}
	if r.usedFlags, err = ptr16(r.used, 0); err != nil {
		return r, err
	}
	if f.Has(virtio.FEventIdx) {
		if r.usedEvent, err = ptr16(r.avail, 4+2*n); err != nil {
			return r, err
		}
		if r.availEvent, err = ptr16(r.used, 4+8*n); err != nil {
			return r, err
		}
	}
	return r, nil
}

// availEntry reads avail.ring[i&mask]: through the atomic avail.idx word
// when that word holds ring[0] (a 2-aligned ring), plainly otherwise.
func (r *ring) availEntry(i uint16) uint16 {
	slot := i & r.mask
	if slot == 0 && r.availIdxShift == 0 {
		return uint16(guestatomic.Load32(r.availIdxWord) >> 16)
	}
	return r.availRing[slot]
}

// setAvailEntry is driver-only: it writes avail.ring[i&mask] as availEntry
// reads it, keeping avail.idx (the other half of the word, driver-owned) as
// it is in memory.
func (r *ring) setAvailEntry(i, head uint16) {
	slot := i & r.mask
	if slot == 0 && r.availIdxShift == 0 {
		w := guestatomic.Load32(r.availIdxWord)
		guestatomic.Store32(r.availIdxWord, w&0xffff|uint32(head)<<16)
		return
	}
	// Stored only when it changes. With descriptors used in order (1-descriptor
	// chains, or IN_ORDER) a slot gets the same head every lap; the device has
	// read the entry's line since the last store, and a store would take the
	// line back from its cache, so that its next read of the entry misses. A
	// load of the line both caches hold does not. The entry is the driver's
	// to write until avail.idx covers it (the device reads it only after
	// that index's acquire load), so an unchanged entry needs no store.
	if r.availRing[slot] != head {
		r.availRing[slot] = head
	}
}

func (r *ring) loadAvailIdx() uint16 {
	return uint16(guestatomic.Load32(r.availIdxWord) >> r.availIdxShift)
}

// storeAvailIdx is driver-only: the other half of the word is driver-owned.
// The store is a release (rule 1); NeedsKick fences before it loads
// (rule 5).
func (r *ring) storeAvailIdx(v uint16) {
	w := guestatomic.Load32(r.availIdxWord)
	w = w&^(0xffff<<r.availIdxShift) | uint32(v)<<r.availIdxShift
	storeRelease32(r.availIdxWord, w)
}

func (r *ring) loadAvailFlags() uint16 {
	if r.availIdxShift == 16 {
		return uint16(guestatomic.Load32(r.availIdxWord))
	}
	return load16(r.availFlags)
}

// storeUsedWord is device-only. The store is a release (rule 3);
// NeedsInterrupt fences before it loads (rule 5).
func (r *ring) storeUsedWord(flags, idx uint16) {
	storeRelease32(r.usedWord, uint32(flags)|uint32(idx)<<16)
}

func (r *ring) loadUsedWord() (flags, idx uint16) {
	w := guestatomic.Load32(r.usedWord)
	return uint16(w), uint16(w >> 16)
}

// desc reads descriptor i of table t (i < len(t)/16, checked by the caller;
// the slice expression re-checks).
func readDesc(t []byte, i uint16) (addr uint64, length uint32, flags, next uint16) {
	d := t[int(i)*16 : int(i)*16+16 : int(i)*16+16]
	return binary.LittleEndian.Uint64(d[0:8]), binary.LittleEndian.Uint32(d[8:12]),
		binary.LittleEndian.Uint16(d[12:14]), binary.LittleEndian.Uint16(d[14:16])
}

func writeDesc(t []byte, i uint16, addr uint64, length uint32, flags, next uint16) {
	d := t[int(i)*16 : int(i)*16+16 : int(i)*16+16]
	binary.LittleEndian.PutUint64(d[0:8], addr)
	binary.LittleEndian.PutUint32(d[8:12], length)
	binary.LittleEndian.PutUint16(d[12:14], flags)
	binary.LittleEndian.PutUint16(d[14:16], next)
}

// need_event: vring_need_event from the virtio spec (§2.7.10): the other side
// asked to be notified when the index moves past event; old..new is the
// range just published.
func needEvent(event, newIdx, old uint16) bool {
	return newIdx-event-1 < newIdx-old
}
