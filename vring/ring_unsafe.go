package vring

import (
	"fmt"
	"unsafe"
)

// This file is the only place where vring turns bytes into typed pointers.
// Every pointer is taken from a re-sliced, bounds-checked sub-slice
// (b[off:off+n:off+n]) of a ring area that was itself validated to lie inside
// one guest memory region, and its host alignment is checked, so the atomic
// operations that use it can neither fault nor touch a byte outside the field.

// hostAddrOf is the address of mem's first byte in this process.
func hostAddrOf(mem []byte) HostAddr {
	if len(mem) == 0 {
		return 0
	}
	return HostAddr(uintptr(unsafe.Pointer(unsafe.SliceData(mem))))
}

// ptr16 returns a pointer to the 2-aligned 16-bit field at b[off:off+2].
func ptr16(b []byte, off int) (*uint16, error) {
	if off < 0 || off > len(b)-2 {
		return nil, fmt.Errorf("vring: internal: 16-bit field at %d outside area of %d bytes", off, len(b))
	}
	f := b[off : off+2 : off+2]
	p := unsafe.Pointer(&f[0])
	if uintptr(p)%2 != 0 {
		return nil, fmt.Errorf("%w: 16-bit ring field at host address %#x", ErrMisaligned, uintptr(p))
	}
	return (*uint16)(p), nil
}

// ptr32 returns a pointer to the 4-aligned 32-bit word at b[off:off+4].
func ptr32(b []byte, off int) (*uint32, error) {
	if off < 0 || off > len(b)-4 {
		return nil, fmt.Errorf("vring: internal: 32-bit word at %d outside area of %d bytes", off, len(b))
	}
	f := b[off : off+4 : off+4]
	p := unsafe.Pointer(&f[0])
	if uintptr(p)%4 != 0 {
		return nil, fmt.Errorf("%w: 32-bit ring word at host address %#x", ErrMisaligned, uintptr(p))
	}
	return (*uint32)(p), nil
}

// hostMisalign returns the host address of b[0] modulo m.
func hostMisalign(b []byte, m uintptr) uintptr {
	return uintptr(unsafe.Pointer(unsafe.SliceData(b))) % m
}

// descEntry is a split-ring descriptor as it lies in guest memory (virtio
// 1.x §2.7.5: le64 addr, le32 len, le16 flags, le16 next; the package
// assumes a little-endian host, see the package doc).
type descEntry struct {
	addr  uint64
	len   uint32
	flags uint16
	next  uint16
}

// usedEntry is a used-ring element (§2.7.8: le32 id, le32 len).
type usedEntry struct {
	id  uint32
	len uint32
}

// ringViews returns typed views of a validated ring's n descriptors, n
// available-ring entries (avail[4:4+2n]) and n used-ring elements
// (used[4:4+8n]). The element types hold no pointers and are no more
// aligned than the areas (descriptor table 16, available ring 2, used ring
// 4, checked by newRing), and each view is taken from a bounds-checked
// sub-slice of exactly its size, so it covers only bytes of its area.
func ringViews(desc, avail, used []byte, n int) ([]descEntry, []uint16, []usedEntry, error) {
	if n <= 0 || len(desc) < 16*n || len(avail) < 4+2*n || len(used) < 4+8*n {
		return nil, nil, nil, fmt.Errorf("vring: internal: ring areas %d/%d/%d bytes too small for %d entries", len(desc), len(avail), len(used), n)
	}
	if hostMisalign(desc, 16) != 0 || hostMisalign(avail, 2) != 0 || hostMisalign(used, 4) != 0 {
		return nil, nil, nil, fmt.Errorf("%w: ring areas at host addresses %#x/%#x/%#x", ErrMisaligned,
			hostAddrOf(desc), hostAddrOf(avail), hostAddrOf(used))
	}
	d := desc[: 16*n : 16*n]
	a := avail[4 : 4+2*n : 4+2*n]
	u := used[4 : 4+8*n : 4+8*n]
	return unsafe.Slice((*descEntry)(unsafe.Pointer(&d[0])), n),
		unsafe.Slice((*uint16)(unsafe.Pointer(&a[0])), n),
		unsafe.Slice((*usedEntry)(unsafe.Pointer(&u[0])), n), nil
}

// bufAt returns mem[off:off+n:off+n] for a range the caller has checked
// (off < len(mem), n <= len(mem)-off, n > 0), without the re-check and the
// zero-length pointer masking of the slice expression. The result lies
// inside mem.
func bufAt(mem []byte, off uint64, n uint32) []byte {
	return unsafe.Slice(&mem[off], n)
}
