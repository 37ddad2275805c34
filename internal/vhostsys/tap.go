package vhostsys

import (
	"os"

	"golang.org/x/sys/unix"
)

// TapOptions configures OpenTap.
type TapOptions struct {
	// Name is the interface name; empty lets the kernel pick tapN. An
	// existing persistent tap of that name is attached to.
	Name string
	// VnetHdrSize is the virtio-net header size the tap exchanges with
	// its reader (TUNSETVNETHDRSZ): 12 for VIRTIO_F_VERSION_1 or
	// MRG_RXBUF, 10 otherwise.
	VnetHdrSize int
}

// OpenTap opens /dev/net/tun and creates a tap interface with
// IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, no offloads, and the given vnet header
// size. It returns the queue file and the interface name the kernel used.
func OpenTap(opts TapOptions) (*os.File, string, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, "", &OpError{Op: "open /dev/net/tun", Err: err}
	}
	ifr, err := unix.NewIfreq(opts.Name)
	if err != nil {
		unix.Close(fd)
		return nil, "", &OpError{Op: "TUNSETIFF", Err: err}
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, "", &OpError{Op: "TUNSETIFF", Err: err}
	}
	if err := unix.IoctlSetPointerInt(fd, unix.TUNSETVNETHDRSZ, opts.VnetHdrSize); err != nil {
		unix.Close(fd)
		return nil, "", &OpError{Op: "TUNSETVNETHDRSZ", Err: err}
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, 0); err != nil {
		unix.Close(fd)
		return nil, "", &OpError{Op: "TUNSETOFFLOAD", Err: err}
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun"), ifr.Name(), nil
}

// SetLinkUp sets or clears IFF_UP on the named interface (SIOCSIFFLAGS).
func SetLinkUp(name string, up bool) error {
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return &OpError{Op: "socket", Err: err}
	}
	defer unix.Close(s)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return &OpError{Op: "SIOCGIFFLAGS", Err: err}
	}
	if err := unix.IoctlIfreq(s, unix.SIOCGIFFLAGS, ifr); err != nil {
		return &OpError{Op: "SIOCGIFFLAGS " + name, Err: err}
	}
	flags := ifr.Uint16()
	if up {
		flags |= unix.IFF_UP
	} else {
		flags &^= unix.IFF_UP
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(s, unix.SIOCSIFFLAGS, ifr); err != nil {
		return &OpError{Op: "SIOCSIFFLAGS " + name, Err: err}
	}
	return nil
}

// SetTapVnetHdrSize is TUNSETVNETHDRSZ on an open tap queue.
func SetTapVnetHdrSize(tap *os.File, n int) error {
	rc, err := tap.SyscallConn()
	if err != nil {
		return &OpError{Op: "TUNSETVNETHDRSZ", Err: err}
	}
	var ierr error
	if err := rc.Control(func(fd uintptr) { ierr = unix.IoctlSetPointerInt(int(fd), unix.TUNSETVNETHDRSZ, n) }); err != nil {
		return &OpError{Op: "TUNSETVNETHDRSZ", Err: os.ErrClosed}
	}
	return opErr("TUNSETVNETHDRSZ", ierr)
}
