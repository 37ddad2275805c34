package vfiouser

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// mmapFixedAnon maps fresh private anonymous memory over b's pages.
//
// unix.MmapPtr issues mmap or, on 32-bit Linux (which has no SYS_MMAP with
// a byte offset), mmap2; the offset is 0 either way.
func mmapFixedAnon(b []byte) (uintptr, error) {
	p, err := unix.MmapPtr(-1, 0, unsafe.Pointer(unsafe.SliceData(b)), uintptr(len(b)),
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED)
	if err != nil {
		return 0, err
	}
	return uintptr(p), nil
}
