package vhostsys

import (
	"encoding/binary"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctlPtr issues ioctl(fd, req, p). The pointer conversion happens in the
// Syscall argument list, as unsafe.Pointer rule (4) requires, and p stays
// alive until the kernel is done with it.
func ioctlPtr[T any](fd int, req uint, p *T) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(unsafe.Pointer(p)))
	runtime.KeepAlive(p)
	if errno != 0 {
		return errno
	}
	return nil
}

func ioctlNoArg(fd int, req uint) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), 0)
	if errno != 0 {
		return errno
	}
	return nil
}

func ioctlPtrU8(fd int, req uint, p *uint8) error         { return ioctlPtr(fd, req, p) }
func ioctlPtrU16(fd int, req uint, p *uint16) error       { return ioctlPtr(fd, req, p) }
func ioctlPtrU32(fd int, req uint, p *uint32) error       { return ioctlPtr(fd, req, p) }
func ioctlPtrU64(fd int, req uint, p *uint64) error       { return ioctlPtr(fd, req, p) }
func ioctlPtrState(fd int, req uint, p *VringState) error { return ioctlPtr(fd, req, p) }
func ioctlPtrFile(fd int, req uint, p *VringFile) error   { return ioctlPtr(fd, req, p) }
func ioctlPtrAddr(fd int, req uint, p *VringAddr) error   { return ioctlPtr(fd, req, p) }
func ioctlPtrRange(fd int, req uint, p *IOVARange) error  { return ioctlPtr(fd, req, p) }
func ioctlPtrBytes(fd int, req uint, b []byte) error      { return ioctlPtr(fd, req, &b[0]) }

// ioctlMemTable builds struct vhost_memory (header plus flexible array) in
// one 8-byte-aligned buffer and passes it to VHOST_SET_MEM_TABLE.
func ioctlMemTable(fd int, regions []MemoryRegion) error {
	words := make([]uint64, (SizeofMemory+SizeofMemoryRegion*len(regions))/8)
	b := unsafe.Slice((*byte)(unsafe.Pointer(&words[0])), len(words)*8)
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], uint32(len(regions)))
	for i, r := range regions {
		p := b[SizeofMemory+i*SizeofMemoryRegion:][:SizeofMemoryRegion]
		ne.PutUint64(p[0:], r.GuestPhysAddr)
		ne.PutUint64(p[8:], r.MemorySize)
		ne.PutUint64(p[16:], r.UserspaceAddr)
		ne.PutUint64(p[24:], r.FlagsPadding)
	}
	return ioctlPtr(fd, VHOST_SET_MEM_TABLE, &words[0])
}
