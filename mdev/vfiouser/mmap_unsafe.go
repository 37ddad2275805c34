package vfiouser

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// mmapFixedAnon maps fresh private anonymous memory over b's pages.
func mmapFixedAnon(b []byte) (uintptr, error) {
	addr := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	r, _, errno := unix.Syscall6(unix.SYS_MMAP, addr, uintptr(len(b)),
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED, ^uintptr(0), 0)
	if errno != 0 {
		return 0, errno
	}
	return r, nil
}
