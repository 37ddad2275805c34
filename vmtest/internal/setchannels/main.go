// Command setchannels sets a network interface's number of combined
// channels, as "ethtool -L IFACE combined N" does, with the SIOCETHTOOL
// ioctl (ETHTOOL_GCHANNELS, then ETHTOOL_SCHANNELS). The QEMU guest tests
// put it into the guest's initramfs, whose busybox has no ethtool: on a
// virtio-net device with VIRTIO_NET_F_MQ the guest's driver then sends
// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, and QEMU disables or enables the
// vhost-user back-end's rings of the pairs it drops or adds.
//
// Usage: setchannels IFACE N
//
// It prints the channel counts before and after, and exits non-zero on any
// error.
package main

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ethtoolChannels is struct ethtool_channels (linux/ethtool.h).
type ethtoolChannels struct {
	Cmd                                         uint32
	MaxRx, MaxTx, MaxOther, MaxCombined         uint32
	RxCount, TxCount, OtherCount, CombinedCount uint32
}

// ifreqData is struct ifreq with ifr_data set: the name, then the union,
// whose largest member, struct ifmap (two unsigned longs and 5 bytes),
// makes it 2 longs + 8 bytes: 24 bytes on 64-bit Linux, 16 on 32-bit.
type ifreqData struct {
	name [unix.IFNAMSIZ]byte
	data unsafe.Pointer
	_    [unsafe.Sizeof(uintptr(0)) + 8]byte // the union's rest
}

func ethtool(fd int, iface string, ch *ethtoolChannels) error {
	var ifr ifreqData
	if len(iface) >= len(ifr.name) {
		return fmt.Errorf("interface name %q too long", iface)
	}
	copy(ifr.name[:], iface)
	ifr.data = unsafe.Pointer(ch)
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr)))
	runtime.KeepAlive(ch) // referenced only through ifr.data during the call
	if errno != 0 {
		return errno
	}
	return nil
}

func run(iface string, n uint32) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	ch := ethtoolChannels{Cmd: unix.ETHTOOL_GCHANNELS}
	if err := ethtool(fd, iface, &ch); err != nil {
		return fmt.Errorf("%s: ETHTOOL_GCHANNELS: %w", iface, err)
	}
	fmt.Printf("%s: combined %d (max %d)\n", iface, ch.CombinedCount, ch.MaxCombined)
	if ch.MaxCombined == 0 {
		return fmt.Errorf("%s: the device has no combined channels", iface)
	}
	if n == 0 || n > ch.MaxCombined {
		return fmt.Errorf("%s: %d combined channels asked, the device has 1 to %d", iface, n, ch.MaxCombined)
	}
	ch.Cmd, ch.CombinedCount = unix.ETHTOOL_SCHANNELS, n
	if err := ethtool(fd, iface, &ch); err != nil {
		return fmt.Errorf("%s: ETHTOOL_SCHANNELS combined %d: %w", iface, n, err)
	}
	ch = ethtoolChannels{Cmd: unix.ETHTOOL_GCHANNELS}
	if err := ethtool(fd, iface, &ch); err != nil {
		return fmt.Errorf("%s: ETHTOOL_GCHANNELS: %w", iface, err)
	}
	fmt.Printf("%s: combined %d (max %d)\n", iface, ch.CombinedCount, ch.MaxCombined)
	if ch.CombinedCount != n {
		return fmt.Errorf("%s: combined %d after setting %d", iface, ch.CombinedCount, n)
	}
	return nil
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: setchannels IFACE N")
		os.Exit(2)
	}
	n, err := strconv.ParseUint(os.Args[2], 10, 32)
	if err != nil {
		fmt.Fprintln(os.Stderr, "setchannels:", err)
		os.Exit(2)
	}
	if err := run(os.Args[1], uint32(n)); err != nil {
		fmt.Fprintln(os.Stderr, "setchannels:", err)
		os.Exit(1)
	}
}
