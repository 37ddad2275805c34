package hostnet

// The system calls and the unsafe pointer work of the package: tap ioctls,
// the two-part writev of a header and a frame, network namespace entry.

import (
	"fmt"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// openTapQueue opens one queue of tap name (created if it does not exist)
// with a 12-byte virtio-net header on every frame, non-blocking.
func openTapQueue(name string, multiQueue bool) (fd int, ifname string, err error) {
	fd, err = unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return -1, "", fmt.Errorf("hostnet: open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return -1, "", fmt.Errorf("hostnet: tap name %q: %w", name, err)
	}
	flags := uint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if multiQueue {
		flags |= unix.IFF_MULTI_QUEUE
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return -1, "", fmt.Errorf("hostnet: TUNSETIFF %q: %w", name, err)
	}
	if err := unix.IoctlSetPointerInt(fd, unix.TUNSETVNETHDRSZ, vnetHdrLen); err != nil {
		unix.Close(fd)
		return -1, "", fmt.Errorf("hostnet: TUNSETVNETHDRSZ: %w", err)
	}
	return fd, ifr.Name(), nil
}

// setTapOffload is TUNSETOFFLOAD: the offloads (TUN_F_*) of frames the
// kernel may hand to this reader. The argument is the value itself.
func setTapOffload(fd int, flags uint) error {
	if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, int(flags)); err != nil {
		return fmt.Errorf("hostnet: TUNSETOFFLOAD %#x: %w", flags, err)
	}
	return nil
}

// writev2 writes hdr and frame as one frame with writev(2), using iov
// (owned by the caller) so nothing is allocated. frame may lie in guest
// memory the guest's owner truncated: the kernel then returns EFAULT
// rather than the process faulting.
func writev2(fd int, iov *[2]unix.Iovec, hdr, frame []byte) error {
	iov[0].Base = unsafe.SliceData(hdr)
	iov[0].SetLen(len(hdr))
	iov[1].Base = unsafe.SliceData(frame)
	iov[1].SetLen(len(frame))
	n := 2
	if len(frame) == 0 {
		n = 1
	}
	_, _, errno := unix.Syscall(unix.SYS_WRITEV, uintptr(fd), uintptr(unsafe.Pointer(&iov[0])), uintptr(n))
	runtime.KeepAlive(hdr)
	runtime.KeepAlive(frame)
	iov[0].Base, iov[1].Base = nil, nil
	if errno != 0 {
		return errno
	}
	return nil
}

// inNetNS runs fn on an OS thread that has entered the network namespace
// at path (a file under /var/run/netns or /proc/PID/ns/net); an empty path
// runs fn here. The thread is never returned to the Go scheduler: the
// goroutine exits locked, so the runtime discards it.
func inNetNS(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	ns, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("hostnet: network namespace: %w", err)
	}
	defer ns.Close()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// Never unlocked: the thread's namespace changes.
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- fmt.Errorf("hostnet: setns %s: %w", path, err)
			return
		}
		done <- fn()
	}()
	return <-done
}
