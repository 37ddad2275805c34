package mdevtest

import (
	"fmt"
	"sync/atomic"
	"unsafe"
)

// word32 returns the 4-byte-aligned 32-bit word at b[off:off+4] for atomic
// access. The slice expression bounds-checks; alignment is checked on the
// host address (ring fields the spec aligns are 4-aligned in a page-aligned
// mapping).
func word32(b []byte, off int) (*uint32, error) {
	p := &b[off:][:4][0]
	if uintptr(unsafe.Pointer(p))%4 != 0 {
		return nil, fmt.Errorf("mdevtest: word at offset %d misaligned", off)
	}
	return (*uint32)(unsafe.Pointer(p)), nil
}

// load32 and store32 are the only shared-memory accesses that order the
// guest driver against the device: the driver stores avail.idx (release)
// after writing descriptors and ring entries, and loads used.idx (acquire)
// before reading used entries. sync/atomic operations are sequentially
// consistent, which gives both orders.
func load32(p *uint32) uint32     { return atomic.LoadUint32(p) }
func store32(p *uint32, v uint32) { atomic.StoreUint32(p, v) }
