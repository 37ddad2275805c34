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
