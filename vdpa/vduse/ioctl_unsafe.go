//go:build linux

package vduse

import (
	"encoding/binary"
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The only place in the package that passes pointers to the kernel. Every
// argument is a Go byte slice at least as long as the structure the ioctl
// number encodes, so the kernel never reads or writes past it.

// ioctlBuf issues ioctl req with a pointer to b, which must hold at least
// size bytes (checked).
func ioctlBuf(fd int, req uintptr, b []byte, size int, op string) error {
	if len(b) < size || size == 0 {
		return fmt.Errorf("vduse: %s: buffer of %d bytes, need %d", op, len(b), size)
	}
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(&b[0])))
	runtime.KeepAlive(b)
	if errno != 0 {
		return &OpError{Op: op, Err: errno}
	}
	return nil
}

// ioctlNoArg issues an ioctl without an argument.
func ioctlNoArg(fd int, req uintptr, op string) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, 0)
	if errno != 0 {
		return &OpError{Op: op, Err: errno}
	}
	return nil
}

// ioctlU64 passes a pointer to a __u64 in and out.
func ioctlU64(fd int, req uintptr, v uint64, op string) (uint64, error) {
	var b [8]byte
	binary.NativeEndian.PutUint64(b[:], v)
	if err := ioctlBuf(fd, req, b[:], 8, op); err != nil {
		return 0, err
	}
	return binary.NativeEndian.Uint64(b[:]), nil
}

// ioctlU32 passes a pointer to a __u32.
func ioctlU32(fd int, req uintptr, v uint32, op string) error {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return ioctlBuf(fd, req, b[:], 4, op)
}

// ioctlRetFD issues an ioctl whose return value is a new file descriptor.
func ioctlRetFD(fd int, req uintptr, b []byte, size int, op string) (int, error) {
	if len(b) < size {
		return -1, fmt.Errorf("vduse: %s: buffer of %d bytes, need %d", op, len(b), size)
	}
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(&b[0])))
	runtime.KeepAlive(b)
	if errno != 0 {
		return -1, &OpError{Op: op, Err: errno}
	}
	return int(r), nil
}
