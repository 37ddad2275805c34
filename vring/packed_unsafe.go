package vring

import (
	"fmt"
	"unsafe"
)

// packedDescs returns the typed view of a validated packed descriptor
// ring's n descriptors. packedDesc holds no pointers and is no more
// aligned than the ring (16, checked by newPackedRing), and the view is
// taken from a bounds-checked sub-slice of exactly its size.
func packedDescs(desc []byte, n int) ([]packedDesc, error) {
	if n <= 0 || len(desc) < 16*n {
		return nil, fmt.Errorf("vring: internal: descriptor ring of %d bytes too small for %d descriptors", len(desc), n)
	}
	if hostMisalign(desc, 16) != 0 {
		return nil, fmt.Errorf("%w: descriptor ring at host address %#x", ErrMisaligned, hostAddrOf(desc))
	}
	d := desc[: 16*n : 16*n]
	return unsafe.Slice((*packedDesc)(unsafe.Pointer(&d[0])), n), nil
}

// descWord returns a pointer to a packed descriptor's id|flags word: the
// 32-bit word at offset 12 (id, then flags), 4-aligned since descriptors
// are 16-aligned. It is what the atomic loads and stores of the packed
// ring's protocol (packed_ring.go) access.
func descWord(d *packedDesc) *uint32 {
	return (*uint32)(unsafe.Pointer(&d.id))
}
